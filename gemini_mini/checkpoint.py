"""Reading a run's checkpoints, for resuming and for inference alike.

A checkpoint step holds three Orbax items: ``state`` (the train state: ``step``, ``params``,
``opt_state``), ``data`` (the iterator position) and ``config`` (JSON). Whether a checkpoint
fits a config is decided by the parameter trees, not by a list of config fields: the saved
paths, shapes and dtypes (Orbax's metadata, no array read) must equal those of the decoder
the config builds (``nnx.eval_shape``, nothing allocated). When they differ, the error names
each differing path and the model config fields that cause it: the fewest differing fields
that, set back to their saved values, make the trees equal. The parameters can be restored
alone, without the optimizer state.
"""

import dataclasses
import json
import pathlib

import jax
import orbax.checkpoint as ocp
from flax import nnx

from gemini_mini import config as config_lib
from gemini_mini import parallel
from gemini_mini.config import ConfigError, ModelConfig
from gemini_mini.model import Decoder

ITEMS = ('state', 'data', 'config')
LISTED = 8  # differing paths shown per kind; the rest are counted


class CheckpointError(ValueError):
  """A checkpoint that cannot be used; the message names the reason and the fix."""


def unreadable(directory: pathlib.Path, step: int, what: str, error: Exception) -> CheckpointError:
  """The error for a step whose files cannot be read. The files may be fine (a full disk, a
  permission), so the fix sets the step aside and keeps it."""
  return CheckpointError(
      f'{directory}/{step}: cannot read {what} ({error}); if its files are damaged, move '
      f'{directory}/{step} out of {directory} to use the step before it')


def _reader(directory: pathlib.Path) -> ocp.CheckpointManager:
  """A manager that reads the state as a plain pytree: its metadata, or any subtree of it."""
  return ocp.CheckpointManager(directory, item_handlers={
      'state': ocp.PyTreeCheckpointHandler(), 'data': ocp.JsonCheckpointHandler(),
      'config': ocp.JsonCheckpointHandler()})


def read_config(directory: str | pathlib.Path) -> tuple[int, dict]:
  """``(step, config dict)`` of the latest complete checkpoint under ``directory``, in
  today's spelling (``config.migrate_saved``).

  Raises:
    CheckpointError: no complete checkpoint there, or its config cannot be read.
  """
  directory = pathlib.Path(directory).absolute()
  if not directory.is_dir():
    raise CheckpointError(f'{directory}: no such checkpoint directory; pass the train.run_dir '
                          'of a run (it holds checkpoints/), or train one with train.py')
  manager = _reader(directory)
  try:
    step = manager.latest_step()
    if step is None:
      raise CheckpointError(f'{directory}: no complete checkpoint; train longer than '
                            'train.checkpoint_every steps, or pass another run')
    try:
      saved = manager.restore(step, args=ocp.args.Composite(
          config=ocp.args.JsonRestore()))['config']
    except Exception as error:  # Orbax raises many types for unreadable files
      raise unreadable(directory, step, 'the saved config', error) from error
  finally:
    manager.close()
  return step, config_lib.migrate_saved(saved)


def abstract_params(model_config: ModelConfig, mesh) -> tuple[nnx.GraphDef, nnx.State]:
  """``(graphdef, params)`` of the decoder without allocating: ``params`` holds
  ``jax.ShapeDtypeStruct``s sharded by the parameters' logical axis names, the restore
  target of ``restore_params``."""
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Decoder(model_config, rngs=nnx.Rngs(0))))
  shardings = parallel.state_shardings(params, mesh)
  return graphdef, jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, shardings)


def _tree(params) -> dict[str, str]:
  """``'blocks.0.attention.q_DNH' -> '(64, 4, 16) float32'`` for every leaf of a parameter
  tree (abstract, or Orbax's metadata of one)."""
  return {'.'.join(map(str, path)).removesuffix('.value'):  # an nnx.Variable's own key
          f'{tuple(leaf.shape)} {leaf.dtype}'
          for path, leaf in ocp.tree.to_flat_dict(params).items()}


def _built(model_config: ModelConfig) -> dict:
  return _tree(nnx.state(nnx.eval_shape(lambda: Decoder(model_config, rngs=nnx.Rngs(0)))))


