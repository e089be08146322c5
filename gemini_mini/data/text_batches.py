"""A deterministic, resumable, process-sharded iterator of packed text ``Batch``es.

Documents come from the TFDS array_record source in an endless stream: epoch ``e`` is the
permutation of all documents drawn from ``(seed, e)``, so document ``n`` of the stream is
a pure function of ``(seed, n)``. Global row ``r`` of every batch reads its own stream,
positions ``r, r + B, r + 2B, ...``, and ``packing`` fills it T tokens at a time, a cut
document continuing in the same row of the next batch. So:

* a row's content depends only on ``(seed, r, step)``: process ``p`` of ``n`` computes
  rows ``[p * B/n, (p + 1) * B/n)`` of exactly the global batch a single process would,
  whatever ``n`` is, and within an epoch no document is read by two rows;
* a long document runs down one row over successive batches instead of filling a batch;
* the state is one cursor per row (stream index, tokens used), a small JSON dict.

Why not grain (``MapDataset`` and its iterator state): the state that matters is the
packer's carry (the rest of a cut document) per row, which grain's iterator state does not
hold; grain's ``ConcatThenSplitIterDataset`` keeps one carry per process, coupling the rows
of a batch to each other and to the process count. And grain reads one record at a time
(about 250 us a document here) where the source's ``__getitems__`` reads many in one call
(about 40 us each). What grain would add, a seeded shuffle per epoch, is ``DocumentOrder``.
"""

import json

import numpy as np

from gemini_mini.batch import Batch
from gemini_mini.data import packing, text_corpus
from gemini_mini.modalities import text as text_lib

READ_AHEAD = 64  # documents a row fetches in one read


class DocumentOrder:
  """Stream position -> document index: epoch by epoch, a seeded permutation of them all.

  ``order(n)`` is document ``permutation(seed, e)[n % N]`` of epoch ``e = n // N``
  (``numpy.random.default_rng([seed, e])``), so every epoch visits each of the N documents
  once, in a new order.
  """

  def __init__(self, num_documents: int, seed: int):
    self._num_documents, self._seed = num_documents, seed
    self._epochs = {}  # a few recent epochs' permutations (rows may be in different epochs)

  def __call__(self, position: int) -> int:
    epoch, index = divmod(position, self._num_documents)
    if epoch not in self._epochs:
      if len(self._epochs) >= 4:
        del self._epochs[min(self._epochs)]
      self._epochs[epoch] = np.random.default_rng([self._seed, epoch]).permutation(
          self._num_documents)
    return int(self._epochs[epoch][index])


class DataError(ValueError):
  """Missing data or a bad argument or state; the message names the problem and the fix."""


