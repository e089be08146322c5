"""The Hessians GPTQ weighs rounding errors by: ``H = sum x x^T`` over each weight's matmul
inputs ``x``, summed over calibration batches.

Each quantizable parameter's value is swapped for a ``layers.matmul.Observed`` wrapper for
the duration of eager forward passes, so the layers report their matmul inputs without a
hook of their own. The spec says how an input meets the weight: its contraction letters
make ``in`` (row-major in the weight's order), a letter shared with the output (the experts'
``E`` in ``'ECD,EDF->ECF'``) gives one Hessian per index, and every other letter counts
rows. The grouped matmul's rows are split by its group sizes, one Hessian per expert.
"""

import math
from collections.abc import Iterable

import jax
import numpy as np

from gemini_mini.batch import Batch
from gemini_mini.layers.matmul import Observed
from gemini_mini.model import Decoder
from gemini_mini.quant.model import quantizable


def hessians(decoder: Decoder, batches: Iterable[Batch]) -> dict[str, np.ndarray]:
  """``{weight path: H}`` in float64, ``[in, in]`` or, for experts, ``[E, in, in]``; a
  weight no batch reached (an encoder with no items) is absent.

  Raises:
    ValueError: a scanned or rematerialised decoder, whose layers run traced.
  """
  config = decoder.config
  if config.scan_layers or config.remat:
    raise ValueError('calibration runs the layers eagerly and cannot see inside the traced '
                     'scan or remat; load the decoder with model.scan_layers=false and '
                     'model.remat=false (the parameters are the same), or quantize with rtn')
  sums = {}

  def observer(name):
    def observe(spec, x, group_sizes):
      x = np.asarray(x, np.float64)
      hessian = _einsum_hessian(spec, x) if group_sizes is None else _group_hessian(
          x, np.asarray(group_sizes))
      sums[name] = sums.get(name, 0) + hessian
    return observe

  weights = quantizable(decoder)
  floats = {name: variable[...] for name, variable in weights.items()}
  try:
    for name, variable in weights.items():
      variable.set_value(Observed(floats[name], observer(name)))
    for batch in batches:
      jax.block_until_ready(decoder(batch))
  finally:
    for name, variable in weights.items():
      variable.set_value(floats[name])
  return sums


def _einsum_hessian(spec: str, x: np.ndarray) -> np.ndarray:
  inputs, out = spec.split('->')
  x_spec, w_spec = inputs.split(',')
  contract = [i for i in w_spec if i in x_spec and i not in out]
  batch = [i for i in w_spec if i in x_spec and i in out]
  rows = [i for i in x_spec if i not in w_spec]
  x = np.transpose(x, [x_spec.index(i) for i in batch + rows + contract])
  x = x.reshape(*x.shape[:len(batch)], -1, math.prod(x.shape[x.ndim - len(contract):]))
  return np.einsum('...xi,...xj->...ij', x, x)


def _group_hessian(x_WI: np.ndarray, group_sizes_E: np.ndarray) -> np.ndarray:
  ends_E = np.cumsum(group_sizes_E)
  return np.stack([x_WI[end - size:end].T @ x_WI[end - size:end]
                   for size, end in zip(group_sizes_E, ends_E)])
