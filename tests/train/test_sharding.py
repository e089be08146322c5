"""Sharded == unsharded: loss and gradients on 8 fake CPU devices equal one device's.

The meshes cover pure data parallelism, FSDP (parameters split along `embed`), and expert +
tensor parallelism. JAX fixes its device count at import, so the comparison runs in a fresh
process (``sharded_equivalence.py``) with ``--xla_force_host_platform_device_count=8``.
"""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = pathlib.Path(__file__).with_name('sharded_equivalence.py')


@pytest.mark.slow
@pytest.mark.parametrize('dispatch', ['dropless', 'capacity'])
def test_loss_and_gradients_match_one_device(dispatch):
  result = subprocess.run([sys.executable, str(SCRIPT), dispatch], capture_output=True,
                          text=True, check=True)
  results = json.loads(result.stdout.strip().splitlines()[-1])
  reference = results.pop('single')
  assert set(results) == ({'data8', 'data2_fsdp4', 'fsdp2_expert2_tensor2'}
                          if dispatch == 'dropless' else {'fsdp2_expert2_tensor2'})
  for name, sharded in results.items():
    if name != 'data8':  # pure data parallelism replicates parameters
      assert sharded['sharded_leaves'] > 0, f'{name}: no parameter is actually sharded'
    np.testing.assert_allclose(sharded['loss'], reference['loss'], rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(sharded['step_loss'], reference['step_loss'], rtol=1e-6)
    np.testing.assert_allclose(sharded['step_grad_norm'], reference['step_grad_norm'], rtol=1e-5)
    assert sharded['grads'].keys() == reference['grads'].keys()
    for path, grad in reference['grads'].items():
      np.testing.assert_allclose(sharded['grads'][path], grad, rtol=1e-4, atol=1e-7,
                                 err_msg=f'{name} {path}')
