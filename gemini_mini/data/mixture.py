"""A deterministic, resumable, process-sharded iterator of packed multimodal ``Batch``es.

Every global row ``r`` of every batch is filled from its own endless stream of examples.
Example ``n`` of row ``r``'s stream:

* belongs to the task drawn with the configured weights by ``default_rng([seed, r, n])``
  (weights are probabilities per *example*, not per token);
* reads the records ``order_t(r + c * B)``, ``order_t(r + (c + 1) * B)``, ... of that task's
  split (as many as the task needs: a text haystack several documents), where ``c`` counts
  the records the row's earlier examples of the same task read and ``order_t`` is the task's
  epoch-by-epoch shuffle (``DocumentOrder``). Row ``r`` reads positions ``r, r + B, r + 2B,
  ...`` of each task's order, so within an epoch no record is read by two rows;
* draws its own choices (lengths, needle depths) from ``default_rng([seed, r, n, 1])``.

Rows are filled left to right (``tasks.Task.cuttable``): a text document fills what room
is left and its rest starts the row's next batch; any other example goes in whole, and
when it does not fit what is left of the row (positions, patches or audio frames) the rest
of the row is padding and the example opens the row's next batch. An example that cannot
fit even an empty row (a clip longer than ``data.num_audio_frames``) is skipped and counted
in ``stats()``, never cut or crashed on. So:

* a row's content is a pure function of ``(seed, weights, r, step)``: process ``p`` of
  ``n`` computes rows ``[p * B/n, (p + 1) * B/n)`` of exactly the global batch one process
  would, for any ``n``;
* the state is, per row, ``[r, n, offset, c_1, ..., c_K]`` (``offset``: tokens of a cut
  document already used; ``c_k``: records read by the finished examples of task k): a small
  JSON dict, saved in every checkpoint, so a resumed run continues exactly where it stopped.

Why not grain: its iterator state holds no packer carry per row (``ConcatThenSplit`` keeps
one per process, coupling the rows of a batch to the process count), and its mixing draws
from per-dataset iterators whose positions depend on the process's other rows.
"""

import collections
import json

import numpy as np

from gemini_mini.batch import Batch
from gemini_mini.data import tasks as tasks_lib
from gemini_mini.modalities import interleave
from gemini_mini.modalities import text as text_lib

MAX_SKIPS_IN_A_ROW = 1000  # the shapes cannot hold the mixture's examples


class DataError(ValueError):
  """Missing data or a bad argument or state; the message names the problem and the fix."""


class DocumentOrder:
  """Stream position -> record index: epoch by epoch, a seeded permutation of them all.

  ``order(n)`` is record ``permutation([*seed, e])[n % N]`` of epoch ``e = n // N``
  (``numpy.random.default_rng``), so every epoch visits each of the N records once, in a
  new order.
  """

  def __init__(self, num_records: int, seed: tuple[int, ...]):
    self._num_records, self._seed = num_records, tuple(seed)
    self._epochs = {}  # a few recent epochs' permutations (rows may be in different epochs)

  def __call__(self, position: int) -> int:
    epoch, index = divmod(position, self._num_records)
    if epoch not in self._epochs:
      if len(self._epochs) >= 4:
        del self._epochs[min(self._epochs)]
      self._epochs[epoch] = np.random.default_rng([*self._seed, epoch]).permutation(
          self._num_records)
    return int(self._epochs[epoch][index])


def _open_split(task: tasks_lib.Task, data_dir: str, subset: str, split: str):
  """``(path, random-access source)`` of the task's dataset split; ``(None, None)`` for a
  task that needs no dataset."""
  if task.dataset is None:
    return None, None
  # A dataset whose splits are named otherwise maps the mixture's (post_training: train -> sft).
  split = getattr(task.dataset, 'MIXTURE_SPLITS', {}).get(split, split)
  builder = task.dataset.builder(data_dir, subset)
  command = f'`python -m gemini_mini.data.prepare --subset {subset} --data-dir {data_dir}`'
  if not builder.is_prepared():
    raise DataError(f'task {task.name!r} needs the dataset {builder.name}/{subset}, which is '
                    f'not prepared under {data_dir}; build it with {command}')
  if split not in builder.info.splits:
    raise DataError(f'split {split!r} is not in {builder.name}; use one of '
                    f'{sorted(builder.info.splits)} (or set data.weights.{task.name}=0)')
  source = builder.as_data_source(split)
  if not len(source):
    raise DataError(f'split {split!r} of {builder.data_dir} is empty; rebuild it with {command}')
  return builder.data_dir, source


