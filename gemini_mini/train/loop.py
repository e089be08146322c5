"""The training run: set up (or resume), step, log, evaluate, checkpoint, stop cleanly.

``run(config)`` is what ``train.py`` calls, for every ``train.stage``: the stage object
(``make_stage``) holds what differs (model, data, step, held-out evaluation), this loop the
rest. A run directory holds ``checkpoints/``,
``tensorboard/`` and ``metrics.jsonl``; started again on the same directory, the run resumes
from its latest complete checkpoint, data iterator included, and reaches the same parameters
and losses as an uninterrupted run. SIGINT/SIGTERM (Ctrl-C, preemption) finish the current
step, save, and exit cleanly; a non-finite loss stops the run without saving, leaving the last
good checkpoint.
"""

import dataclasses
import itertools
import math
import pathlib
import signal
import sys
import time

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from gemini_mini import parallel
from gemini_mini.config import Config, ConfigError
from gemini_mini.data import prepare
from gemini_mini.data.curriculum import WarmStart
from gemini_mini.data.mixture import Mixture
from gemini_mini.data.prefetch import Prefetch
from gemini_mini.train import metrics as metrics_lib
from gemini_mini.train import prune, runs
from gemini_mini.train.checkpoint import Checkpointer
from gemini_mini.train.loss import LossWeights, finalize
from gemini_mini.train.optimizer import learning_rate_schedule, make_optimizer
from gemini_mini.train.stage import Stage
from gemini_mini.train.step import (
  Teacher,
  abstract_train_state,
  init_train_state,
  jit_steps,
  make_eval_step,
  make_train_step,
)


class NonFiniteLoss(RuntimeError):
  """The loss or the updated parameters stopped being finite; nothing was saved."""


def initialize_distributed(mesh_config) -> None:
  """Joins the other processes of a multi-process run (a no-op for one process)."""
  if mesh_config.num_processes == -1:
    jax.distributed.initialize()
  elif mesh_config.num_processes > 1:
    jax.distributed.initialize(mesh_config.coordinator_address, mesh_config.num_processes,
                               mesh_config.process_id)


class StopRequest:
  """Turns the first SIGINT/SIGTERM into a flag checked between steps; a second one aborts."""

  def __init__(self):
    self.requested = False
    self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

  def _handle(self, signum, frame):
    if self.requested:
      raise KeyboardInterrupt
    self.requested = True
    print(f'\n{signal.Signals(signum).name}: finishing this step, saving, then exiting '
          '(send it again to abort without saving)', file=sys.stderr)

  def restore(self):
    for signum, handler in self.previous.items():
      signal.signal(signum, handler)

  def agreed(self) -> bool:
    """Whether any process was asked to stop: all must stop at the same step, since saving
    is collective."""
    if jax.process_count() == 1:
      return self.requested
    return bool(multihost_utils.process_allgather(np.asarray(self.requested)).any())


# The held-out batches are drawn with this seed whatever ``train.seed`` is, so that runs
# of different seeds report their held-out loss on the same rows.
EVAL_SEED = 0


def make_data(config: Config, split: str, weights: dict[str, float] | None = None) -> Mixture:
  """This process's share of the ``split`` batches of the task mixture ``weights`` (unset,
  ``data.weights``). Training rows follow ``train.seed``; the ``eval`` split's follow
  ``EVAL_SEED``."""
  m, d, t = config.model, config.data, config.train
  weights = d.weights if weights is None else weights
  seed = t.seed if split == 'train' else EVAL_SEED
  return Mixture(d.dir, split, weights, batch_size=t.batch_size, seq_len=t.seq_len,
                 seed=seed, num_patches=d.num_patches, num_audio_frames=d.num_audio_frames,
                 patch_dim=m.patch_dim, audio_dim=m.audio_dim, subset=d.subset,
                 process_index=jax.process_index(), process_count=jax.process_count())


# Rows the pruned student's widths are scored on: the ranking of channels, heads and
# neurons by their energy settles within a few rows.
PRUNE_CALIBRATION_ROWS = 8
# Calibration rows (GPTQ's, pruning's) come from the training mixture at this offset from
# train.seed: the same kind of data as training, other rows.
CALIBRATION_SEED_OFFSET = 1000


