"""Segments -> the batch contract: flatten one example, then pack examples into rows.

``flatten(segments, tokenizer)`` lays one example out as flat arrays: text ids as they are,
each image as ``<begin_image>`` + one ``<image>`` placeholder per patch + ``<end_image>``,
each audio clip as ``<begin_audio>`` + one ``<audio>`` placeholder per frame + ``<end_audio>``;
the brackets are text positions, the placeholders image/audio positions, and the patches and
frames are kept in order of appearance.

``pack_rows`` lays out rows whose examples are already chosen (the training mixture,
``data.mixture``, chooses them); ``pack_examples`` fills rows left to right with whole examples, in order (next fit: an
example that does not fit in what is left of the row, in positions, patches or audio frames,
starts the next row). Example k of a row is segment k + 1 with positions 0, 1, ...; padding
is segment 0. ``targets`` is the next token of the same segment (0 elsewhere) and
``loss_mask`` is 1 exactly where that target exists and is a scored text position (text or
an image's or clip's bracket, of a segment made with ``loss=True``, the default): the model never learns to predict
placeholders, and nothing is predicted across examples. An example that
can never fit (longer than ``seq_len``, or with more patches or frames than a row holds) is
rejected, not truncated: a cut image or clip would be meaningless.
"""

import dataclasses
from typing import Sequence

import numpy as np

from gemini_mini.batch import Batch, Modality
from gemini_mini.modalities.segments import Segment


@dataclasses.dataclass(frozen=True, eq=False)
class FlatExample:
  """One example laid out flat (L positions, P patches, A audio frames).

  Attributes:
    tokens: ``[L] int32``, placeholder ids at image and audio positions.
    modality: ``[L] int8`` (``Modality``).
    patches: ``[P, I] float32``, one row per image position in order (``[0, 0]`` if none).
    audio: ``[A, I] float32``, one row per audio position in order (``[0, 0]`` if none).
    scored: ``[L] bool``, the positions training predicts: text and image and audio
      brackets of ``loss=True`` segments, never placeholders.
  """

  tokens: np.ndarray
  modality: np.ndarray
  patches: np.ndarray
  audio: np.ndarray
  scored: np.ndarray


def flatten(segments: Sequence[Segment], tokenizer) -> FlatExample:
  """One example's segments -> ``FlatExample``.

  Args:
    segments: the example in reading order.
    tokenizer: gives ``image_id``, ``audio_id``, ``begin_image_id``, ``end_image_id``,
      ``begin_audio_id`` and ``end_audio_id`` (a ``text.Tokenizer``).

  Raises:
    ValueError: an item that is not a ``Segment``, a text segment holding a placeholder id,
      or images (clips) of different feature widths.
  """
  placeholder = {'image': (tokenizer.image_id, Modality.IMAGE,
                           tokenizer.begin_image_id, tokenizer.end_image_id),
                 'audio': (tokenizer.audio_id, Modality.AUDIO,
                           tokenizer.begin_audio_id, tokenizer.end_audio_id)}
  tokens, modality, scored, items = [], [], [], {'image': [], 'audio': []}
  for index, segment in enumerate(segments):
    if not isinstance(segment, Segment):
      raise ValueError(f'example item {index} is a {type(segment).__name__}, not a Segment; '
                       'wrap it with Segment.text/image/audio')
    if segment.kind == 'text':
      stray = np.isin(segment.data, [i for i in (tokenizer.image_id, tokenizer.audio_id)
                                     if i is not None])
      if stray.any():
        raise ValueError(f'text segment {index} holds an <image>/<audio> placeholder id; pass '
                         'images and audio as Segment.image / Segment.audio instead')
      tokens.append(segment.data)
      modality.append(np.full(len(segment.data), Modality.TEXT, np.int8))
      scored.append(np.full(len(segment.data), segment.loss))
      continue
    token_id, kind, begin, end = placeholder[segment.kind]
    if token_id is None:
      raise ValueError(f'segment {index} is {segment.kind}, which this tokenizer (another '
                       'model\'s, text alone) has no placeholder for; pass text segments')
    count = len(segment.data)
    tokens.append(np.array([begin] + [token_id] * count + [end], np.int32))
    modality.append(np.array([Modality.TEXT] + [kind] * count + [Modality.TEXT], np.int8))
    scored.append(np.array([segment.loss] + [False] * count + [segment.loss]))
    items[segment.kind].append(segment.data)

  def stack(kind):
    widths = {item.shape[1] for item in items[kind]}
    if len(widths) > 1:
      raise ValueError(f'{kind} segments of one example have feature widths {sorted(widths)}; '
                       'build them all with the same settings')
    return np.concatenate(items[kind]) if items[kind] else np.zeros((0, 0), np.float32)

  return FlatExample(
      tokens=np.concatenate(tokens).astype(np.int32) if tokens else np.zeros(0, np.int32),
      modality=np.concatenate(modality) if modality else np.zeros(0, np.int8),
      patches=stack('image'), audio=stack('audio'),
      scored=np.concatenate(scored) if scored else np.zeros(0, bool))


