"""Quantizing every weight of a decoder in place: which parameters, and by which method."""

import numpy as np
from flax import nnx

from gemini_mini.quant import gptq, rtn

METHODS = ('rtn', 'gptq')


def variables(module: nnx.Module) -> dict[str, nnx.Variable]:
  """``{'blocks.0.attention.q_DNH': variable}``: every variable of ``module``, by the path
  the parameter checkpoints name it with."""
  return {'.'.join(map(str, path)): node for path, node in nnx.iter_graph(module)
          if isinstance(node, nnx.Variable)}


def quantizable(module: nnx.Module) -> dict[str, nnx.Param]:
  """The weights a matmul contracts (``layers.param(..., contract=...)``): all the others
  (embeddings, router, norms, scalar head) stay float32."""
  return {name: v for name, v in variables(module).items()
          if 'contract' in v.get_metadata()}


def layout(variable: nnx.Variable) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """``(axes, contract)``: the weight's logical axis names and those its matmul sums over."""
  metadata = variable.get_metadata()
  return metadata['out_sharding'], metadata['contract']


def check_group(module: nnx.Module, group: int) -> None:
  """Raises ValueError, naming the first weight whose contraction ``group`` does not tile."""
  for name, variable in quantizable(module).items():
    rtn.tiling(variable.shape, *layout(variable), group, name)


def quantize(module: nnx.Module, bits: int, group: int,
             hessians: dict[str, np.ndarray] | None = None) -> list[str]:
  """Replaces every quantizable weight of ``module`` by its ``QArray``: GPTQ where
  ``hessians`` (``calibrate.hessians``) holds the weight, else round-to-nearest. Returns the
  weights given Hessians did not reach (quantized to the nearest instead)."""
  check_group(module, group)
  unreached = []
  for name, variable in quantizable(module).items():
    axes, contract = layout(variable)
    hessian = None if hessians is None else hessians.get(name)
    if hessian is None:
      unreached += [] if hessians is None else [name]
      variable.set_value(rtn.quantize(variable[...], bits, group, axes, contract, name))
    else:
      variable.set_value(gptq.quantize(variable[...], hessian, bits, group, axes, contract, name))
  return unreached