def calibration_batches(config: Config, rows: int) -> list:
  """Enough training-mixture batches for ``rows`` rows, from a seed training never uses."""
  seed = config.train.seed + CALIBRATION_SEED_OFFSET
  config = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))
  return list(itertools.islice(make_data(config, 'train'),
                               math.ceil(rows / config.train.batch_size)))


def make_train_data(config: Config) -> WarmStart:
  """The training batches: the ``repeat`` task alone for the warm start
  (``data.repeat_only_steps``), then the mixture."""
  d = config.data
  return WarmStart(make_data(config, 'train', {'repeat': 1.0}), make_data(config, 'train'),
                   steps=d.repeat_only_steps, until_loss=d.repeat_only_until_loss)


def global_data_state(data: Prefetch) -> dict:
  """The iterator state with every process's rows, so any process count can resume it."""
  state = data.get_state()
  if jax.process_count() > 1:
    rows = np.asarray(state['rows'], np.int64)
    state['rows'] = multihost_utils.process_allgather(rows).reshape(-1, rows.shape[1]).tolist()
  return state


def check_divisibility(config: Config, mesh) -> None:
  t = config.train
  per_step = parallel.batch_divisor(mesh) * t.grad_accum_steps
  if t.batch_size % per_step:
    raise ConfigError(
        f'train.batch_size: {t.batch_size} rows cannot be split over the mesh batch axes '
        f'(data*fsdp*expert = {parallel.batch_divisor(mesh)}) times train.grad_accum_steps '
        f'({t.grad_accum_steps}); use a multiple of {per_step}')
  if t.batch_size % jax.process_count():
    raise ConfigError(f'train.batch_size: {t.batch_size} is not divisible by the '
                      f'{jax.process_count()} processes')