def _check_fits(index: int, example: FlatExample, seq_len: int, num_patches: int,
                num_audio_frames: int, patch_dim: int, audio_dim: int) -> None:
  size = len(example.tokens)
  if size == 0:
    raise ValueError(f'example {index} is empty; drop it')
  if size > seq_len:
    raise ValueError(f'example {index} takes {size} positions but a row has seq_len={seq_len}; '
                     'raise train.seq_len or split the example')
  for name, items, room, dim, keys in (
      ('patches', example.patches, num_patches, patch_dim, ('data.num_patches', 'model.patch_dim')),
      ('audio frames', example.audio, num_audio_frames, audio_dim,
       ('data.num_audio_frames', 'model.audio_dim'))):
    if len(items) > room:
      raise ValueError(f'example {index} has {len(items)} {name} but a row holds {room}; '
                       f'raise {keys[0]} or split the example')
    if len(items) and items.shape[1] != dim:
      raise ValueError(f'example {index} has {name} of width {items.shape[1]}, expected {dim}; '
                       f'build them for {keys[1]} = {dim}')


def row_fields(tokens: Sequence[np.ndarray], modality: Sequence[np.ndarray], seq_len: int,
               scored: Sequence[np.ndarray] | None = None) -> dict[str, np.ndarray]:
  """Per-position fields ``[T]`` of one row holding pieces left to right, each its own segment.

  Piece i (``tokens[i]`` and ``modality[i]``, ``[L_i]``) is segment i + 1 with positions
  0, 1, ...; the rest is padding (segment 0). ``targets`` is the next token of the same
  segment (else 0) and ``loss_mask`` is 1 exactly where that target exists, is text and is
  scored (``scored[i]``, ``[L_i] bool``; None scores every text position).
  """
  lengths = np.array([len(piece) for piece in tokens], np.int64)
  used = int(lengths.sum())
  if used > seq_len:
    raise ValueError(f'pieces hold {used} tokens but a row has seq_len={seq_len}')
  fields = {name: np.zeros(seq_len, dtype) for name, dtype in (
      ('tokens', np.int32), ('modality', np.int8), ('segment_ids', np.int32),
      ('positions', np.int32))}
  if used:
    fields['tokens'][:used] = np.concatenate(tokens)
    fields['modality'][:used] = np.concatenate(modality)
    fields['segment_ids'][:used] = np.repeat(np.arange(1, len(tokens) + 1), lengths)
    fields['positions'][:used] = np.arange(used) - np.repeat(np.cumsum(lengths) - lengths, lengths)
  is_scored = np.zeros(seq_len, bool)
  is_scored[:used] = np.concatenate(scored) if scored is not None and used else True
  segment_ids = fields['segment_ids']
  has_target = np.zeros(seq_len, bool)
  has_target[:-1] = (segment_ids[:-1] != 0) & (segment_ids[1:] == segment_ids[:-1])
  target_is_text = np.append(fields['modality'][1:] == Modality.TEXT, False)
  target_is_scored = np.append(is_scored[1:], False)
  fields['targets'] = np.where(has_target, np.roll(fields['tokens'], -1), 0).astype(np.int32)
  fields['loss_mask'] = (has_target & target_is_text & target_is_scored).astype(np.float32)
  return fields


