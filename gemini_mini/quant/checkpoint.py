"""The quantized checkpoint: a directory that ``infer.load.load`` reads like a run.

    DIR/config.json        the source run's saved config, plus a ``quantization`` record:
                           bits, group, method, the source run directory and step
    DIR/model.safetensors  for each float parameter its float32 tensor under its path
                           (``text.embedding_VD``); for each quantized weight ``PATH.qvalue``,
                           its integers (int4: two per byte, ``pack.py``; int8: one per byte),
                           and ``PATH.scale``, its float32 scales

safetensors (through its numpy API) stores named arrays with no code in the file. The
directory is written beside the target and renamed into place, so a reader never sees half
of it. The model's shapes come from the config; reading checks every tensor against them
and the scales against the recorded group.
"""

import json
import math
import os
import pathlib
import tempfile

import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx
from safetensors.numpy import load_file, save_file

from gemini_mini import config as config_lib
from gemini_mini.checkpoint import CheckpointError
from gemini_mini.model import Decoder
from gemini_mini.quant import pack, rtn
from gemini_mini.quant.model import layout, quantizable, variables

CONFIG, TENSORS = 'config.json', 'model.safetensors'


def is_quantized(directory: str | pathlib.Path) -> bool:
  return (pathlib.Path(directory) / CONFIG).is_file()


def tensors(decoder: Decoder) -> dict[str, np.ndarray]:
  """The file's tensors for a decoder, quantized or not."""
  out = {}
  for name, variable in variables(decoder).items():
    value = variable[...]
    if isinstance(value, qwix.QArray):
      q = np.asarray(value.qvalue.astype(jnp.int8))
      out[f'{name}.qvalue'] = pack.pack_int4(q) if value.qtype == jnp.int4 else q
      out[f'{name}.scale'] = np.asarray(value.scale, np.float32)
    else:
      out[name] = np.asarray(value, np.float32)
  return out


def save(directory: str | pathlib.Path, decoder: Decoder, saved_config: dict,
         record: dict) -> dict[str, np.ndarray]:
  """Writes ``decoder`` with ``saved_config`` and the ``quantization`` ``record``; returns
  the tensors written.

  Raises:
    CheckpointError: ``directory`` exists (nothing there is touched).
  """
  directory = pathlib.Path(directory).absolute()
  if directory.exists():
    raise CheckpointError(f'{directory} exists; pass another --out, or move it away first')
  directory.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f'.{directory.name}.', dir=directory.parent))
  (staging / CONFIG).write_text(json.dumps({**saved_config, 'quantization': record}, indent=2))
  stored = tensors(decoder)
  save_file(stored, staging / TENSORS)
  os.rename(staging, directory)
  return stored


def load(directory: str | pathlib.Path, overrides=()) -> tuple[Decoder, config_lib.Config, dict]:
  """``(decoder, config, quantization record)``; ``overrides`` as for a run.

  Raises:
    CheckpointError: an unreadable file, a missing or unexpected tensor, a tensor whose shape
      the config's model does not build, or scales of another group than recorded.
    ConfigError: a bad override.
  """
  directory = pathlib.Path(directory).absolute()
  saved = json.loads((directory / CONFIG).read_text())
  record = saved.pop('quantization')
  for override in overrides:
    section, name, value = config_lib.parse_override(override)
    saved.setdefault(section, {})[name] = value
  config = config_lib.from_dict(saved, f'{directory / CONFIG} (+ overrides)')
  rewrite = (f'write it again with python -m gemini_mini.quantize --checkpoint '
             f'{record["source"]} --bits {record["bits"]} --group {record["group"]} '
             f'--method {record["method"]} --out NEW_DIR')
  try:
    stored = load_file(directory / TENSORS)
  except Exception as error:  # safetensors raises its own error types, OSError, ...
    raise CheckpointError(f'{directory / TENSORS}: cannot read it ({error}); if it is '
                          f'truncated or damaged, {rewrite}') from error
  decoder = nnx.eval_shape(lambda: Decoder(config.model, rngs=nnx.Rngs(0)))
  expected = _expected(decoder, record['bits'], record['group'])
  _check(directory, stored, expected, record['group'], rewrite)
  weights = quantizable(decoder)
  for name, variable in variables(decoder).items():
    if name in weights:
      variable.set_value(_qarray(stored, name, variable.shape, record['bits']))
    else:
      variable.set_value(jnp.asarray(stored[name]))
  return decoder, config, record


def _expected(decoder, bits: int, group: int) -> dict[str, tuple[int, ...]]:
  """``{tensor name: shape}`` the file must hold for ``decoder``'s config."""
  weights = quantizable(decoder)
  expected = {}
  for name, variable in variables(decoder).items():
    shape = tuple(variable.shape)
    if name not in weights:
      expected[name] = shape
      continue
    expected[f'{name}.qvalue'] = ((math.prod(shape) + 1) // 2,) if bits == 4 else shape
    expected[f'{name}.scale'] = tuple(rtn.scale_shape(shape, *layout(variable), group, name))
  return expected


def _check(directory, stored: dict, expected: dict, group: int, rewrite: str) -> None:
  missing = sorted(expected.keys() - stored.keys())
  unexpected = sorted(stored.keys() - expected.keys())
  if missing or unexpected:
    raise CheckpointError(f'{directory / TENSORS}: missing tensors {missing}, unexpected '
                          f'{unexpected} for the model {CONFIG} describes; {rewrite}')
  for name, shape in expected.items():
    if stored[name].shape == shape:
      continue
    if name.endswith('.scale'):
      raise CheckpointError(
          f'{directory / TENSORS}: {name} has shape {stored[name].shape}, but a group of '
          f'{group} (recorded in {CONFIG}) gives {shape}: the file was written with another '
          f'group; {rewrite}')
    raise CheckpointError(
        f'{directory / TENSORS}: {name} has shape {stored[name].shape}, but the model of '
        f'{CONFIG} (with any overrides) builds {shape}; drop overrides that change the model, '
        f'or {rewrite}')


def _qarray(stored: dict, name: str, shape, bits: int) -> qwix.QArray:
  qvalue = stored[f'{name}.qvalue']
  if bits == 4:
    qvalue = pack.unpack_int4(qvalue, shape)
  return qwix.QArray(jnp.asarray(qvalue).astype(rtn.qtype(bits)),
                     jnp.asarray(stored[f'{name}.scale']), qtype=rtn.qtype(bits))


def sizes(stored: dict[str, np.ndarray], decoder: Decoder) -> tuple[int, int]:
  """``(stored bytes, float32 bytes)`` of the quantized weights among ``stored`` tensors."""
  shapes = {name: variable.shape for name, variable in quantizable(decoder).items()}
  return (sum(stored[f'{n}.qvalue'].nbytes + stored[f'{n}.scale'].nbytes for n in shapes),
          sum(4 * math.prod(shape) for shape in shapes.values()))