class LanguageModelStage(Stage):
  """``pretrain``, ``sft`` and ``distill``: next-token loss on the task mixture. For ``sft``
  the mixture is the demonstrations, whose loss covers the model's turns only
  (``modalities.conversation``), and the parameters start from ``train.init_from``. For
  ``distill`` the loss adds the KL to the frozen ``train.teacher``'s predictions on the same
  batch, the teacher running in the same jitted step (docs/nano.md#the-teacher-in-the-step)."""

  def __init__(self, config: Config, mesh):
    t = config.train
    self.config, self.mesh = config, mesh
    self.optimizer = make_optimizer(learning_rate=t.learning_rate, steps=t.steps,
                                    warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
                                    grad_clip=t.grad_clip)
    self.weights = LossWeights(t.load_balance_weight, t.router_z_weight, t.logit_z_weight)
    self.graphdef, self.shardings, self.abstract = abstract_train_state(
        config.model, self.optimizer, mesh, t.seed)
    schedule = learning_rate_schedule(t.learning_rate, t.steps, t.warmup_steps)
    self.tokens_per_step = t.batch_size * t.seq_len
    self.flops_per_step = (metrics_lib.train_flops_per_token(config.model, t.seq_len)
                           * self.tokens_per_step)
    self.teacher, teacher, teacher_shardings = None, None, None
    if t.stage == 'distill':
      self.teacher = runs.load_teacher(config, mesh)
      self.weights = LossWeights.distillation(
          t.load_balance_weight, t.router_z_weight, t.logit_z_weight, t.distill_alpha,
          t.distill_temperature)
      teacher = Teacher(self.teacher.graphdef, t.distill_temperature)
      teacher_shardings = jax.tree.map(lambda a: a.sharding, self.teacher.params)
      # Its forward pass is a third of a trained token's FLOPs.
      self.flops_per_step += (metrics_lib.train_flops_per_token(self.teacher.config.model,
                                                                t.seq_len)
                              * self.tokens_per_step / 3)
    self.train_step, self.eval_step = jit_steps(
        make_train_step(self.graphdef, self.optimizer, schedule, self.weights,
                        t.grad_accum_steps, teacher),
        make_eval_step(self.graphdef, self.weights, teacher), self.shardings, mesh,
        teacher_shardings)
    self.data = None

  def init_state(self):
    """Step 0's state; with ``train.student_init: pruned`` the student's parameters are the
    teacher's cut to its widths (``prune.py``), scored on ``PRUNE_CALIBRATION_ROWS``."""
    if self.config.train.student_init != 'pruned':
      return super().init_state()
    prune.check(self.config.model, self.teacher.config.model)
    if jax.process_count() > 1:
      raise ConfigError('train.student_init: pruning calibrates in one process; prune in a '
                        'one-process run of a few steps and continue it on more (resuming), '
                        'or set train.student_init=random')
    teacher = self.teacher.model()
    batches = calibration_batches(self.config, PRUNE_CALIBRATION_ROWS)
    start_from = lambda fresh: prune.pruned_params(nnx.merge(self.graphdef, fresh), teacher,
                                                    batches)
    return init_train_state(self.config.model, self.optimizer, self.shardings,
                            self.config.train.seed, start_from)

  def teacher_args(self) -> tuple:
    """What the jitted steps take after the batch: the teacher's parameters, if any."""
    return () if self.teacher is None else (self.teacher.params,)

  def datasets(self) -> dict[str, float]:
    return self.config.data.weights

  def open_data(self, state: dict | None) -> None:
    data = make_train_data(self.config)
    if state is not None:
      data.set_state(state)
    self.data = Prefetch(data)

  def data_state(self) -> dict:
    return global_data_state(self.data)

  def train(self, state, step: int):
    del step
    batch = parallel.host_local_to_global(next(self.data), self.mesh)
    with jax.set_mesh(self.mesh):
      return self.train_step(state, batch, *self.teacher_args())

  def evaluate(self, params) -> dict:
    eval_step = lambda params, batch: self.eval_step(params, batch, *self.teacher_args())
    return evaluate(eval_step, params, self.config, self.mesh, self.weights)

  def log_values(self) -> dict:
    return {f'data/{name}_share': share for name, share in self.data.position_shares().items()}

  def after_step(self, step: int, metrics: dict) -> str | None:
    # The warm start may end here (data/curriculum.py): before the save, so a checkpoint
    # holds the iterator state its next step reads.
    cross_entropy = float(metrics['cross_entropy'])
    if self.data.report_loss(step, cross_entropy):
      return f'step {step}: repeats alone end at copy loss {cross_entropy:.3f}; the mixture begins'
    return None

  def close(self) -> None:
    if self.data is not None:
      self.data.close()


def make_stage(config: Config, mesh):
  """The stage ``train.stage`` names (the post-training ones are imported when used)."""
  stage = config.train.stage
  if stage in ('pretrain', 'sft', 'distill'):
    return LanguageModelStage(config, mesh)
  if stage in ('reward', 'dpo'):
    from gemini_mini.train.preference import PreferenceStage  # pylint: disable=import-outside-toplevel
    return PreferenceStage(config, mesh)
  from gemini_mini.train.rlhf import RLHFStage  # pylint: disable=import-outside-toplevel
  return RLHFStage(config, mesh)