def pack_rows(rows: Sequence[Sequence[FlatExample]], *, seq_len: int, num_patches: int,
              num_audio_frames: int, patch_dim: int, audio_dim: int) -> Batch:
  """Lays out rows already chosen: row b holds ``rows[b]``'s examples left to right.

  Args:
    rows: per row, the examples (or text pieces) it holds, each its own segment; together
      at most ``seq_len`` positions, ``num_patches`` patches and ``num_audio_frames`` frames.
    seq_len, num_patches, num_audio_frames, patch_dim, audio_dim: T, P, A and item widths.

  Returns:
    A ``Batch`` of numpy arrays, B = len(rows): per-position fields ``[B, T]``
    (``row_fields``), ``patches [B, P, patch_dim]`` and ``audio [B, A, audio_dim]`` holding
    each row's items in order, zeros after them.
  """
  patches = np.zeros((len(rows), num_patches, patch_dim), np.float32)
  audio = np.zeros((len(rows), num_audio_frames, audio_dim), np.float32)
  fields = []
  for b, row in enumerate(rows):
    for name, out in (('patches', patches[b]), ('audio', audio[b])):
      items = [getattr(example, name) for example in row if len(getattr(example, name))]
      if items:
        items = np.concatenate(items)
        if len(items) > len(out):
          raise ValueError(f'row {b} holds {len(items)} {name} items but a row has room for '
                           f'{len(out)}; choose fewer examples for it')
        out[:len(items)] = items
    fields.append(row_fields([example.tokens for example in row],
                             [example.modality for example in row], seq_len,
                             [example.scored for example in row]))
  return Batch(**{name: np.stack([row[name] for row in fields]) for name in fields[0]},
               patches=patches, audio=audio)


def pack_examples(examples: Sequence[FlatExample], *, batch_size: int, seq_len: int,
                  num_patches: int, num_audio_frames: int, patch_dim: int, audio_dim: int
                  ) -> tuple[Batch, int]:
  """Packs a prefix of ``examples``, in order, into one ``Batch`` of numpy arrays.

  Args:
    examples: ``flatten`` outputs, in the order they should be consumed.
    batch_size, seq_len: B and T.
    num_patches, num_audio_frames: P and A, the items a row holds.
    patch_dim, audio_dim: the item widths (``model.patch_dim``, ``model.audio_dim``).

  Returns:
    ``(batch, count)``: the batch (``pack_rows``) holds ``examples[:count]`` whole;
    ``examples[count:]`` did not fit in B rows and belong to the next batch. Rows after the
    last used one are all padding. The batch passes ``batch.check_batch``.

  Raises:
    ValueError: naming the example that is empty or can never fit in a row.
  """
  if min(batch_size, seq_len) <= 0:
    raise ValueError(f'batch_size ({batch_size}) and seq_len ({seq_len}) must be positive')
  rows, used = [[]], (0, 0, 0)  # used: positions, patches, audio frames of the last row
  count = 0
  for index, example in enumerate(examples):
    _check_fits(index, example, seq_len, num_patches, num_audio_frames, patch_dim, audio_dim)
    need = (len(example.tokens), len(example.patches), len(example.audio))
    if any(u + n > room for u, n, room in zip(used, need, (seq_len, num_patches,
                                                          num_audio_frames))):
      if len(rows) == batch_size:
        break
      rows.append([])
      used = (0, 0, 0)
    rows[-1].append(example)
    used = tuple(u + n for u, n in zip(used, need))
    count += 1
  rows += [[] for _ in range(batch_size - len(rows))]
  batch = pack_rows(rows, seq_len=seq_len, num_patches=num_patches,
                    num_audio_frames=num_audio_frames, patch_dim=patch_dim, audio_dim=audio_dim)
  return batch, count