def _listed(title: str, lines: list[str]) -> list[str]:
  if not lines:
    return []
  more = [f'    ... and {len(lines) - LISTED} more'] if len(lines) > LISTED else []
  return [f'  {title} ({len(lines)}):', *(f'    {line}' for line in lines[:LISTED]), *more]


def _causes(saved: dict, saved_model: dict, model_config: ModelConfig) -> dict:
  """``{field: saved value}``: the fewest model fields whose saved values, set together, make
  the config build the saved tree (dropped one at a time from all the differing fields), or
  ``{}`` when even all of them do not (the layout itself changed)."""
  causes = {}
  for field in dataclasses.fields(model_config):
    value = saved_model.get(field.name, getattr(model_config, field.name))
    if value != getattr(model_config, field.name):
      causes[field.name] = value

  def builds_saved(values):
    try:
      return _built(dataclasses.replace(model_config, **values)) == saved
    except ConfigError:  # a combination the config refuses
      return False
  if not builds_saved(causes):
    return {}
  for name in list(causes):
    fewer = {other: value for other, value in causes.items() if other != name}
    if builds_saved(fewer):
      causes = fewer
  return causes


def remedy(differences: dict[str, tuple], action: str, otherwise: str = '') -> str:
  """``'model.d_ff: 128 -> 256; resume with model.d_ff=128, or OTHERWISE'`` for
  ``{key: (saved value, current value)}``: a last line that names the keys and the fix."""
  fields = ', '.join(f'{key}: {old!r} -> {new!r}' for key, (old, new) in differences.items())
  fix = ' '.join(f'{key}={old if isinstance(old, str) else json.dumps(old)}'
                 for key, (old, _) in differences.items())
  return f'{fields}; {action} with {fix}' + (f', or {otherwise}' if otherwise else '')


def check_params(directory: str | pathlib.Path, step: int, saved_model: dict,
                 model_config: ModelConfig, *, action: str, otherwise: str = '') -> None:
  """Raises unless the parameter tree saved at ``step`` equals the one ``model_config``
  builds. ``saved_model`` is the checkpoint's ``model`` config section; ``action`` and
  ``otherwise`` word the fix (``'resume'``, ``'start a new train.run_dir'``).

  Raises:
    CheckpointError: naming every differing path (missing, unexpected, shape or dtype) and,
      on its last line, the model fields that cause it and their saved values.
  """
  directory = pathlib.Path(directory).absolute()
  manager = _reader(directory)
  try:
    saved = _tree(manager.item_metadata(step)['state']['params'])
  except Exception as error:  # Orbax raises many types for unreadable files
    raise unreadable(directory, step, 'the saved parameter tree', error) from error
  finally:
    manager.close()
  built = _built(model_config)
  if saved == built:
    return
  lines = [f'{directory}: checkpoint step {step} holds parameters that this config does not '
           'build:',
           *_listed('built by the config, not in the checkpoint',
                    [f'{p} {built[p]}' for p in sorted(built.keys() - saved.keys())]),
           *_listed('in the checkpoint, not built by the config',
                    [f'{p} {saved[p]}' for p in sorted(saved.keys() - built.keys())]),
           *_listed('shape or dtype differs',
                    [f'{p}: saved {saved[p]}, config {built[p]}'
                     for p in sorted(saved.keys() & built.keys()) if saved[p] != built[p]])]
  causes = _causes(saved, saved_model, model_config)
  if causes:
    lines.append(remedy({f'model.{name}': (value, getattr(model_config, name))
                         for name, value in causes.items()}, action, otherwise))
  else:
    lines.append('model: no config field explains the difference: the parameter layout changed '
                 f'since gemini_mini wrote this checkpoint; {action} it with the version that '
                 'wrote it' + (f', or {otherwise}' if otherwise else ''))
  raise CheckpointError('\n'.join(lines))


def restore_params(directory: str | pathlib.Path, step: int, abstract: nnx.State) -> nnx.State:
  """The parameters alone from the train state saved at ``step``, placed as ``abstract``
  (from ``abstract_params``) says; the optimizer state is not read."""
  directory = pathlib.Path(directory).absolute()
  target = {'params': abstract}
  manager = _reader(directory)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))
  except Exception as error:
    raise unreadable(directory, step, 'the parameters', error) from error
  finally:
    manager.close()
  return restored['state']['params']
