"""Packs tokenized documents into fixed-length rows of the batch contract.

A row of T positions is filled from a stream of documents (each ``[L] int32``, usually
bos + text + eos): documents are laid out one after another, and the one that does not fit
is cut, its rest starting the next row of the same stream. Each piece in a row is its own
segment (ids 1, 2, ... from the left; 0 is padding) with positions counting from 0, so
attention and RoPE never see across a cut. ``targets`` is the next token of the same
segment and ``loss_mask`` is 1 exactly where that target exists and is text: never on
padding, never on the last position of a segment.

The row layout itself is ``modalities.interleave.row_fields``, shared with the image/audio
interleaver; the text corpus has no images or audio, so ``modality`` is all text and
``patches``/``audio`` are zeros of their static shapes.
"""

import dataclasses
from typing import Callable, Sequence

import numpy as np

from gemini_mini.batch import Batch, Modality
from gemini_mini.modalities import interleave


@dataclasses.dataclass(frozen=True)
class Cursor:
  """A place in a document stream: document ``index``, of which ``offset`` tokens are used."""

  index: int = 0
  offset: int = 0


def take_pieces(read_document: Callable[[int], np.ndarray], cursor: Cursor, seq_len: int
                ) -> tuple[list[np.ndarray], Cursor]:
  """Takes the next ``seq_len`` tokens of an endless document stream, cut at documents.

  Args:
    read_document: ``read_document(i)`` is the i-th document of the stream, ``[L_i] int32``.
    cursor: where the previous row stopped.
    seq_len: T, tokens to take.

  Returns:
    ``(pieces, cursor)``: pieces of consecutive documents, ``sum(len) == seq_len``, each a
    slice of one document (the first may continue a cut document, the last may be cut);
    and the cursor just after them.
  """
  pieces, room = [], seq_len
  index, offset = cursor.index, cursor.offset
  while room:
    document = read_document(index)
    piece = document[offset:offset + room]
    pieces.append(piece)
    room -= len(piece)
    offset += len(piece)
    if offset >= len(document):
      index, offset = index + 1, 0
  return [piece for piece in pieces if len(piece)], Cursor(index, offset)


def pack_row(pieces: Sequence[np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
  """Lays text pieces left to right in one row, each its own segment; pads the rest.

  Args:
    pieces: token arrays ``[L_i] int32``, ``sum(L_i) <= seq_len``.
    seq_len: T.

  Returns:
    The per-position fields of ``Batch`` for one row (``interleave.row_fields``), each
    ``[T]``, with ``modality`` all text.
  """
  used = sum(len(piece) for piece in pieces)
  if used > seq_len:
    raise ValueError(f'pieces hold {used} tokens but a row has seq_len={seq_len}; '
                     'cut them with take_pieces')
  text = [np.full(len(piece), Modality.TEXT, np.int8) for piece in pieces]
  return interleave.row_fields(pieces, text, seq_len)


def stack_rows(rows: Sequence[dict[str, np.ndarray]], *, num_patches: int, patch_dim: int,
               num_audio_frames: int, audio_dim: int) -> Batch:
  """Stacks ``pack_row`` outputs into a ``Batch`` of numpy arrays.

  Returns:
    A ``Batch`` with B = len(rows): per-position fields ``[B, T]``, ``patches`` zeros
    ``[B, num_patches, patch_dim]`` and ``audio`` zeros ``[B, num_audio_frames, audio_dim]``
    float32 (no image or audio positions yet).
  """
  fields = {name: np.stack([row[name] for row in rows]) for name in rows[0]}
  return Batch(**fields,
               patches=np.zeros((len(rows), num_patches, patch_dim), np.float32),
               audio=np.zeros((len(rows), num_audio_frames, audio_dim), np.float32))
