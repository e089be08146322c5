"""The batch contract: one pytree of static-shape arrays for every modality.

Text, image patches and audio frames share one sequence of ``T`` positions per row. At an
image or audio position, ``tokens`` holds that modality's placeholder id and the model takes
the next unused item of ``patches`` (or ``audio``) of that row instead, in order of
appearance. A video is a run of images with time stamps in text. Several documents may be
packed in one row: ``segment_ids`` tell them apart (0 is padding) and ``positions`` count up
by one from 0 inside each of them; attention never crosses segments.
"""

import dataclasses
import enum

import jax
import numpy as np


class Modality(enum.IntEnum):
  TEXT = 0
  IMAGE = 1
  AUDIO = 2


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
  """Shapes (B batch, T positions, P patches, A audio frames):

  tokens [B, T] int32, modality [B, T] int8, segment_ids [B, T] int32, positions [B, T] int32,
  targets [B, T] int32 (next-token ids), loss_mask [B, T] float32 (which positions count in
  the loss), patches [B, P, patch_dim] float32, audio [B, A, audio_dim] float32.
  """

  tokens: jax.Array
  modality: jax.Array
  segment_ids: jax.Array
  positions: jax.Array
  targets: jax.Array
  loss_mask: jax.Array
  patches: jax.Array
  audio: jax.Array


class BatchError(ValueError):
  """A batch that breaks the contract; the message names the field and the fix."""


def check_batch(batch: Batch, *, vocab_size: int, patch_dim: int, audio_dim: int) -> None:
  """Host-side check of a concrete batch against the contract; raises ``BatchError``.

  Inside ``jit`` nothing can be checked, and a violation would be silently wrong (an image
  position beyond ``P`` would reuse the last patch), so data pipelines call this on the host.
  """
  fields = {f.name: np.asarray(getattr(batch, f.name)) for f in dataclasses.fields(batch)}

  def fail(field, problem, fix):
    raise BatchError(f'batch.{field}: {problem}; {fix}')

  tokens = fields['tokens']
  if tokens.ndim != 2:
    fail('tokens', f'expected shape [B, T], got {tokens.shape}', 'pass token ids as a 2-D array')
  for name in ('modality', 'segment_ids', 'positions', 'targets', 'loss_mask'):
    if fields[name].shape != tokens.shape:
      fail(name, f'shape {fields[name].shape} differs from tokens {tokens.shape}',
           'give every per-position field the shape [B, T]')
  for name, dim, key in (('patches', patch_dim, 'patch_dim'), ('audio', audio_dim, 'audio_dim')):
    array = fields[name]
    if array.ndim != 3 or array.shape[0] != tokens.shape[0] or array.shape[2] != dim:
      fail(name, f'expected shape [{tokens.shape[0]}, items, {dim}], got {array.shape}',
           f'match the batch size and model.{key}')
  for name in ('tokens', 'targets'):
    if fields[name].min() < 0 or fields[name].max() >= vocab_size:
      fail(name, f'ids must lie in [0, {vocab_size}), got [{fields[name].min()}, '
                 f'{fields[name].max()}]', 'use the tokenizer that matches model.vocab_size')
  modality = fields['modality']
  if not np.isin(modality, [m.value for m in Modality]).all():
    fail('modality', f'values must be 0 (text), 1 (image) or 2 (audio), got {np.unique(modality)}',
         'mark each position with its modality')
  for name, kind, key in (('patches', Modality.IMAGE, 'data.num_patches'),
                          ('audio', Modality.AUDIO, 'data.num_audio_frames')):
    used = (modality == kind).sum(axis=1).max()
    if used > fields[name].shape[1]:
      fail('modality', f'a row has {used} {kind.name.lower()} positions but only '
                       f'{fields[name].shape[1]} items in batch.{name}',
           f'raise {key} or put fewer {kind.name.lower()} positions in a row')
  segments, positions = fields['segment_ids'], fields['positions']
  if segments.min() < 0:
    fail('segment_ids', 'negative segment id', 'use 0 for padding and 1, 2, ... for documents')
  # Positions count up by one inside a segment: a new segment starts at 0, a continuing one
  # continues. Attention's causal mask and the chunked kernel's block skipping rely on it.
  starts = np.ones_like(segments, bool)
  starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
  expected_step = np.where(starts, 0, np.concatenate(
      [np.zeros_like(positions[:, :1]), positions[:, :-1] + 1], axis=1))
  real = segments != 0
  for row in range(segments.shape[0]):
    ids = segments[row][starts[row] & real[row]]
    if len(ids) != len(np.unique(ids)):
      fail('segment_ids', f'row {row} uses a segment id for two separate runs',
           'give each packed document its own id')
  bad = real & (positions != expected_step)
  if bad.any():
    row, col = np.argwhere(bad)[0]
    fail('positions', f'row {row} position {col} is {positions[row, col]}, expected '
                      f'{expected_step[row, col]}',
         'number each document 0, 1, 2, ... and give each packed document its own segment id')