def run(config: Config) -> dict:
  """Trains ``config`` (the stage ``train.stage`` names); returns the last logged metrics."""
  initialize_distributed(config.mesh)
  mesh = parallel.make_mesh(config.mesh)
  check_divisibility(config, mesh)
  t = config.train
  run_dir = pathlib.Path(t.run_dir)
  is_chief = jax.process_index() == 0
  checkpointer = Checkpointer(run_dir / 'checkpoints', keep=t.keep_checkpoints,
                              config=config.to_dict())
  stage = make_stage(config, mesh)
  if is_chief:  # builds the dataset on first use; the other processes wait for it
    prepare.ensure(config.data.dir, config.data.subset, stage.datasets())
  multihost_utils.sync_global_devices('data prepared')
  if checkpointer.latest_step() is not None:
    start, state, data_state = checkpointer.restore(stage.abstract)
    message = f'resuming from step {start}'
  else:
    start, state, data_state = 0, stage.init_state(), None
    message = 'starting' + (f' from {t.init_from}' if t.init_from else '')
  stage.open_data(data_state)
  if is_chief:
    print(f'gemini_mini: {t.stage}: {message}; writing to {run_dir}/ (checkpoints/, '
          f'tensorboard/, metrics.jsonl); mesh {dict(mesh.shape)}', flush=True)
  writer = metrics_lib.MetricsWriter(run_dir, resume_step=start) if is_chief else None
  peak_per_device = t.peak_flops_per_device or metrics_lib.device_peak_flops(jax.devices()[0])
  if peak_per_device is None and is_chief:
    print(f'gemini_mini: MFU not logged: the peak FLOP/s of {jax.devices()[0].device_kind!r} '
          'is unknown; set train.peak_flops_per_device', flush=True)
  peak_flops = (peak_per_device or float('nan')) * jax.device_count()
  stop = StopRequest()
  progress = tqdm(total=t.steps, initial=start, disable=not is_chief, dynamic_ncols=True)
  last = {}
  saved_step = start
  step_seconds = []  # since the last log: data + step time, without eval or checkpoints
  try:
    for step in range(start + 1, t.steps + 1):
      step_start = time.perf_counter()
      state, step_metrics = stage.train(state, step)
      # Waits for the step: a non-finite loss or update must stop the run before any save.
      loss = float(step_metrics.pop('loss'))
      if not (math.isfinite(loss) and bool(step_metrics.pop('params_finite'))):
        what = f'loss is {loss}' if not math.isfinite(loss) else 'the update made parameters non-finite'
        latest = checkpointer.latest_step()
        kept = (f'The last good checkpoint is step {latest} in {run_dir}' if latest is not None
                else 'No checkpoint was saved')
        raise NonFiniteLoss(f'step {step}: {what}; stopping without saving. {kept}. '
                            'Lower train.learning_rate or raise train.warmup_steps.')
      if step > start + 1:  # the first step of a (re)start includes compilation
        step_seconds.append(time.perf_counter() - step_start)
      progress.update(1)
      evaluating = t.eval_every and (step % t.eval_every == 0 or step == t.steps)
      if step % t.log_every == 0 or step == t.steps or evaluating:
        values = {'loss': loss, **metrics_lib.scalars(step_metrics)}
        seconds_per_step = np.mean(step_seconds) if step_seconds else float('nan')
        values['tokens_per_s'] = stage.tokens_per_step / seconds_per_step
        values['mfu'] = stage.flops_per_step / seconds_per_step / peak_flops
        values.update(stage.log_values())
        step_seconds = []
        if evaluating:
          values.update(stage.evaluate(state.params))
        progress.set_postfix(loss=f'{loss:.3f}', tok_s=f'{values["tokens_per_s"]:.0f}')
        if writer:
          writer.write(step, values)
        last = {'step': step, **values}
      message = stage.after_step(step, step_metrics)
      if message and is_chief:
        progress.write(message)
      if step % t.checkpoint_every == 0 or step == t.steps:
        checkpointer.save(step, state, stage.data_state())
        saved_step = step
      if stop.agreed():
        if saved_step != step:
          checkpointer.save(step, state, stage.data_state())
        print(f'stopped at step {step}; saved. Run again with train.run_dir={run_dir} to resume.',
              file=sys.stderr)
        break
  finally:
    stage.close()
    stop.restore()
    progress.close()
    checkpointer.close()
    if writer:
      writer.close()
  return last


def evaluate(eval_step, params, config: Config, mesh, weights: LossWeights) -> dict:
  """Held-out loss over ``train.eval_batches`` batches (the same ones every time, and for
  every ``train.seed``)."""
  data = make_data(config, 'eval')
  total = None
  for _ in range(config.train.eval_batches):
    with jax.set_mesh(mesh):
      sums = eval_step(params, parallel.host_local_to_global(next(data), mesh))
    total = sums if total is None else jax.tree.map(np.add, total, sums)
  return {f'eval/{k}': float(v) for k, v in finalize(total, weights).items()}
