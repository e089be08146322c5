"""A student that starts as its teacher, narrowed (``train.student_init: pruned``).

Width pruning as in Minitron (Muralidharan et al. 2024, "Compact Language Models via Pruning
and Knowledge Distillation"): the student has the teacher's depth, experts, vocabulary, KV
heads and head size, and is narrower in three widths, each named by a logical axis:
``embed`` (``model.d_model``), ``heads`` (``model.num_heads``) and ``mlp`` (``model.d_ff``).
Each keeps the teacher's slices that carry the most energy on calibration rows of the
training mixture, read from the Hessians GPTQ uses (``quant/calibrate.py``: ``H = sum x x^T``
over each weight's matmul inputs ``x``):

  embed channel d   sum over blocks of H_dd at the attention's and the FFN's inputs (the
                    normalised residual stream both read; Minitron's LayerNorm activations)
  query head n      E ||a_n O_n||^2 = sum(H_n * O_n O_n^T): what the head adds to the residual
                    stream, a_n its output and O_n its rows of ``o_NHD``
  neuron f          H_ff * ||down_f||^2, each expert (and each MLP) its own

and every parameter is cut along the axes those widths name (a router keeps its ``embed``
rows, an expert its own ``mlp`` neurons, the embedding table its ``embed`` columns). Query
heads are kept in equal numbers under each KV head, so grouped-query attention stays
grouped. Nothing is rescaled: distillation from the same teacher trains the student on.

The Hessians come from an eager forward pass, so both models must be unscanned; the
calibration runs in one process.
"""

from collections.abc import Iterable

import jax
import numpy as np
from flax import nnx

from gemini_mini.batch import Batch
from gemini_mini.config import ConfigError, ModelConfig
from gemini_mini.model import Decoder
from gemini_mini.quant.calibrate import hessians
from gemini_mini.quant.model import variables
from gemini_mini.train.runs import FUNCTION_FIELDS

PRUNED = ('d_model', 'num_heads', 'd_ff')  # the widths, cut along axes embed, heads, mlp
# Fields a pruned student shares with its teacher: the parameter tree outside the three
# widths, and what the parameters compute (the fields init_from also compares).
SHARED = ('vocab_size', 'num_layers', 'num_kv_heads', 'head_dim', 'num_experts', 'moe_every',
          'shared_expert', 'tie_embeddings', 'scalar_head', 'patch_dim', 'audio_dim',
          'scan_layers', *FUNCTION_FIELDS)


def check(student: ModelConfig, teacher: ModelConfig) -> None:
  """Raises ConfigError naming every field a pruned student cannot take as it is."""
  problems = [f'model.{name}={getattr(teacher, name)} (the teacher\'s; this student has '
              f'{getattr(student, name)})' for name in SHARED
              if getattr(student, name) != getattr(teacher, name)]
  problems += [f'model.{name} at most {getattr(teacher, name)} (the teacher\'s; this student '
               f'has {getattr(student, name)})' for name in PRUNED
               if getattr(student, name) > getattr(teacher, name)]
  if student.scan_layers:
    problems.append('model.scan_layers=false (calibration runs the layers eagerly)')
  if problems:
    raise ConfigError('train.student_init: a pruned student narrows the teacher\'s d_model, '
                      'num_heads and d_ff and keeps the rest; set ' + '; '.join(problems)
                      + ', or set train.student_init=random')


def pruned_params(student: Decoder, teacher: Decoder, batches: Iterable[Batch]) -> nnx.State:
  """The student's parameters cut from the teacher's, placed with the student's shardings
  (``student``'s own values give the shapes and shardings and are not read)."""
  check(student.config, teacher.config)
  keep = kept_slices(teacher, student.config, hessians(teacher, batches))
  ours = variables(student)
  for name, variable in variables(teacher).items():
    value = narrow(np.asarray(variable[...]), _axes(variable), keep.get(_module(name), {}), keep['embed'])
    if value.shape != ours[name].shape:
      raise AssertionError(f'{name}: pruned to {value.shape}, the student has '
                           f'{ours[name].shape}')
    ours[name].set_value(jax.device_put(value, ours[name][...].sharding))
  return nnx.state(student)


