"""Orbax checkpoints of the train state, the data iterator position and the config.

Saves are asynchronous (training continues while arrays are written) and atomic: Orbax writes
into a temporary directory and renames it when complete, so a crash mid-save leaves the
previous checkpoint as the latest usable one. The last ``keep`` checkpoints are kept.
Restoring takes the target shardings from an abstract state, so a run can resume on a
different mesh. A resume is refused, with the fix named, when the saved parameter tree is not
the one the config builds (``gemini_mini.checkpoint.check_params``) or when the config would
read another data stream or give a step another meaning (``RESUME_MUST_MATCH``).
"""

import pathlib

import orbax.checkpoint as ocp

from gemini_mini.checkpoint import (
    ITEMS, CheckpointError, check_params, read_config, remedy, unreadable)
from gemini_mini.config import Config, ModelConfig

# What a resumed run must share with the saved one besides its parameter tree: the rows it
# reads and what a step means. The other fields (steps, learning rate, logging, mesh, where
# the data lives) may change on resume, and so may model fields that leave the tree as saved.
RESUME_MUST_MATCH = (
    'data.subset', 'data.num_patches', 'data.num_audio_frames', 'data.weights',
    'train.batch_size', 'train.seq_len', 'train.seed', 'train.grad_accum_steps',
    'train.stage', 'train.init_from', 'post.label_noise', 'post.reward_from')


def stream_differences(saved: dict, current: dict) -> dict[str, tuple]:
  """``{'section.field': (saved, current)}`` for every ``RESUME_MUST_MATCH`` field that
  differs, by task for the weights (``'data.weights.text'``; a task left out weighs 0)."""
  differences = {}
  defaults = Config().to_dict()  # a field saved before it existed had its default
  for key in RESUME_MUST_MATCH:
    section, field = key.split('.')
    default = defaults[section][field]
    old = saved.get(section, {}).get(field, default)
    new = current.get(section, {}).get(field, default)
    if isinstance(old, dict) and isinstance(new, dict):
      differences.update({f'{key}.{task}': (old.get(task, 0), new.get(task, 0))
                          for task in sorted(old.keys() | new.keys())
                          if old.get(task, 0) != new.get(task, 0)})
    elif old != new:
      differences[key] = (old, new)
  return differences


class Checkpointer:
  """``save(step, state, data_state)``, ``restore(abstract_state)``, ``latest_step()``."""

  def __init__(self, directory: str | pathlib.Path, *, keep: int, config: dict):
    self.directory = pathlib.Path(directory).absolute()
    self.config = config
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                             create=True, cleanup_tmp_directories=True),
        item_names=ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict) -> None:
    """Starts an asynchronous save; returns once the arrays are copied off the devices."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(self.config)))

  def restore(self, abstract_state):
    """``(step, state, data_state)`` from the latest checkpoint, placed as ``abstract_state``
    (a pytree of ``jax.ShapeDtypeStruct`` with shardings) says."""
    step, saved = read_config(self.directory)
    check_params(self.directory, step, saved.get('model', {}), ModelConfig(**self.config['model']),
                 action='resume', otherwise='start a new train.run_dir')
    differences = stream_differences(saved, self.config)
    if differences:
      raise CheckpointError(f'{self.directory}: resuming checkpoint step {step} would read '
                            'another data stream: '
                            + remedy(differences, 'resume', 'start a new train.run_dir'))
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as error:
      raise unreadable(self.directory, step, 'the train state', error) from error
    return step, restored['state'], restored['data']

  def wait(self) -> None:
    """Blocks until the pending asynchronous save is complete on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
