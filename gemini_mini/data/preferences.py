"""Streams of post-training items for the preference stages: pairs (reward model, DPO) and
prompts (PPO rollouts).

``PairStream`` gives ``(chosen, rejected)``: two ``Batch``es of numpy arrays whose row ``b``
holds the same items' conversations (``modalities.conversation``) in the same segments, with
the chosen and the rejected reply (``post_training.preference_pair``: the gold judge's label,
flipped at the ``label_noise`` rate). A row packs up to ``pairs_per_row`` pairs, each its own
segment (1, 2, ... from the left; right-padded with segment 0), as many whole pairs as both
rows have room for: the scalar head reads each reply's last position and DPO sums each reply's
log-probabilities within its segment (``infer.score.reply_masks``), and since attention and
positions stay inside a segment, a pair scores the same packed or alone. Packing matters
because conversations are short beside a row sized for the longest document one.
``PromptStream`` gives one item per row with its prompt (``conversation.prompt``), which
``infer.generate`` completes.

Reading order: the stream reads items ``order(0), order(1), ...``. On ``sft`` and
``preference`` the order is an epoch-by-epoch seeded shuffle (``mixture.DocumentOrder``) and
the stream is endless; on ``eval`` it is the records in order, one pass: rows past the end are
padding (``PairStream``) or left out (``PromptStream``) and the next ``next()`` raises
``StopIteration``, so held-out accuracy is over every item once, the same on every run. A
step's global batch takes the next items in order, row by row (``PairStream``: into each row as
many as fit; ``PromptStream``: one a row), and every process computes that same layout and
keeps its own rows, so the state is the number of items read (a small JSON dict) and a run
resumes exactly, on any process count. ``last_items`` lists, per row of this process, the
items of the last batch in segment order.

A conversation that does not fit an empty row (``seq_len`` positions, ``num_patches``
patches, ``num_audio_frames`` audio frames) raises ``mixture.DataError`` naming the record and
the setting to raise: a skipped pair would bias what the reward model sees, silently.
"""

import json
from typing import Sequence

from gemini_mini.batch import Batch
from gemini_mini.data import post_training
from gemini_mini.data.mixture import DataError, DocumentOrder
from gemini_mini.modalities import conversation, interleave
from gemini_mini.modalities import text as text_lib
from gemini_mini.modalities.segments import Segment


class _Stream:
  """What both streams share: the items of a split, the reading order, rows and state."""

  def __init__(self, data_dir: str, split: str, *, batch_size: int, seed: int, subset: str,
               process_index: int, process_count: int, **config):
    if split not in post_training.SPLITS:
      raise DataError(f'split {split!r} is not a post-training split; use one of '
                      f'{post_training.SPLITS}')
    if not 0 <= process_index < process_count or batch_size % process_count:
      raise DataError(f'batch_size={batch_size} over process_count={process_count} with '
                      f'process_index={process_index}: use a batch size divisible by the '
                      'process count and 0 <= process_index < process_count')
    if not 0 <= seed < 2**32:
      raise DataError(f'seed={seed}: use 0 <= seed < 2**32')
    builder = post_training.builder(data_dir, subset)
    if not builder.is_prepared():
      raise DataError(f'the post-training items {post_training.NAME}/{subset} are not prepared '
                      f'under {data_dir}; build them with `python -m gemini_mini.data.prepare '
                      f'--subset {subset} --data-dir {data_dir}`')
    self._items = builder.as_data_source(split)
    self._order = (None if split == 'eval'
                   else DocumentOrder(len(self._items), (seed, post_training.SPLITS.index(split))))
    self._config = dict(config, stream=type(self).__name__, split=split, subset=subset,
                        batch_size=batch_size, seed=seed)
    local = batch_size // process_count
    self.rows = range(process_index * local, (process_index + 1) * local)
    self._read = 0  # items of the order read so far
    self.last_items: list[list[post_training.Item]] = []
    self.tokenizer = text_lib.Tokenizer()

  def _item(self, read: int) -> post_training.Item | None:
    """The ``read``-th item of the order; None past the end of ``eval``."""
    if self._order is None:
      return self._items[read] if read < len(self._items) else None
    return self._items[self._order(read)]

  def _start_step(self) -> None:
    if self._order is None and self._read >= len(self._items):
      raise StopIteration

  def __iter__(self):
    return self

  def get_state(self) -> dict:
    """A JSON-serialisable state: the settings and the number of items read."""
    return dict(self._config, read=self._read)

  def set_state(self, state: dict) -> None:
    """Continues exactly where the stream that gave ``state`` stopped (any process count)."""
    mismatched = {key: (state.get(key), value) for key, value in self._config.items()
                  if state.get(key) != value}
    if mismatched or not isinstance(state.get('read'), int):
      raise DataError(f'stream state does not match this stream (saved, now): '
                      f'{json.dumps(mismatched)}; resume with the same settings or start '
                      'a fresh stream')
    self._read = state['read']


