"""A Hugging Face Mixtral directory into a gemini_mini run directory.

The run directory holds ``checkpoints/0`` (the parameters and the config, as ``train.py``
writes them) and, when the source has one, its SentencePiece ``tokenizer.model``. Each
parameter is built straight into its place: ``jax.make_array_from_callback`` asks for each
device's shard on the mesh, and the callback reads the Hugging Face tensors that shard needs,
one at a time (an expert stack reads only its shard's experts). So the model is held once,
plus the tensor being read. The image and audio encoders, which Mixtral lacks, are
initialised as a new run's would be.
"""

import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemini_mini import checkpoint
from gemini_mini import config as config_lib
from gemini_mini import parallel
from gemini_mini.convert import mixtral
from gemini_mini.convert.hf_files import HFCheckpoint, HFFormatError
from gemini_mini.infer.load import TOKENIZER
from gemini_mini.model import Decoder
from gemini_mini.train.checkpoint import Checkpointer


def convert(source: str | pathlib.Path, out: str | pathlib.Path, overrides=()) -> config_lib.Config:
  """Writes ``out`` from the Hugging Face directory ``source`` and returns its config.

  ``overrides`` (``mesh.expert=4``, ``model.attention_kernel=dense``) apply on top of the
  fields the source's ``config.json`` gives; one that changes those is refused.

  Raises:
    HFFormatError: an unreadable or incomplete source, or another architecture.
    ConfigError: a bad override.
  """
  out = pathlib.Path(out)
  if out.exists():
    raise HFFormatError(f'{out} exists; pass a new --out directory')
  hf = HFCheckpoint(source)
  fields = mixtral.model_fields(hf.config)
  raw = {'model': dict(fields), 'train': {'run_dir': str(out)}}
  for override in overrides:
    section, name, value = config_lib.parse_override(override)
    if section == 'model' and name in fields:
      raise config_lib.ConfigError(f'{override}: model.{name} is set by {hf.directory}/'
                                   'config.json; drop the override')
    raw.setdefault(section, {})[name] = value
  config = config_lib.from_dict(raw, f'{hf.directory}/config.json + overrides')
  view = mixtral.HubView(hf)
  mixtral.check(view, config.model)
  mesh = parallel.make_mesh(config.mesh, jax.devices())
  params = _params(view, config.model, mesh)
  manager = Checkpointer(out / 'checkpoints', keep=1, config=config.to_dict())
  try:
    manager.save(0, {'step': jnp.zeros((), jnp.int32), 'params': params},
                 {'converted_from': str(hf.directory.absolute())})
  finally:
    manager.close()
  if (hf.directory / TOKENIZER).is_file():
    shutil.copyfile(hf.directory / TOKENIZER, out / TOKENIZER)
  return config


def _params(view: mixtral.HubView, model: config_lib.ModelConfig, mesh) -> nnx.State:
  """The decoder's parameters, sharded on ``mesh``: the Mixtral tensors streamed into place,
  the encoders freshly initialised."""
  if model.scan_layers:
    raise config_lib.ConfigError('model.scan_layers: a conversion writes unscanned layers; '
                                 'drop the override (a run may scan them later)')
  _, abstract = checkpoint.abstract_params(model, mesh)
  flat = dict(nnx.to_flat_state(abstract))
  mapped = {tensor.path: tensor for tensor in mixtral.tensors(model)}

  def fetch(name):
    return np.asarray(view.tensor(name), np.float32)

  def build(path, variable):
    tensor = mapped[path]
    return jax.make_array_from_callback(variable.shape, variable.sharding,
                                        lambda index: tensor.assemble(fetch, index))

  rest = [path for path in flat if path not in mapped]  # the encoders
  fresh = _fresh(model, {path: flat[path].sharding for path in rest})
  for path, variable in flat.items():
    flat[path] = variable.replace(fresh[path] if path in fresh else build(path, variable))
  return nnx.from_flat_state(flat)


def _fresh(model: config_lib.ModelConfig, shardings: dict) -> dict:
  """The parameters at ``shardings``' paths as ``Decoder(model, rngs=nnx.Rngs(0))``
  initialises them, placed by those shardings and computed alone: the jitted initialiser
  returns just these, so the rest is never materialised."""
  @jax.jit
  def init():
    flat = dict(nnx.to_flat_state(nnx.state(Decoder(model, rngs=nnx.Rngs(0)))))
    return {path: jax.lax.with_sharding_constraint(flat[path][...], sharding)
            for path, sharding in shardings.items()}
  return init()
