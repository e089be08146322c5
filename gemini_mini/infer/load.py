"""A trained decoder from a run directory, for generation and evaluation.

``load('runs/nano')`` reads the latest complete checkpoint's config, applies overrides
(``eval.trials=20``, ``model.attention_kernel=chunked``; one that changes the parameter tree
is refused, naming the paths and the field), restores the parameters alone (not the
optimizer state) on this host's devices and returns the ``Decoder``.

It reads a quantized directory (``python -m gemini_mini.quantize``) the same way, with the same
overrides (``model.dtype=bfloat16``): its decoder holds ``qwix.QArray`` weights, runs
unchanged, and ``step`` is the source run's. So ``eval.py --checkpoint DIR`` takes either.
"""

import dataclasses
import functools
import pathlib

import jax
from flax import nnx

from gemini_mini import checkpoint
from gemini_mini import config as config_lib
from gemini_mini import parallel
from gemini_mini.model import Decoder
from gemini_mini.modalities.text import DEFAULT_MODEL, Tokenizer, TokenizerError
from gemini_mini.quant import checkpoint as quant_checkpoint


TOKENIZER = 'tokenizer.model'  # a run's own tokenizer (an imported checkpoint's), if any


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A restored decoder with the config it was trained with (overrides applied), its step,
  and its tokenizer's path: the run directory's ``tokenizer.model`` when it has one (an
  imported checkpoint's), else '' for gemini_mini's own."""

  decoder: Decoder
  config: config_lib.Config
  step: int
  tokenizer_path: str = ''

  @functools.cached_property
  def tokenizer(self) -> Tokenizer:
    """The run's ``Tokenizer``, checked to fit the model's vocabulary.

    Raises:
      TokenizerError: ids the model has no row for.
    """
    tokenizer = Tokenizer(self.tokenizer_path or DEFAULT_MODEL)
    if tokenizer.vocab_size > self.config.model.vocab_size:
      where = self.tokenizer_path or 'gemini_mini\'s own tokenizer'
      raise TokenizerError(
          f'{where} has {tokenizer.vocab_size} ids, the model {self.config.model.vocab_size} '
          f'rows (model.vocab_size); put the checkpoint\'s tokenizer.model in its run directory')
    return tokenizer


def _tokenizer_path(run_dir) -> str:
  path = pathlib.Path(run_dir) / TOKENIZER
  return str(path) if path.is_file() else ''


def load(run_dir: str | pathlib.Path, overrides=()) -> Loaded:
  """Restores the latest checkpoint of ``run_dir`` (a ``train.run_dir``, or a quantized
  directory).

  Raises:
    CheckpointError: no usable checkpoint, or an override that changes the parameter tree.
    ConfigError: a bad override.
  """
  if quant_checkpoint.is_quantized(run_dir):
    decoder, config, record = quant_checkpoint.load(run_dir, overrides)
    return Loaded(decoder, config, record['step'], _tokenizer_path(run_dir))
  directory = pathlib.Path(run_dir) / 'checkpoints'
  step, saved = checkpoint.read_config(directory)
  saved_model = dict(saved.get('model', {}))
  for override in overrides:
    section, name, value = config_lib.parse_override(override)
    saved.setdefault(section, {})[name] = value
  config = config_lib.from_dict(saved, f'{directory} (saved config + overrides)')
  checkpoint.check_params(directory, step, saved_model, config.model, action='load')
  # One process, all local devices; parameters sharded as the rules say.
  mesh = parallel.make_mesh(config_lib.MeshConfig(), jax.local_devices())
  graphdef, abstract = checkpoint.abstract_params(config.model, mesh)
  params = checkpoint.restore_params(directory, step, abstract)
  return Loaded(nnx.merge(graphdef, params), config, step, _tokenizer_path(run_dir))