class PairStream(_Stream):
  """``next()`` -> ``(chosen, rejected)`` batches of this process's rows (see the module
  docstring); each passes ``batch.check_batch``."""

  def __init__(self, data_dir: str, split: str, *, batch_size: int, seq_len: int,
               num_patches: int, num_audio_frames: int, patch_dim: int, audio_dim: int,
               seed: int, label_noise: float, pairs_per_row: int = 1, subset: str = 'full',
               process_index: int = 0, process_count: int = 1):
    """Opens the prepared post-training items.

    Args:
      data_dir: where ``python -m gemini_mini.data.prepare`` wrote the datasets.
      split: ``'preference'`` (training pairs), ``'eval'`` (held-out pairs) or ``'sft'``.
      batch_size: rows in the global batch, split evenly over processes.
      seq_len, num_patches, num_audio_frames, patch_dim, audio_dim: a row's static shapes.
      seed: the shuffle seed and the label-noise seed, in [0, 2**32).
      label_noise: the rate at which a pair's judged label is flipped (``post.label_noise``),
        in [0, 1]; applied to whatever split is read, so pass 0 to score held-out pairs
        against the gold judge.
      pairs_per_row: the most pairs packed into one row (``post.pairs_per_row``), >= 1.
      subset: ``'full'`` or ``'small'``.
      process_index, process_count: this process and how many share the global batch.

    Raises:
      DataError: naming the bad argument, or the command that prepares the items.
    """
    if not 0 <= label_noise <= 1:
      raise DataError(f'label_noise={label_noise}: use a rate in [0, 1] (post.label_noise)')
    if pairs_per_row < 1:
      raise DataError(f'pairs_per_row={pairs_per_row}: use at least 1 (post.pairs_per_row)')
    super().__init__(data_dir, split, batch_size=batch_size, seed=seed, subset=subset,
                     process_index=process_index, process_count=process_count,
                     seq_len=seq_len, label_noise=label_noise, pairs_per_row=pairs_per_row)
    self._room = (seq_len, num_patches, num_audio_frames)
    self._shapes = dict(seq_len=seq_len, num_patches=num_patches,
                        num_audio_frames=num_audio_frames, patch_dim=patch_dim,
                        audio_dim=audio_dim)

  def _flat(self, item: post_training.Item, user: Sequence[Segment], reply: str):
    flat = interleave.flatten(conversation.conversation(user, reply, self.tokenizer),
                              self.tokenizer)
    sizes = (len(flat.tokens), len(flat.patches), len(flat.audio))
    if any(size > room for size, room in zip(sizes, self._room)):
      raise DataError(
          f'the conversation of {item.split} item {item.index} ({item.kind}) takes (positions, '
          f'patches, audio frames) = {sizes} but a row holds {self._room}; raise '
          'train.seq_len, data.num_patches or data.num_audio_frames')
    return flat

  def _pair(self, item: post_training.Item):
    user = item.user_segments(self.tokenizer)
    chosen, rejected = post_training.preference_pair(item, self._config['label_noise'],
                                                     self._config['seed'])
    return self._flat(item, user, chosen), self._flat(item, user, rejected)

  def __next__(self) -> tuple[Batch, Batch]:
    self._start_step()
    rows = []  # per global row: (item, chosen, rejected) of each pair it holds
    used = None  # positions, patches and audio frames of the last row, the larger reply's
    while True:
      item = self._item(self._read)
      if item is None:  # the end of eval: the remaining rows are padding
        break
      chosen, rejected = self._pair(item)
      need = [max(len(getattr(chosen, name)), len(getattr(rejected, name)))
              for name in ('tokens', 'patches', 'audio')]
      if (used is None or len(rows[-1]) == self._config['pairs_per_row']
          or any(u + n > room for u, n, room in zip(used, need, self._room))):
        if len(rows) == self._config['batch_size']:
          break
        rows.append([])
        used = [0, 0, 0]
      rows[-1].append((item, chosen, rejected))
      used = [u + n for u, n in zip(used, need)]
      self._read += 1
    rows += [[] for _ in range(self._config['batch_size'] - len(rows))]
    mine = [rows[r] for r in self.rows]
    self.last_items = [[item for item, _, _ in row] for row in mine]
    return tuple(interleave.pack_rows([[pair[which] for pair in row] for row in mine],
                                      **self._shapes) for which in (1, 2))


class PromptStream(_Stream):
  """``next()`` -> this process's rows as ``(prompt_segments, item)`` (see the module
  docstring): the prompt is ``conversation.prompt(item.user_segments(...))``, what
  ``infer.generate`` completes and the gold judge and reward model then score."""

  def __init__(self, data_dir: str, split: str, *, batch_size: int, seed: int,
               subset: str = 'full', process_index: int = 0, process_count: int = 1):
    """Opens the prepared post-training items; the arguments are ``PairStream``'s.

    Raises:
      DataError: naming the bad argument, or the command that prepares the items.
    """
    super().__init__(data_dir, split, batch_size=batch_size, seed=seed, subset=subset,
                     process_index=process_index, process_count=process_count)

  def __next__(self) -> list[tuple[list[Segment], post_training.Item]]:
    self._start_step()
    first, self._read = self._read, self._read + self._config['batch_size']
    items = [item for r in self.rows if (item := self._item(first + r)) is not None]
    self.last_items = [[item] for item in items]
    return [(conversation.prompt(item.user_segments(self.tokenizer), self.tokenizer), item)
            for item in items]
