"""Orbax checkpoints of the train state, the data iterator position and the config.

Saves are asynchronous (training continues while arrays are written) and atomic: Orbax writes
into a temporary directory and renames it when complete, so a crash mid-save leaves the
previous checkpoint as the latest usable one. The last ``keep`` checkpoints are kept.
Restoring takes the target shardings from an abstract state, so a run can resume on a
different mesh. A checkpoint whose config differs in a field that changes shapes or the data
stream is refused with the differing fields named.
"""

import pathlib

import orbax.checkpoint as ocp

# Fields that must match to resume: they change parameter shapes, the data stream, or what a
# "step" means. Everything else (steps, learning rate, logging, mesh, kernels, dispatch,
# dtype, remat, where the data lives) may change on resume.
MUST_MATCH = (
    'model.vocab_size', 'model.d_model', 'model.num_layers', 'model.num_heads',
    'model.num_kv_heads', 'model.head_dim', 'model.d_ff', 'model.num_experts',
    'model.experts_per_token', 'model.moe_every', 'model.shared_expert', 'model.patch_dim',
    'model.audio_dim', 'model.scan_layers', 'data.subset', 'data.num_patches',
    'data.num_audio_frames',
    'train.batch_size', 'train.seq_len', 'train.seed', 'train.grad_accum_steps')


class CheckpointError(ValueError):
  """A checkpoint that cannot be used; the message names the reason and the fix."""


def config_differences(saved: dict, current: dict) -> list[str]:
  """``'section.field: saved -> current'`` for every ``MUST_MATCH`` field that differs."""
  differences = []
  for key in MUST_MATCH:
    section, field = key.split('.')
    old, new = saved.get(section, {}).get(field), current.get(section, {}).get(field)
    if old != new:
      differences.append(f'{key}: {old!r} -> {new!r}')
  return differences


def read_config(directory: str | pathlib.Path) -> tuple[int, dict]:
  """``(step, config dict)`` of the latest complete checkpoint under ``directory``.

  Raises:
    CheckpointError: no complete checkpoint there, or its config cannot be read.
  """
  directory = pathlib.Path(directory).absolute()
  if not directory.is_dir():
    raise CheckpointError(f'{directory}: no such checkpoint directory; pass the train.run_dir '
                          'of a run (it holds checkpoints/), or train one with train.py')
  manager = ocp.CheckpointManager(directory, item_names=('state', 'data', 'config'))
  try:
    step = manager.latest_step()
    if step is None:
      raise CheckpointError(f'{directory}: no complete checkpoint; train longer than '
                            'train.checkpoint_every steps, or pass another run')
    try:
      saved = manager.restore(step, args=ocp.args.Composite(
          config=ocp.args.JsonRestore()))['config']
    except Exception as error:  # Orbax raises many types for unreadable files
      raise CheckpointError(f'{directory}/{step}: cannot read the saved config ({error}); '
                            'delete this step directory to fall back to an earlier one') from error
  finally:
    manager.close()
  return step, saved


class Checkpointer:
  """``save(step, state, data_state)``, ``restore(abstract_state)``, ``latest_step()``."""

  def __init__(self, directory: str | pathlib.Path, *, keep: int, config: dict):
    self.directory = pathlib.Path(directory).absolute()
    self.config = config
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                             create=True, cleanup_tmp_directories=True),
        item_names=('state', 'data', 'config'))

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
    step = self.latest_step()
    if step is None:
      raise CheckpointError(f'{self.directory}: no complete checkpoint to restore')
    try:
      saved_config = self.manager.restore(step, args=ocp.args.Composite(
          config=ocp.args.JsonRestore()))['config']
    except Exception as error:  # Orbax raises many types for unreadable files
      raise CheckpointError(f'{self.directory}/{step}: cannot read the saved config ({error}); '
                            'delete this step directory to fall back to an earlier one') from error
    differences = config_differences(saved_config, self.config)
    if differences:
      raise CheckpointError(
          f'{self.directory}: checkpoint step {step} was written by an incompatible config: '
          + '; '.join(differences) + '. Use a new train.run_dir, or restore those values.')
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as error:
      raise CheckpointError(f'{self.directory}/{step}: cannot restore the train state ({error}); '
                            'delete this step directory to fall back to an earlier one') from error
    return step, restored['state'], restored['data']

  def wait(self) -> None:
    """Blocks until the pending asynchronous save is complete on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
