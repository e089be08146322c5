"""GPTQ (Frantar et al. 2022) for one weight, through qwix's ``gptq_core``.

GPTQ rounds one input column at a time and moves each column's rounding error onto the
columns not yet rounded, weighted by the inverse Hessian ``H = sum x x^T`` of the matmul's
inputs: it minimises the layer's output error ``||X W - X W_q||^2`` rather than the weight's.
qwix's version works on ``W[out, in]``; a weight of any layout is reshaped to it (``in``: its
contraction axes flattened row-major, ``out``: the rest) and back, its scales laid out as
``rtn``'s, so one matmul and one checkpoint format serve both methods. A weight whose Hessian
has leading axes (the experts': one per expert) is solved once per index of its leading axes.

qwix's column loop is Python, unrolled when traced: jitted once per matrix shape, it compiles
for about a minute (256 columns, 2 CPU cores) and then runs in well under a second, where the
same loop run eagerly takes seconds per matrix.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from qwix._src.core.qarray import HowToQuantize
from qwix.contrib import gptq_core

from gemini_mini.quant import rtn


def quantize(w: jax.Array, hessian: np.ndarray, bits: int, group: int, axes, contract,
             name: str) -> qwix.QArray:
  """``w`` quantized by GPTQ for inputs of ``hessian`` (``[..., in, in]``)."""
  scale_shape = rtn.scale_shape(w.shape, axes, contract, group, name)
  loop = hessian.ndim - 2
  contract_axes = [axes.index(a) for a in contract]
  out_axes = [a for a in range(loop, w.ndim) if a not in contract_axes]
  order = list(range(loop)) + out_axes + contract_axes
  sizes = lambda shape, axes_: [shape[a] for a in axes_]
  out_size, in_size = math.prod(sizes(w.shape, out_axes)), math.prod(sizes(w.shape, contract_axes))
  w_LOI = jnp.transpose(w, order).reshape(-1, out_size, in_size)
  hessian_LII = jnp.asarray(hessian, jnp.float32).reshape(-1, in_size, in_size)
  solved = [_solve(w_OI, hessian_II, bits, group) for w_OI, hessian_II in zip(w_LOI, hessian_LII)]
  back = np.argsort(order)
  qvalue = jnp.stack([q.qvalue for q in solved]).reshape(sizes(w.shape, order))
  scale = jnp.stack([q.scale for q in solved]).reshape(sizes(scale_shape, order))
  return qwix.QArray(jnp.transpose(qvalue, back), jnp.transpose(scale, back),
                     qtype=rtn.qtype(bits))


def _solve(w_OI, hessian_II, bits, group) -> qwix.QArray:
  """GPTQ of one matrix; round-to-nearest when no calibration input reached it (a zero
  Hessian weighs no error, and qwix would zero the whole matrix)."""
  if not np.any(np.diag(hessian_II)):
    return qwix.quantize(w_OI, rtn.qtype(bits), channelwise_axes=(0,), tiled_axes={1: group})
  return _solver(bits, group)(w_OI, hessian_II)


@functools.cache
def _solver(bits: int, group: int):
  how = HowToQuantize(qtype=rtn.qtype(bits), channelwise_axes=(0,), tiled_axes={1: group})
  return jax.jit(lambda w_OI, hessian_II: gptq_core.quantize_weight(w_OI, hessian_II, how)[0])
