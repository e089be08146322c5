"""A trained decoder from a run directory, for generation and evaluation.

``load('runs/nano')`` reads the latest complete checkpoint's config, applies overrides
(``eval.trials=20``, ``model.attention_kernel=chunked``; fields that change shapes must
match the checkpoint and are refused otherwise), restores the parameters on this host's
devices and returns the ``Decoder``.
"""

import dataclasses
import pathlib

import jax
from flax import nnx

from gemini_mini import config as config_lib
from gemini_mini import parallel
from gemini_mini.model import Decoder
from gemini_mini.train.checkpoint import Checkpointer, read_config
from gemini_mini.train.optimizer import make_optimizer
from gemini_mini.train.step import abstract_train_state


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A restored decoder with the config it was trained with (overrides applied) and its step."""

  decoder: Decoder
  config: config_lib.Config
  step: int


def load(run_dir: str | pathlib.Path, overrides=()) -> Loaded:
  """Restores the latest checkpoint of ``run_dir`` (a ``train.run_dir``).

  Raises:
    CheckpointError: no usable checkpoint, or an override that changes shapes.
    ConfigError: a bad override.
  """
  directory = pathlib.Path(run_dir) / 'checkpoints'
  _, saved = read_config(directory)
  for override in overrides:
    section, name, value = config_lib.parse_override(override)
    saved.setdefault(section, {})[name] = value
  config = config_lib.from_dict(saved, f'{directory} (saved config + overrides)')
  # One process, all local devices; parameters sharded as the rules say.
  mesh = parallel.make_mesh(config_lib.MeshConfig(), jax.local_devices())
  t = config.train
  optimizer = make_optimizer(learning_rate=t.learning_rate, steps=t.steps,
                             warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
                             grad_clip=t.grad_clip)
  graphdef, _, abstract = abstract_train_state(config.model, optimizer, mesh, t.seed)
  checkpointer = Checkpointer(directory, keep=t.keep_checkpoints, config=config.to_dict())
  try:
    step, state, _ = checkpointer.restore(abstract)
  finally:
    checkpointer.close()
  return Loaded(nnx.merge(graphdef, state.params), config, step)