class TextBatches:
  """Packed text batches for one process; ``next()`` gives a ``Batch`` of numpy arrays.

  Each batch has ``batch_size // process_count`` rows of ``seq_len`` positions: tokens,
  modality, segment_ids, positions, targets, loss_mask ``[B_local, T]``, patches zeros
  ``[B_local, num_patches, patch_dim]``, audio zeros ``[B_local, num_audio_frames,
  audio_dim]``. It passes ``gemini_mini.batch.check_batch``. Endless (epochs repeat with
  new shuffles).
  """

  def __init__(self, data_dir: str, split: str, batch_size: int, seq_len: int, seed: int,
               process_index: int = 0, process_count: int = 1, *, num_patches: int,
               num_audio_frames: int, patch_dim: int, audio_dim: int, subset: str = 'full'):
    """Opens the prepared corpus.

    Args:
      data_dir: where ``python -m gemini_mini.data.prepare`` wrote the datasets.
      split: ``'train'``, ``'eval'`` or ``'long'``.
      batch_size: rows in the global batch, split evenly over processes.
      seq_len: T, positions per row.
      seed: the shuffle seed, in [0, 2**32).
      process_index, process_count: this process and how many share the global batch.
      num_patches, num_audio_frames, patch_dim, audio_dim: static shapes of the (empty)
        image and audio fields.
      subset: ``'full'`` or ``'small'``, the prepared config to read.
    """
    if not 0 <= process_index < process_count or batch_size % process_count:
      raise DataError(f'batch_size={batch_size} over process_count={process_count} with '
                      f'process_index={process_index}: use a batch size divisible by the '
                      'process count and 0 <= process_index < process_count')
    if seq_len < 2 or not 0 <= seed < 2**32:
      raise DataError(f'seq_len={seq_len}, seed={seed}: use seq_len >= 2 and 0 <= seed < 2**32')
    builder = text_corpus.builder(data_dir, subset)
    if not builder.is_prepared():
      raise DataError(f'no prepared text corpus {subset!r} under {data_dir}; build it with '
                      f'`python -m gemini_mini.data.prepare --subset {subset} '
                      f'--data-dir {data_dir}`')
    if split not in builder.info.splits:
      raise DataError(f'split {split!r} is not in the text corpus; use one of '
                      f'{sorted(builder.info.splits)}')
    self._data_path = builder.data_dir
    self._source = builder.as_data_source(split)
    if not len(self._source):
      raise DataError(f'split {split!r} of {builder.data_dir} is empty; rebuild it with '
                      f'`python -m gemini_mini.data.prepare --subset {subset}`')
    self._order = DocumentOrder(len(self._source), seed)
    self._tokenizer = text_lib.Tokenizer()
    rows_per_process = batch_size // process_count
    self.rows = range(process_index * rows_per_process, (process_index + 1) * rows_per_process)
    self._cursors = {row: packing.Cursor() for row in self.rows}
    self._texts = {row: {} for row in self.rows}  # row -> {stream index: text} read ahead
    self._current = {}  # row -> (stream index, tokens) of the document it is in
    self._config = dict(split=split, subset=subset, batch_size=batch_size, seq_len=seq_len,
                        seed=seed)
    self._shapes = dict(num_patches=num_patches, patch_dim=patch_dim,
                        num_audio_frames=num_audio_frames, audio_dim=audio_dim)

  def _read(self, row: int, index: int) -> np.ndarray:
    """Document ``index`` of ``row``'s stream as ``[L] int32``: bos + text + eos."""
    if self._current.get(row, (None,))[0] == index:
      return self._current[row][1]
    if index not in self._texts[row]:  # cursors only move forward: drop what is behind
      indices = range(index, index + READ_AHEAD)
      documents = [self._order(row + i * self._config['batch_size']) for i in indices]
      try:
        examples = self._source.__getitems__(documents)
      except RuntimeError as error:  # array_record: 'Corrupted Riegeli/records file ...'
        raise DataError(
            f'the prepared data in {self._data_path} cannot be read ({error}); delete that '
            f'directory and rebuild it with `python -m gemini_mini.data.prepare --subset '
            f'{self._config["subset"]}`') from error
      self._texts[row] = {i: example['text'] for i, example in zip(indices, examples)}
    ids = self._tokenizer.encode(self._texts[row].pop(index).decode('utf-8'))
    tokens = np.concatenate([[self._tokenizer.bos_id], ids, [self._tokenizer.eos_id]])
    self._current[row] = (index, tokens.astype(np.int32))
    return self._current[row][1]

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    rows = []
    for row in self.rows:
      pieces, self._cursors[row] = packing.take_pieces(
          lambda index, row=row: self._read(row, index), self._cursors[row],
          self._config['seq_len'])
      rows.append(packing.pack_row(pieces, self._config['seq_len']))
    return packing.stack_rows(rows, **self._shapes)

  def get_state(self) -> dict:
    """A JSON-serialisable state: the settings and each owned row's ``[row, index, offset]``."""
    return dict(self._config, rows=[[row, cursor.index, cursor.offset]
                                    for row, cursor in self._cursors.items()])

  def set_state(self, state: dict) -> None:
    """Continues exactly where the iterator that gave ``state`` stopped.

    ``state`` may hold more rows than this process owns (e.g. the states of all processes
    merged), so a run can resume on another process count.
    """
    mismatched = {key: (state.get(key), value) for key, value in self._config.items()
                  if state.get(key) != value}
    if mismatched:
      raise DataError(f'iterator state does not match this iterator (saved, now): '
                      f'{json.dumps(mismatched)}; resume with the same settings or start '
                      'a fresh iterator')
    cursors = {row: packing.Cursor(index, offset) for row, index, offset in state['rows']}
    missing = [row for row in self.rows if row not in cursors]
    if missing:
      raise DataError(f'iterator state has no cursor for rows {missing}; pass the state '
                      'saved by the process that owned them (or all states merged)')
    self._cursors = {row: cursors[row] for row in self.rows}
    self._texts = {row: {} for row in self.rows}
    self._current = {}