class Mixture:
  """Packed batches of a weighted task mixture for one process; ``next()`` gives a ``Batch``.

  Each batch has ``batch_size // process_count`` rows of ``seq_len`` positions (numpy
  arrays; it passes ``batch.check_batch``), patches ``[B_local, num_patches, patch_dim]``
  and audio ``[B_local, num_audio_frames, audio_dim]``. Endless: epochs repeat reshuffled.
  """

  def __init__(self, data_dir: str, split: str, weights: dict[str, float], *, batch_size: int,
               seq_len: int, seed: int, num_patches: int, num_audio_frames: int,
               patch_dim: int, audio_dim: int, subset: str = 'full', process_index: int = 0,
               process_count: int = 1):
    """Opens the prepared datasets of the tasks with a positive weight.

    Args:
      data_dir: where ``python -m gemini_mini.data.prepare`` wrote the datasets.
      split: ``'train'`` or ``'eval'`` (``'long'``: the text corpus's long documents).
      weights: task name (``tasks.TASK_NAMES``) -> non-negative weight; missing names are 0.
      batch_size: rows in the global batch, split evenly over processes.
      seq_len: T, positions per row.
      seed: the shuffle and task-draw seed, in [0, 2**32).
      num_patches, num_audio_frames, patch_dim, audio_dim: the static per-row shapes of
        ``Batch.patches`` and ``Batch.audio``.
      subset: ``'full'`` or ``'small'``, the prepared configs to read.
      process_index, process_count: this process and how many share the global batch.

    Raises:
      DataError: naming the bad argument, or the dataset to prepare and the command.
    """
    if not 0 <= process_index < process_count or batch_size % process_count:
      raise DataError(f'batch_size={batch_size} over process_count={process_count} with '
                      f'process_index={process_index}: use a batch size divisible by the '
                      'process count and 0 <= process_index < process_count')
    if seq_len < 2 or not 0 <= seed < 2**32:
      raise DataError(f'seq_len={seq_len}, seed={seed}: use seq_len >= 2 and 0 <= seed < 2**32')
    unknown = sorted(set(weights) - set(tasks_lib.TASK_NAMES))
    if unknown or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
      raise DataError(f'task weights {weights}: use non-negative weights, at least one positive, '
                      f'for tasks among {tasks_lib.TASK_NAMES}')
    self._tasks = [task for task in tasks_lib.TASKS if weights.get(task.name, 0) > 0]
    self._task_ids = [tasks_lib.TASK_NAMES.index(task.name) for task in self._tasks]
    chosen = np.array([weights[task.name] for task in self._tasks], np.float64)
    self._cumulative = np.cumsum(chosen / chosen.sum())
    self._sources, self._orders, self._paths = [], [], []
    for task, task_id in zip(self._tasks, self._task_ids):
      path, source = _open_split(task, data_dir, subset, split)
      self._paths.append(path)
      self._sources.append(source)
      self._orders.append(None if source is None else DocumentOrder(len(source), (seed, task_id)))
    self._tokenizer = text_lib.Tokenizer()
    rows_per_process = batch_size // process_count
    self.rows = range(process_index * rows_per_process, (process_index + 1) * rows_per_process)
    self._cursors = {row: [0, 0] + [0] * len(self._tasks) for row in self.rows}
    self._current = {}  # row -> (n, task index, FlatExample or None, records read): its example
    self._stats = collections.Counter()
    self._config = dict(split=split, subset=subset, batch_size=batch_size, seq_len=seq_len,
                        seed=seed, weights={task.name: weights[task.name] for task in self._tasks})
    self._room = (seq_len, num_patches, num_audio_frames)
    self._shapes = dict(num_patches=num_patches, num_audio_frames=num_audio_frames,
                        patch_dim=patch_dim, audio_dim=audio_dim)

  def _task_of(self, row: int, n: int) -> int:
    draw = np.random.default_rng([self._config['seed'], row, n]).random()
    return min(int(np.searchsorted(self._cumulative, draw, side='right')), len(self._tasks) - 1)

  def _example(self, row: int) -> tuple[int, interleave.FlatExample | None]:
    """Row ``row``'s current example: ``(task index, example)``, the example None when it
    can never fit a row."""
    n, _, *counts = self._cursors[row]
    if self._current.get(row, (None,))[0] == n:
      return self._current[row][1:3]
    k = self._task_of(row, n)
    read = [0]  # records of task k this example has read

    def next_record() -> dict:
      if self._sources[k] is None:
        raise DataError(f'task {self._tasks[k].name!r} has no dataset to read records from')
      position = row + (counts[k] + read[0]) * self._config['batch_size']
      read[0] += 1
      try:
        return self._sources[k][self._orders[k](position)]
      except RuntimeError as error:  # array_record: 'Corrupted Riegeli/records file ...'
        raise DataError(
            f'the prepared data in {self._paths[k]} cannot be read ({error}); delete that '
            f'directory and rebuild it with `python -m gemini_mini.data.prepare --subset '
            f'{self._config["subset"]}`') from error

    rng = np.random.default_rng([self._config['seed'], row, n, 1])
    segments = self._tasks[k].make_example(next_record, self._tokenizer, rng,
                                           tasks_lib.Room(*self._room))
    example = interleave.flatten(segments, self._tokenizer)
    sizes = (len(example.tokens), len(example.patches), len(example.audio))
    if not self._tasks[k].cuttable and any(size > room for size, room in zip(sizes, self._room)):
      self._stats[f'skipped/{self._tasks[k].name}'] += 1
      example = None
    self._current[row] = (n, k, example, read[0])
    return k, example

  def _advance(self, row: int, k: int) -> None:
    """Moves ``row`` past its current example (of task ``k``) and the records it read."""
    cursor = self._cursors[row]
    cursor[0] += 1
    cursor[1] = 0
    cursor[2 + k] += self._current[row][3]

  def _fill_row(self, row: int) -> list[interleave.FlatExample]:
    """The examples (and pieces of a cut text document) of ``row``'s next batch."""
    pieces, used, skips = [], [0, 0, 0], 0
    while used[0] < self._room[0]:
      k, example = self._example(row)
      if example is None:
        self._advance(row, k)
        skips += 1
        if skips == MAX_SKIPS_IN_A_ROW:
          raise DataError(f'{skips} examples in a row were too big for a row of '
                          f'(seq_len, num_patches, num_audio_frames) = {self._room}: '
                          f'{self.stats()}; raise those (train.seq_len, data.num_patches, '
                          'data.num_audio_frames) or lower the skipped tasks\' weights')
        continue
      offset = self._cursors[row][1]
      if self._tasks[k].cuttable:
        piece = example.tokens[offset:offset + self._room[0] - used[0]]
        cut = slice(offset, offset + len(piece))
        pieces.append(interleave.FlatExample(piece, example.modality[cut], example.patches,
                                             example.audio, example.scored[cut]))
        used[0] += len(piece)
        self._cursors[row][1] += len(piece)
        if self._cursors[row][1] >= len(example.tokens):
          self._advance(row, k)
        self._stats[f'tokens/{self._tasks[k].name}'] += len(piece)
        continue
      sizes = (len(example.tokens), len(example.patches), len(example.audio))
      if any(u + size > room for u, size, room in zip(used, sizes, self._room)):
        break  # the rest of the row is padding; the example opens the next batch
      pieces.append(example)
      used = [u + size for u, size in zip(used, sizes)]
      self._advance(row, k)
      self._stats[f'tokens/{self._tasks[k].name}'] += sizes[0]
    self._stats['padding'] += self._room[0] - used[0]
    return pieces

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    rows = [self._fill_row(row) for row in self.rows]
    return interleave.pack_rows(rows, seq_len=self._room[0], **self._shapes)

  def stats(self) -> dict[str, int]:
    """Counts since this iterator was made: ``tokens/{task}`` (positions filled),
    ``padding`` (positions) and ``skipped/{task}`` (examples too big for any row)."""
    return dict(self._stats)

  def position_shares(self) -> dict[str, float]:
    """The fraction of all positions so far filled by each task, and by padding:
    ``{'text': 0.71, 'caption': 0.05, ..., 'padding': 0.02}`` (summing to 1)."""
    counts = {task.name: self._stats[f'tokens/{task.name}'] for task in self._tasks}
    counts['padding'] = self._stats['padding']
    total = max(sum(counts.values()), 1)
    return {name: count / total for name, count in counts.items()}

  def get_state(self) -> dict:
    """A JSON-serialisable state: the settings, the task order and each owned row's
    ``[row, n, offset, c_1, ..., c_K]``."""
    return dict(self._config, tasks=[task.name for task in self._tasks],
                rows=[[row, *cursor] for row, cursor in self._cursors.items()])

  def set_state(self, state: dict) -> None:
    """Continues exactly where the iterator that gave ``state`` stopped.

    ``state`` may hold more rows than this process owns (e.g. the states of all processes
    merged), so a run can resume on another process count.
    """
    config = dict(self._config, tasks=[task.name for task in self._tasks])
    mismatched = {key: (state.get(key), value) for key, value in config.items()
                  if state.get(key) != value}
    if mismatched:
      raise DataError(f'iterator state does not match this iterator (saved, now): '
                      f'{json.dumps(mismatched)}; resume with the same settings or start '
                      'a fresh iterator')
    cursors = {row[0]: list(row[1:]) for row in state['rows']}
    missing = [row for row in self.rows if row not in cursors]
    if missing:
      raise DataError(f'iterator state has no cursor for rows {missing}; pass the state '
                      'saved by the process that owned them (or all states merged)')
    self._cursors = {row: cursors[row] for row in self.rows}
    self._current = {}
