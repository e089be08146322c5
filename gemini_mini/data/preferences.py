"""Streams of post-training items for the preference stages: pairs (reward model, DPO) and
prompts (PPO rollouts).

``PairStream`` gives ``(chosen, rejected)``: two ``Batch``es of numpy arrays whose row ``b``
holds the same item's conversation (``modalities.conversation``) with the chosen and the
rejected reply (``post_training.preference_pair``: the gold judge's label, flipped at the
``label_noise`` rate), one conversation per row (segment 1, right-padded with segment 0),
so the scalar head reads the reply's last position and DPO sums one reply's log-probabilities
per row. ``PromptStream`` gives the items with their prompts (``conversation.prompt``), which
``infer.generate`` completes.

Reading order: global row ``r`` of step ``s`` reads item ``order(s * B + r)``. On ``sft``
and ``preference`` the order is an epoch-by-epoch seeded shuffle (``mixture.DocumentOrder``)
and the stream is endless; on ``eval`` it is the records in order, one pass: the last batch's
rows past the end are padding (``PairStream``) or left out (``PromptStream``) and the next
``next()`` raises ``StopIteration``, so held-out accuracy is over every item once, the same
on every run. A row is a pure function of ``(seed, step, r)``: process ``p`` of ``n`` computes
its rows of the one global batch, and the state is the step (a small JSON dict), so a run
resumes exactly, on any process count.

A conversation that does not fit a row (``seq_len`` positions, ``num_patches`` patches,
``num_audio_frames`` audio frames) raises ``mixture.DataError`` naming the record and the
setting to raise: a skipped pair would bias what the reward model sees, silently.
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
    self._step = 0
    self.tokenizer = text_lib.Tokenizer()

  def _next_items(self) -> list[post_training.Item | None]:
    """This process's rows of the next step: their items (None past the end of ``eval``)."""
    first = self._step * self._config['batch_size']
    if self._order is None and first >= len(self._items):
      raise StopIteration
    self._step += 1
    if self._order is None:
      return [self._items[first + r] if first + r < len(self._items) else None
              for r in self.rows]
    return [self._items[self._order(first + r)] for r in self.rows]

  def __iter__(self):
    return self

  def get_state(self) -> dict:
    """A JSON-serialisable state: the settings and the number of steps taken."""
    return dict(self._config, step=self._step)

  def set_state(self, state: dict) -> None:
    """Continues exactly where the stream that gave ``state`` stopped (any process count)."""
    mismatched = {key: (state.get(key), value) for key, value in self._config.items()
                  if state.get(key) != value}
    if mismatched or not isinstance(state.get('step'), int):
      raise DataError(f'stream state does not match this stream (saved, now): '
                      f'{json.dumps(mismatched)}; resume with the same settings or start '
                      'a fresh stream')
    self._step = state['step']


class PairStream(_Stream):
  """``next()`` -> ``(chosen, rejected)`` batches of this process's rows (see the module
  docstring); each passes ``batch.check_batch``."""

  def __init__(self, data_dir: str, split: str, *, batch_size: int, seq_len: int,
               num_patches: int, num_audio_frames: int, patch_dim: int, audio_dim: int,
               seed: int, label_noise: float, subset: str = 'full', process_index: int = 0,
               process_count: int = 1):
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
      subset: ``'full'`` or ``'small'``.
      process_index, process_count: this process and how many share the global batch.

    Raises:
      DataError: naming the bad argument, or the command that prepares the items.
    """
    if not 0 <= label_noise <= 1:
      raise DataError(f'label_noise={label_noise}: use a rate in [0, 1] (post.label_noise)')
    super().__init__(data_dir, split, batch_size=batch_size, seed=seed, subset=subset,
                     process_index=process_index, process_count=process_count,
                     seq_len=seq_len, label_noise=label_noise)
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

  def __next__(self) -> tuple[Batch, Batch]:
    chosen_rows, rejected_rows = [], []
    for item in self._next_items():
      if item is None:
        chosen_rows.append([])
        rejected_rows.append([])
        continue
      user = item.user_segments(self.tokenizer)
      chosen, rejected = post_training.preference_pair(item, self._config['label_noise'],
                                                       self._config['seed'])
      chosen_rows.append([self._flat(item, user, chosen)])
      rejected_rows.append([self._flat(item, user, rejected)])
    return (interleave.pack_rows(chosen_rows, **self._shapes),
            interleave.pack_rows(rejected_rows, **self._shapes))


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
    return [(conversation.prompt(item.user_segments(self.tokenizer), self.tokenizer), item)
            for item in self._next_items() if item is not None]
