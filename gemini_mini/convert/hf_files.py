"""Hugging Face-format checkpoint directories: ``config.json`` plus safetensors weights.

Read: one ``model.safetensors``, or shards listed by ``model.safetensors.index.json``'s
``weight_map``, or shards without an index (every ``*.safetensors`` in the directory). The
files are memory-mapped by safetensors' numpy API and a tensor is read when asked for, one at
a time, so reading a model never holds it twice. Written: shards of at most ``shard_bytes``
with an index, into a temporary directory renamed into place when complete.

Every unreadable input raises ``HFFormatError`` naming the file, the tensor or the config key,
and the fix.
"""

import json
import os
import pathlib
import shutil

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

CONFIG = 'config.json'
INDEX = 'model.safetensors.index.json'


class HFFormatError(ValueError):
  """An unusable Hugging Face-format directory; the message names the problem and the fix."""


class HFCheckpoint:
  """``config`` (the parsed ``config.json``), ``names`` (every tensor's name) and
  ``tensor(name)`` of a Hugging Face-format directory."""

  def __init__(self, directory: str | pathlib.Path):
    self.directory = pathlib.Path(directory)
    if not self.directory.is_dir():
      raise HFFormatError(f'{self.directory}: no such directory; pass the directory holding '
                          f'{CONFIG} and the *.safetensors weights')
    self.config = _read_json(self.directory / CONFIG, 'the model config')
    self._file_of = self._tensor_files()
    self._shapes = {}
    for name in sorted(set(self._file_of.values())):
      with self._opened(name) as handle:
        listed = {t for t, f in self._file_of.items() if f == name}
        missing = listed - set(handle.keys())
        if missing:
          raise HFFormatError(f'{self.directory / INDEX} lists {sorted(missing)[:3]} in '
                              f'{name}, which does not hold them; download the shards and '
                              'index again')
        self._shapes.update({t: tuple(handle.get_slice(t).get_shape()) for t in listed})
    if not self._file_of:
      raise HFFormatError(f'{self.directory}: no *.safetensors weights; gemini_mini reads '
                          'safetensors only (convert *.bin files with transformers first)')

  def _tensor_files(self) -> dict[str, str]:
    """``{tensor name: file name}`` from the index, or from every ``*.safetensors``."""
    index = self.directory / INDEX
    if index.exists():
      weight_map = _read_json(index, 'the shard index').get('weight_map')
      if not isinstance(weight_map, dict):
        raise HFFormatError(f'{index}: no "weight_map" object; download the index again')
      absent = sorted({f for f in weight_map.values() if not (self.directory / f).is_file()})
      if absent:
        raise HFFormatError(f'{index} names shards that are not in {self.directory}: '
                            f'{absent[:3]}; download them')
      return dict(weight_map)
    file_of = {}
    for path in sorted(self.directory.glob('*.safetensors')):
      try:
        with safe_open(path, framework='np') as handle:
          keys = list(handle.keys())
      except (SafetensorError, OSError) as error:
        raise HFFormatError(f'{path}: not a readable safetensors file ({error}); it may be '
                            'truncated: download it again') from error
      for key in keys:
        if key in file_of:
          raise HFFormatError(f'{key} is in both {file_of[key]} and {path.name}; keep one '
                              'copy of the weights in the directory')
        file_of[key] = path.name
    return file_of

  @property
  def names(self) -> set[str]:
    return set(self._file_of)

  def shape(self, name: str) -> tuple[int, ...]:
    self._check(name)
    return self._shapes[name]

  def tensor(self, name: str, index=...) -> np.ndarray:
    """The tensor ``name``, or its ``[index]`` part alone (``(3, slice(0, 8))``), read from
    its file now. The file is mapped for this read only: its pages leave the process's
    memory once the tensor is copied out."""
    self._check(name)
    with self._opened(self._file_of[name]) as handle:
      return handle.get_slice(name)[index]

  def _check(self, name: str) -> None:
    if name not in self._file_of:
      raise HFFormatError(f'{self.directory}: the weights lack the tensor {name}; the '
                          'checkpoint is incomplete or of another architecture')

  def _opened(self, file_name: str):
    path = self.directory / file_name
    try:
      return safe_open(path, framework='np')
    except (SafetensorError, OSError) as error:
      raise HFFormatError(f'{path}: not a readable safetensors file ({error}); it may be '
                          'truncated: download it again') from error


def _read_json(path: pathlib.Path, what: str) -> dict:
  try:
    value = json.loads(path.read_text())
  except FileNotFoundError as error:
    raise HFFormatError(f'{path}: missing {what}; a Hugging Face model directory holds '
                        f'{CONFIG} beside its weights') from error
  except (OSError, ValueError) as error:
    raise HFFormatError(f'{path}: cannot read {what} ({error}); download it again') from error
  if not isinstance(value, dict):
    raise HFFormatError(f'{path}: {what} is not a JSON object; download it again')
  return value


def write(directory: str | pathlib.Path, config: dict, tensors, *, shard_bytes: int,
          extra_files: tuple[pathlib.Path, ...] = ()) -> list[str]:
  """Writes ``config`` and the ``(name, array)`` pairs of the iterable ``tensors`` as
  safetensors shards of at most ``shard_bytes`` (a larger tensor gets a shard of its own),
  with an index when there is more than one, plus copies of ``extra_files``. Holds one shard
  at a time. Returns the shard names.

  Atomic: everything goes to ``DIR.tmp`` first, renamed to ``DIR`` when complete; an existing
  ``DIR`` is refused.
  """
  directory = pathlib.Path(directory)
  if directory.exists():
    raise HFFormatError(f'{directory} exists; pass a new --out directory')
  staging = directory.with_name(directory.name + '.tmp')
  shutil.rmtree(staging, ignore_errors=True)
  staging.mkdir(parents=True)
  shards, weight_map, shard, size, total = [], {}, {}, 0, 0

  def flush():
    name = f'shard-{len(shards):05d}.safetensors'
    save_file(shard, str(staging / name), metadata={'format': 'pt'})
    weight_map.update({key: name for key in shard})
    shards.append(name)

  for name, array in tensors:
    array = np.ascontiguousarray(array)
    if shard and size + array.nbytes > shard_bytes:
      flush()
      shard, size = {}, 0
    shard[name], size, total = array, size + array.nbytes, total + array.nbytes
  if shard:
    flush()
  if len(shards) == 1:
    os.rename(staging / shards[0], staging / 'model.safetensors')
    shards = ['model.safetensors']
  else:
    renamed = {old: f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
               for i, old in enumerate(shards)}
    for old, new in renamed.items():
      os.rename(staging / old, staging / new)
    weight_map = {key: renamed[name] for key, name in weight_map.items()}
    shards = list(renamed.values())
    (staging / INDEX).write_text(json.dumps(
        {'metadata': {'total_size': total}, 'weight_map': weight_map}, indent=2, sort_keys=True))
  (staging / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + '\n')
  for path in extra_files:
    shutil.copyfile(path, staging / path.name)
  os.rename(staging, directory)
  return shards