def kept_slices(teacher: Decoder, student: ModelConfig,
                sums: dict[str, np.ndarray]) -> dict:
  """``{'embed': d_E, module path: {'heads': n_N} or {'mlp': f_F or f_EF}}``: the kept
  indices (ascending) of each width, global for ``embed`` and per module otherwise."""
  weights = variables(teacher)
  keep = {}
  channel_energy = 0
  for name, variable in weights.items():
    module, leaf = name.rsplit('.', 1)
    if leaf == 'q_DNH' or (module.startswith('blocks.') and leaf in ('gate_DF', 'gate_EDF')
                           and not module.endswith('.shared')):
      if name in sums:  # the energy of the normalised stream the block reads
        width = teacher.config.d_model
        channel_energy = channel_energy + _diagonal(sums[name]).reshape(-1, width).sum(0)
    if leaf == 'o_NHD':
      keep[module] = {'heads': _heads(variable[...], sums.get(name), student.num_heads,
                                      student.num_kv_heads)}
    if leaf in ('down_FD', 'down_EFD'):
      keep[module] = {'mlp': _neurons(np.asarray(variable[...]), sums.get(name), student.d_ff)}
  keep['embed'] = _top(np.asarray(channel_energy), student.d_model)
  return keep


def narrow(value: np.ndarray, axes: tuple, keep: dict, embed: np.ndarray) -> np.ndarray:
  """``value`` cut along each of its ``axes`` that ``keep`` (or ``embed``) names; a per-expert
  index ``[E, kept]`` cuts each expert's slice along the ``expert`` axis by its own row."""
  keep = {**keep, 'embed': embed}
  for dim, axis in enumerate(axes):
    if axis not in keep:
      continue
    index = keep[axis]
    if index.ndim == 1:
      value = np.take(value, index, axis=dim)
    else:
      shape = [1] * value.ndim
      shape[axes.index('expert')], shape[dim] = index.shape
      value = np.take_along_axis(value, index.reshape(shape), axis=dim)
  return value


def _heads(o_NHD, hessian, kept: int, num_kv_heads: int) -> np.ndarray:
  heads, head_dim = o_NHD.shape[:2]
  o_NHD = np.asarray(o_NHD, np.float64)
  if hessian is None:  # no calibration row reached the layer: the weights alone
    hessian = np.eye(heads * head_dim)
  blocks = hessian.reshape(heads, head_dim, heads, head_dim)[np.arange(heads), :, np.arange(heads)]
  energy_N = np.einsum('NHI,NHD,NID->N', blocks, o_NHD, o_NHD)
  per_group, kept_per_group = heads // num_kv_heads, kept // num_kv_heads
  return np.concatenate([
      k * per_group + _top(energy_N[k * per_group:(k + 1) * per_group], kept_per_group)
      for k in range(num_kv_heads)])


def _neurons(down, hessian, kept: int) -> np.ndarray:
  """``[kept]`` for a ``down_FD``, ``[E, kept]`` for a ``down_EFD`` (an expert no row
  reached is scored by its weights alone)."""
  energy = _diagonal(hessian) if hessian is not None else np.zeros(down.shape[:-1])
  energy = np.where(energy.sum(-1, keepdims=True) > 0, energy, 1.0)
  score = energy * np.square(np.asarray(down, np.float64)).sum(-1)
  if score.ndim == 1:
    return _top(score, kept)
  return np.stack([_top(row, kept) for row in score])


def _diagonal(hessian: np.ndarray) -> np.ndarray:
  return np.diagonal(hessian, axis1=-2, axis2=-1)


def _top(score: np.ndarray, kept: int) -> np.ndarray:
  """The ``kept`` highest scores' indices, ascending (ties to the lower index)."""
  return np.sort(np.argsort(-score, kind='stable')[:kept])


def _axes(variable) -> tuple:
  return variable.get_metadata().get('out_sharding') or (None,) * variable[...].ndim


def _module(name: str) -> str:
  return name.rsplit('.', 1)[0]
