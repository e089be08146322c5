"""Run in a fresh process with 8 fake CPU devices (see test_sharding.py): loss and gradients
of the test model on several meshes, printed as JSON for comparison with one device."""

import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from gemini_mini import config as config_lib, parallel  # noqa: E402
from gemini_mini.train.loss import LossWeights, loss_sums  # noqa: E402
from gemini_mini.train.optimizer import learning_rate_schedule, make_optimizer  # noqa: E402
from gemini_mini.train.step import (  # noqa: E402
    abstract_train_state, init_train_state, jit_steps, make_eval_step, make_train_step)

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from helpers import make_batch  # noqa: E402

MESHES = {'single': dict(data=1), 'data8': dict(data=8), 'data2_fsdp4': dict(data=2, fsdp=4),
          'fsdp2_expert2_tensor2': dict(data=1, fsdp=2, expert=2, tensor=2)}


def main(dispatch: str):
  overrides = [f'model.moe_dispatch={dispatch}', 'model.moe_every=1', 'train.batch_size=8']
  config = config_lib.load('configs/test.yaml', overrides)
  weights = LossWeights(0.01, 0.001, 1e-4)
  batch = make_batch(config.model, batch_size=8, documents=[(64,), (40, 24)] * 4,
                     images=[(0, 3, 4), (5, 10, 6)], audio=[(2, 7, 5)])
  optimizer = make_optimizer(learning_rate=1e-3, steps=10, warmup_steps=2, weight_decay=0.1,
                             grad_clip=1.0)
  results = {}
  # Capacity dispatch differs from dropless inside the MoE only: one mesh splitting experts.
  meshes = MESHES if dispatch == 'dropless' else {
      name: MESHES[name] for name in ('single', 'fsdp2_expert2_tensor2')}
  for name, sizes in meshes.items():
    devices = jax.devices()[:1] if name == 'single' else jax.devices()
    mesh = parallel.make_mesh(config_lib.MeshConfig(**sizes), devices)
    graphdef, shardings, _ = abstract_train_state(config.model, optimizer, mesh, seed=0)
    state = init_train_state(config.model, optimizer, shardings, seed=0)
    sharded_leaves = sum(not leaf.sharding.is_fully_replicated
                         for leaf in jax.tree.leaves(state.params))

    def objective(params, batch):
      logits, aux = nnx.merge(graphdef, params)(batch)
      numerator, sums = loss_sums(logits, aux, batch, weights)
      return numerator / sums['tokens']

    global_batch = parallel.host_local_to_global(batch, mesh)
    with jax.set_mesh(mesh):
      loss, grads = jax.jit(jax.value_and_grad(objective))(state.params, global_batch)
      train_step, _ = jit_steps(make_train_step(graphdef, optimizer,
                                                learning_rate_schedule(1e-3, 10, 2), weights, 2),
                                make_eval_step(graphdef, weights), shardings, mesh)
      _, metrics = train_step(state, global_batch)
    results[name] = {
        'loss': float(loss), 'sharded_leaves': int(sharded_leaves),
        'grads': {jax.tree_util.keystr(path): np.asarray(g).ravel()[:64].tolist()
                  for path, g in jax.tree_util.tree_leaves_with_path(grads)},
        'step_loss': float(metrics['loss']), 'step_grad_norm': float(metrics['grad_norm']),
    }
  print(json.dumps(results))


if __name__ == '__main__':
  main(sys.argv[1])
