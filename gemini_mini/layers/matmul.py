"""The weight matmul every layer uses: an activation times a parameter in the compute dtype.

``weight_einsum('XD,DF->XF', x_XD, w_DF, dtype)`` casts both operands to ``dtype`` and sums
the products in float32, the result in ``dtype`` (or ``out_dtype``). In float32, and in
bfloat16 on GPU and TPU, whose bfloat16 matmuls accumulate in float32 by themselves, that
is a plain ``jnp.einsum`` and JAX differentiates it.

On CPU, in bfloat16, the forward matmul asks for float32 results
(``preferred_element_type``), and the backward pass is written by hand so that its two
matmuls do the same: XLA:CPU's bfloat16-output matmul is slower than its float32 one, and
JAX's own transpose of a float32-result einsum multiplies the float32 cotangent by the
bfloat16 operand, which XLA:CPU runs in float32 (docs/benchmarks.md#bfloat16-on-cpu). The
weight gradient comes back in float32, never rounded to bfloat16. On GPU, XLA's own
transposes are already bfloat16 matmuls with float32 accumulation and the hand-written
backward was slower (docs/benchmarks.md#bfloat16-on-a-gpu), hence CPU only.

A quantized weight (a ``qwix.QArray``: integers and per-group scales, ``gemini_mini.quant``)
goes through ``qwix.einsum``. With a float activation qwix dequantizes the weight (each
integer times its group's scale) inside the compiled program and multiplies in ``dtype``: the
memory saved is the stored weight's, not the matmul's. It serves inference only; no gradient
flows into it. An ``Observed`` weight reports its matmul's input first: the
quantizer's calibration (``gemini_mini.quant.calibrate``) collects them, outside ``jit``.
"""

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import qwix


@dataclasses.dataclass(frozen=True)
class Observed:
  """A float weight whose matmuls first call ``observe(spec, x, group_sizes)`` with their
  input (``group_sizes``: the grouped matmul's, else None), then multiply by ``w``."""

  w: jax.Array
  observe: Callable[[str, jax.Array, jax.Array | None], None]

  def __getitem__(self, index):  # ``param[...]`` reads the whole weight
    if index is not Ellipsis:
      raise TypeError(f'an observed weight is read whole (``[...]``), not at {index!r}')
    return self


def weight_einsum(spec: str, x: jax.Array, w: jax.Array | qwix.QArray, dtype, *,
                  out_dtype=None) -> jax.Array:
  """``jnp.einsum(spec, x, w)`` with both operands in ``dtype``, float32 accumulation, the
  result in ``out_dtype`` (default ``dtype``). ``spec`` names two operands and the output;
  each index of one operand must appear in the other or in the output. The gradient with
  respect to ``w`` has ``w``'s dtype; with respect to ``x``, ``x``'s. A ``QArray`` ``w`` is
  dequantized group by group in ``dtype`` (its scales cast to it)."""
  out_dtype = out_dtype or dtype
  _transposed_specs(spec)  # checks the spec on every platform and dtype
  if isinstance(w, Observed):
    w.observe(spec, x, None)
    w = w.w
  if isinstance(w, qwix.QArray):
    return qwix.einsum(spec, x.astype(dtype), w.astype(dtype), preferred_element_type=out_dtype)
  if jnp.dtype(dtype) == jnp.float32 or jax.default_backend() != 'cpu':
    return jnp.einsum(spec, x.astype(dtype), w.astype(dtype), preferred_element_type=out_dtype)
  return _low_precision_einsum(spec, jnp.dtype(out_dtype), x.astype(dtype), w)


def _transposed_specs(spec: str) -> tuple[str, str]:
  """The einsum specs of the two gradients: ``(dy, w) -> dx`` and ``(x, dy) -> dw``."""
  if spec.count('->') != 1 or spec.split('->')[0].count(',') != 1 or ' ' in spec:
    raise ValueError(f"weight_einsum {spec!r}: write two operands and the output without "
                     f"spaces, e.g. 'XD,DF->XF'")
  inputs, out = spec.split('->')
  x_spec, w_spec = inputs.split(',')
  for operand, other in ((x_spec, w_spec), (w_spec, x_spec)):
    if not set(operand) <= set(other) | set(out):
      raise ValueError(f'weight_einsum {spec!r}: an index of {operand!r} appears in neither '
                       f'the other operand nor the output; sum it out before the einsum')
  return f'{out},{w_spec}->{x_spec}', f'{x_spec},{out}->{w_spec}'


def _accumulate_f32(spec, a, b, out_dtype):
  """``einsum(spec, a, b)`` with float32 accumulation, as one (batched) 2-D matmul: XLA:CPU
  multiplies bfloat16 into float32 only in its matmul kernels, and some multi-axis dots
  (``'XD,XNH->DNH'``, the query weight's gradient) miss them for a generic dot that refuses
  mixed types (jax 0.10.2: "Unsupported element type for DotThunk")."""
  inputs, out = spec.split('->')
  a_spec, b_spec = inputs.split(',')
  batch = [i for i in out if i in a_spec and i in b_spec]
  contract = [i for i in a_spec if i in b_spec and i not in out]
  a_free = [i for i in a_spec if i not in b_spec]
  b_free = [i for i in b_spec if i not in a_spec]
  size = dict(zip(a_spec, a.shape)) | dict(zip(b_spec, b.shape))
  flat = lambda x, x_spec, *groups: jnp.transpose(
      x, [x_spec.index(i) for group in groups for i in group]).reshape(
          [math.prod(size[i] for i in group) for group in groups])
  if batch:
    y = jax.lax.dot_general(flat(a, a_spec, batch, a_free, contract),
                            flat(b, b_spec, batch, contract, b_free),
                            (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)
  else:
    y = jnp.matmul(flat(a, a_spec, a_free, contract), flat(b, b_spec, contract, b_free),
                   preferred_element_type=jnp.float32)
  y_spec = batch + a_free + b_free
  y = y.reshape([size[i] for i in y_spec])
  return jnp.transpose(y, [y_spec.index(i) for i in out]).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _low_precision_einsum(spec, out_dtype, x, w):
  """``x`` in the compute dtype; ``w`` in any dtype, cast to ``x``'s."""
  return _accumulate_f32(spec, x, w.astype(x.dtype), out_dtype)


def _low_precision_einsum_fwd(spec, out_dtype, x, w):
  return _low_precision_einsum(spec, out_dtype, x, w), (x, w)


def _low_precision_einsum_bwd(spec, out_dtype, residuals, dy):
  x, w = residuals
  dx_spec, dw_spec = _transposed_specs(spec)
  dy = dy.astype(x.dtype)
  return (_accumulate_f32(dx_spec, dy, w.astype(x.dtype), x.dtype),
          _accumulate_f32(dw_spec, x, dy, w.dtype))


_low_precision_einsum.defvjp(_low_precision_einsum_fwd, _low_precision_einsum_bwd)
