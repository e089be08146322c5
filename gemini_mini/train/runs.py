"""Parameters of other runs: where a stage starts (``train.init_from``) and the frozen models
it trains against (DPO's and PPO's reference, PPO's reward model, ``post.reward_from``, the
distillation teacher, ``train.teacher``).

Both are restored as parameters alone (no optimizer state), sharded on this run's mesh by
the same logical-axis rules as the trained model. A frozen model is built with its own saved
config, so it needs none of its fields repeated here; the run a stage starts from must build
this config's decoder, except that a new ``model.scalar_head`` starts at zero (a reward model
or a value head on top of a fine-tuned decoder).
"""

import dataclasses
import pathlib

from flax import nnx

from gemini_mini import checkpoint
from gemini_mini import config as config_lib
from gemini_mini.checkpoint import CheckpointError
from gemini_mini.infer.load import TOKENIZER


@dataclasses.dataclass(frozen=True)
class Frozen:
  """Another run's model, for forward passes only."""

  config: config_lib.Config   # as that run saved it
  graphdef: nnx.GraphDef
  params: nnx.State           # sharded on this run's mesh
  step: int

  def model(self, params=None):
    return nnx.merge(self.graphdef, self.params if params is None else params)


def _checkpoints(run_dir: str, key: str) -> pathlib.Path:
  directory = pathlib.Path(run_dir) / 'checkpoints'
  if not directory.is_dir():
    raise CheckpointError(f'{key}: {run_dir} holds no checkpoints/; pass the train.run_dir of '
                          'a finished run')
  if (pathlib.Path(run_dir) / TOKENIZER).is_file():
    raise CheckpointError(f'{key}: {run_dir} reads text with its own {TOKENIZER} (an imported '
                          'checkpoint\'s), and the training data is tokenized with '
                          'gemini_mini\'s: training it is not supported yet; evaluate or '
                          'quantize it instead')
  return directory


def load_frozen(run_dir: str, mesh, *, key: str, stage: str | None = None) -> Frozen:
  """The latest checkpoint of ``run_dir``, built with its own config. ``key`` is the config
  field that named it, for errors; ``stage``, when given, is the ``train.stage`` it must be
  (a reward model must come from a reward run)."""
  directory = _checkpoints(run_dir, key)
  try:
    step, saved = checkpoint.read_config(directory)
  except CheckpointError as error:
    raise CheckpointError(f'{key}: {error}') from error
  config = config_lib.from_dict(saved, f'{directory} (saved config)')
  if stage is not None and config.train.stage != stage:
    raise CheckpointError(f'{key}: {run_dir} is a train.stage={config.train.stage} run; pass '
                          f'the train.run_dir of a train.stage={stage} run')
  graphdef, abstract = checkpoint.abstract_params(config.model, mesh)
  return Frozen(config, graphdef, checkpoint.restore_params(directory, step, abstract), step)


def load_teacher(config: config_lib.Config, mesh) -> Frozen:
  """``train.teacher``'s latest checkpoint, checked to read this config's batches and predict
  over its vocabulary: the distillation term compares the two models' softmaxes token by
  token."""
  teacher = load_frozen(config.train.teacher, mesh, key='train.teacher')
  for name in ('vocab_size', 'patch_dim', 'audio_dim'):
    theirs, ours = getattr(teacher.config.model, name), getattr(config.model, name)
    if theirs != ours:
      raise CheckpointError(
          f'train.teacher: {config.train.teacher} has model.{name}={theirs}, this student '
          f'{ours}; a teacher and its student share the vocabulary and input features, so set '
          f'model.{name}={theirs}')
  return teacher


# Model fields that change what the parameters compute without changing their tree.
FUNCTION_FIELDS = ('activation', 'norm_eps', 'renormalize_top_k', 'scale_tied_logits')


@dataclasses.dataclass(frozen=True)
class Start:
  """``train.init_from``'s latest checkpoint, checked against this config's decoder."""

  directory: pathlib.Path
  step: int
  model: config_lib.ModelConfig  # the config's model with the saved run's scalar_head


def check_start(config: config_lib.Config) -> Start:
  """Checks, before anything is compiled, that ``train.init_from`` holds a checkpoint whose
  decoder this config builds: the same, or the same without the scalar head this stage adds.

  Raises:
    CheckpointError: no usable checkpoint there, a run with a scalar head this stage has no
      use for, or one whose decoder differs (naming the differing paths and the model fields
      to set).
  """
  key = 'train.init_from'
  directory = _checkpoints(config.train.init_from, key)
  try:
    step, saved = checkpoint.read_config(directory)
    saved_model = saved.get('model', {})
    saved_stage = saved.get('train', {}).get('stage', 'pretrain')
    if saved_model.get('scalar_head', False) and not config.model.scalar_head:
      raise CheckpointError(
          f'{config.train.init_from} is a train.stage={saved_stage} run, whose scalar head '
          f'train.stage={config.train.stage} has no use for; pass the train.run_dir of '
          f'{"a pretrain" if config.train.stage == "sft" else "an sft"} run')
    # The function must be the saved one: these fields leave the tree alone but change
    # what it computes (an imported Mixtral needs its own).
    defaults = config_lib.ModelConfig()
    differing = {f'model.{name}': (saved_model.get(name, getattr(defaults, name)),
                                   getattr(config.model, name))
                 for name in FUNCTION_FIELDS
                 if saved_model.get(name, getattr(defaults, name)) != getattr(config.model, name)}
    if differing:
      raise CheckpointError(f'{config.train.init_from} was trained with other model '
                            'conventions: ' + checkpoint.remedy(differing, 'start from it'))
    # The decoder must be the saved one; the head may be added (sft -> reward, rlhf).
    wanted = dataclasses.replace(config.model, scalar_head=bool(saved_model.get('scalar_head')))
    checkpoint.check_params(directory, step, saved_model, wanted,
                            action=f'start from it ({key})',
                            otherwise=f'set {key} to a run of this model')
  except CheckpointError as error:
    raise CheckpointError(f'{key}: {error}') from error
  return Start(directory, step, wanted)


def initial_params(start: Start, mesh, fresh: nnx.State) -> nnx.State:
  """``fresh`` (this config's newly initialised parameters) with every parameter of the
  checked ``start`` in place: all of them, or all but a new scalar head."""
  _, abstract = checkpoint.abstract_params(start.model, mesh)
  try:
    restored = checkpoint.restore_params(start.directory, start.step, abstract)
  except CheckpointError as error:
    raise CheckpointError(f'train.init_from: {error}') from error
  return nnx.merge_state(fresh, restored)
