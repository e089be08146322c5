"""Configuration: frozen dataclasses loaded from YAML plus ``section.field=value`` overrides.

``load('configs/nano.yaml', ['model.num_layers=2', 'train.steps=10'])`` returns a ``Config``
with ``.model``, ``.data``, ``.train`` and ``.mesh``. Every field is type-checked and every
invalid value or combination raises ``ConfigError`` naming the key and the fix. The field
names are the canonical names used in code, logs and docs.
"""

import dataclasses
import difflib
import math
import pathlib
import types
import typing
from typing import Literal

import yaml



class ConfigError(ValueError):
  """An invalid configuration; the message names the offending key and how to fix it."""


def _require(condition: bool, key: str, message: str) -> None:
  if not condition:
    raise ConfigError(f'{key}: {message}')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The decoder's shape. ``num_experts: 0`` gives a dense model (every FFN a gated MLP)."""

  vocab_size: int = 8192
  d_model: int = 256
  tie_embeddings: bool = True    # output head = input table (TokenEmbed): copying generalizes
  scale_tied_logits: bool = True  # tied head: logits = x E^T / sqrt(d_model); false = x E^T
                                  # (Hugging Face's tied heads)
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 1          # 1 = multi-query; num_heads = multi-head; between = GQA
  head_dim: int = 64
  d_ff: int = 512                # hidden width of each expert and of dense FFNs
  num_experts: int = 8
  experts_per_token: int = 2     # k of top-k routing
  moe_every: int = 1             # layer i is MoE when (i + 1) % moe_every == 0
  capacity_factor: float = 1.25  # capacity dispatch: slots per expert = cf * T * k / E
  moe_dispatch: Literal['capacity', 'dropless'] = 'dropless'
  shared_expert: bool = False
  # The router's top-k weights renormalised to sum to one: when_k_above_1 (k = 1 keeps the
  # probability itself, Switch), always (Mixtral), never (OLMoE, Qwen-MoE)
  renormalize_top_k: Literal['when_k_above_1', 'always', 'never'] = 'when_k_above_1'
  activation: Literal['gelu', 'silu'] = 'gelu'  # the gated FFN's: GeGLU, or SwiGLU (Mixtral)
  norm_eps: float = 1e-6         # every RMSNorm's epsilon (Mixtral: 1e-5)
  max_length: int = 8192         # longest sequence (training, prompts + generation)
  attention_kernel: Literal['dense', 'chunked'] = 'chunked'
  attention_chunk: int = 256     # block size of the chunked kernel
  attention_window: int = 0      # local attention window in positions; 0 = global
  # RoPE's longest wavelength; 500,000 covers max_length at head_dim 64
  # (layers.similar_token_reach, docs/retrieval.md#rope-wavelength)
  rope_max_wavelength: float = 500_000.0
  patch_dim: int = 192           # flattened image patch (8 x 8 x 3)
  audio_dim: int = 320           # stacked log-mel frames (4 x 80)
  dtype: Literal['float32', 'bfloat16'] = 'float32'  # compute dtype; parameters stay float32
  remat: bool = False            # recompute each block's activations in the backward pass
  scan_layers: bool = False      # stack the blocks and lax.scan over groups of moe_every
                                 # layers: compile time independent of depth
  scalar_head: bool = False      # a scalar per position beside the logits: the reward
                                 # model's score (train.stage reward), PPO's value (rlhf)

  def __post_init__(self):
    for name in ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim',
                 'd_ff', 'max_length', 'attention_chunk', 'patch_dim', 'audio_dim'):
      _require(getattr(self, name) > 0, f'model.{name}', f'must be positive, got {getattr(self, name)}')
    _require(self.num_heads % self.num_kv_heads == 0, 'model.num_kv_heads',
             f'{self.num_kv_heads} does not divide model.num_heads ({self.num_heads}); use a '
             f'divisor of {self.num_heads} (1 = multi-query, {self.num_heads} = multi-head)')
    _require(self.head_dim % 2 == 0, 'model.head_dim',
             f'{self.head_dim} is odd; RoPE rotates pairs of dimensions, use an even head_dim')
    _require(self.num_experts >= 0, 'model.num_experts',
             f'must be >= 0 (0 = dense model), got {self.num_experts}')
    if self.num_experts:
      _require(1 <= self.experts_per_token <= self.num_experts, 'model.experts_per_token',
               f'top-k of {self.experts_per_token} is impossible with model.num_experts = '
               f'{self.num_experts}; use 1 <= experts_per_token <= num_experts')
      _require(1 <= self.moe_every <= self.num_layers, 'model.moe_every',
               f'{self.moe_every} must be in [1, model.num_layers ({self.num_layers})], '
               'or set model.num_experts: 0 for a dense model')
      _require(self.capacity_factor > 0, 'model.capacity_factor',
               f'must be positive, got {self.capacity_factor}')
      _require(not self.scan_layers or self.num_layers % self.moe_every == 0,
               'model.scan_layers', f'scanning runs groups of model.moe_every '
               f'({self.moe_every}) layers, which does not divide model.num_layers '
               f'({self.num_layers}); use a num_layers that is a multiple of moe_every, '
               'or set scan_layers: false')
    _require(0 < self.norm_eps < 1, 'model.norm_eps',
             f'must be in (0, 1), got {self.norm_eps}; RMSNorm adds it to the mean square')
    _require(self.attention_window >= 0, 'model.attention_window',
             f'must be >= 0 (0 = global attention), got {self.attention_window}')
    _require(self.rope_max_wavelength > 0, 'model.rope_max_wavelength',
             f'must be positive, got {self.rope_max_wavelength}')

  def is_moe_layer(self, layer: int) -> bool:
    return self.num_experts > 0 and (layer + 1) % self.moe_every == 0


def _task_names() -> tuple[str, ...]:
  """The task registry's names, imported when a data config is checked: importing
  ``config`` (as ``model.py`` does) pulls in no data code."""
  from gemini_mini.data.tasks import TASK_NAMES  # pylint: disable=import-outside-toplevel
  return TASK_NAMES



@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The training mixture (``data/mixture.py``) and the per-row item counts of the batch
  contract (``Batch.patches`` / ``Batch.audio``).

  ``weights`` maps a task of ``data/tasks.py`` to the probability, once normalised, that an
  example is drawn from it: per example, not per token. A task left out weighs 0 and is never
  read, so its dataset need not be prepared. ``data.weights.text=0.3`` sets one task's weight
  and keeps the others.
  """

  dir: str = 'data'            # prepared datasets (python -m gemini_mini.data.prepare)
  subset: Literal['full', 'small'] = 'full'  # 'small': a tiny sample that builds in seconds
  num_patches: int = 320       # P: image patches per row (16 per 32 x 32 image or frame)
  num_audio_frames: int = 256  # A: audio frames per row (40 ms each)
  # documents, image -> caption, audio -> transcript, video -> the word shown in one frame
  weights: dict[str, float] = dataclasses.field(default_factory=lambda: {
      'text': 0.55, 'caption': 0.15, 'speech': 0.15, 'video': 0.15})
  # The first N training steps draw `repeat` examples alone, whatever the weights: the copy
  # (induction) circuit that retrieval needs forms on clean copy data
  # (docs/retrieval.md#the-copy-circuit).
  repeat_only_steps: int = 0
  # With a loss > 0, repeats alone go on after those steps until a step's cross entropy (the
  # copy loss) falls below it, for at most twice as many steps in all: the step at which the
  # circuit forms varies with the seed.
  repeat_only_until_loss: float = 0.0

  def __post_init__(self):
    for name in ('num_patches', 'num_audio_frames'):
      _require(getattr(self, name) > 0, f'data.{name}', f'must be positive, got {getattr(self, name)}')
    _require(bool(self.dir), 'data.dir', 'must name a directory')
    _require(self.repeat_only_steps >= 0, 'data.repeat_only_steps',
             f'must be >= 0 (0 = the mixture from the first step), got {self.repeat_only_steps}')
    _require(self.repeat_only_until_loss >= 0, 'data.repeat_only_until_loss',
             f'must be >= 0 (0 = no loss condition), got {self.repeat_only_until_loss}')
    task_names = _task_names()
    for task, weight in self.weights.items():
      close = difflib.get_close_matches(str(task), task_names, n=1)
      _require(task in task_names, f'data.weights.{task}',
               f'unknown task{f" (did you mean {close[0]!r}?)" if close else ""}; the tasks '
               f'of data/tasks.py are {", ".join(task_names)}')
      _require(isinstance(weight, (int, float)) and not isinstance(weight, bool)
               and math.isfinite(weight) and weight >= 0, f'data.weights.{task}',
               f'must be a number >= 0 (0 = unused), got {weight!r}')
    _require(sum(self.weights.values()) > 0, 'data.weights',
             f'every task weight is 0 ({self.weights}); give at least one task a positive '
             'weight, e.g. data.weights.text=1')


STAGES = ('pretrain', 'sft', 'reward', 'rlhf', 'dpo', 'distill')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  # pretrain: the task mixture; sft: the same loop on demonstrations (loss on model turns);
  # reward: Bradley-Terry on preference pairs (model.scalar_head); rlhf: PPO against a reward
  # model; dpo: DPO on the preference pairs (docs/post_training.md); distill: the mixture's
  # next-token loss and the KL to train.teacher's predictions (docs/nano.md)
  stage: Literal['pretrain', 'sft', 'reward', 'rlhf', 'dpo', 'distill'] = 'pretrain'
  init_from: str = ''            # a train.run_dir whose parameters this run starts from
  teacher: str = ''              # distill: the frozen teacher's train.run_dir
  distill_alpha: float = 0.5     # distill: the KL's share of the loss, the rest cross-entropy
  distill_temperature: float = 1.0  # distill: both models' logits are divided by it
  # distill: the student's first parameters, random or the teacher's cut to the student's
  # widths (train/prune.py)
  student_init: Literal['random', 'pruned'] = 'random'
  steps: int = 1200
  batch_size: int = 8            # global: split over processes, devices and micro-batches
  seq_len: int = 512
  learning_rate: float = 3e-3    # peak, after warm-up
  warmup_steps: int = 100
  weight_decay: float = 0.1
  grad_clip: float = 1.0         # global gradient norm
  grad_accum_steps: int = 1      # micro-batches per step
  load_balance_weight: float = 0.01
  router_z_weight: float = 0.001
  logit_z_weight: float = 0.0
  seed: int = 0
  run_dir: str = 'runs/nano'
  checkpoint_every: int = 200
  keep_checkpoints: int = 3
  log_every: int = 10
  eval_every: int = 200          # held-out loss every N steps; 0 = never
  eval_batches: int = 4
  # For MFU; unset, the device's (train/metrics.device_peak_flops: GPU/TPU bfloat16 datasheet).
  peak_flops_per_device: float | None = None

  def __post_init__(self):
    for name in ('steps', 'batch_size', 'seq_len', 'checkpoint_every', 'grad_accum_steps',
                 'keep_checkpoints', 'log_every', 'eval_batches'):
      _require(getattr(self, name) > 0, f'train.{name}', f'must be positive, got {getattr(self, name)}')
    for name in ('warmup_steps', 'weight_decay', 'load_balance_weight', 'router_z_weight',
                 'logit_z_weight', 'eval_every'):
      _require(getattr(self, name) >= 0, f'train.{name}', f'must be >= 0, got {getattr(self, name)}')
    for name in ('learning_rate', 'grad_clip'):
      _require(getattr(self, name) > 0, f'train.{name}', f'must be positive, got {getattr(self, name)}')
    _require(self.peak_flops_per_device is None or self.peak_flops_per_device > 0,
             'train.peak_flops_per_device',
             f'must be positive, or null for the device\'s own, got {self.peak_flops_per_device}')
    _require(self.batch_size % self.grad_accum_steps == 0, 'train.grad_accum_steps',
             f'{self.grad_accum_steps} does not divide train.batch_size ({self.batch_size})')
    _require(bool(self.run_dir), 'train.run_dir', 'must name a directory')
    _require(self.stage in ('pretrain', 'distill') or bool(self.init_from), 'train.init_from',
             f'train.stage {self.stage} starts from another run\'s parameters; set '
             'train.init_from=RUN_DIR (for sft a pretrain run, for reward, rlhf and dpo an sft '
             'run)')
    _require(self.stage != 'pretrain' or not self.init_from, 'train.init_from',
             'pretraining starts from random parameters; drop train.init_from, or set '
             'train.stage=sft to fine-tune that run')
    _require(bool(self.teacher) == (self.stage == 'distill'), 'train.teacher',
             'train.stage distill needs the teacher\'s train.run_dir' if self.stage == 'distill'
             else f'only train.stage distill reads a teacher, not {self.stage}; drop '
             'train.teacher or set train.stage=distill')
    _require(0 <= self.distill_alpha <= 1, 'train.distill_alpha',
             f'must be in [0, 1] (0: cross-entropy alone, 1: the KL alone), got {self.distill_alpha}')
    _require(self.distill_temperature > 0, 'train.distill_temperature',
             f'must be positive, got {self.distill_temperature}')
    _require(self.student_init == 'random' or self.stage == 'distill', 'train.student_init',
             f'only a train.stage=distill student is cut from its teacher, not a {self.stage} '
             'run; drop train.student_init or set train.stage=distill')
    _require(self.stage in ('pretrain', 'sft') or self.grad_accum_steps == 1,
             'train.grad_accum_steps', f'train.stage {self.stage} takes one update per batch '
             f'of pairs or rollouts; set train.grad_accum_steps=1 and lower '
             'train.batch_size to save memory')
    _require(not self.init_from or pathlib.Path(self.init_from).resolve()
             != pathlib.Path(self.run_dir).resolve(), 'train.init_from',
             f'{self.init_from} is this run\'s own train.run_dir; pass another run')
    _require(not self.teacher or pathlib.Path(self.teacher).resolve()
             != pathlib.Path(self.run_dir).resolve(), 'train.teacher',
             f'{self.teacher} is this run\'s own train.run_dir; pass the teacher\'s run')


@dataclasses.dataclass(frozen=True)
class PostConfig:
  """The post-training stages' settings (``train.stage`` reward, rlhf and dpo)."""

  label_noise: float = 0.0       # reward, dpo: fraction of preference labels flipped
  dpo_beta: float = 0.1          # dpo: the implicit reward's scale (KL strength)
  pairs_per_row: int = 1         # reward, dpo: most preference pairs packed in a row
  reward_from: str = ''          # rlhf: the reward model's train.run_dir
  kl_coef: float = 0.05          # rlhf: per-token KL penalty to the frozen SFT model
  kl_target: float = 0.0         # rlhf: > 0 adapts kl_coef towards this KL per response
  kl_horizon: int = 10_000       # rlhf: the adaptive controller's horizon, in responses
  clip_ratio: float = 0.2        # rlhf: PPO's policy ratio clip
  value_clip: float = 0.2        # rlhf: PPO's value clip
  value_weight: float = 0.5      # rlhf: the value loss's weight beside the policy loss
  gamma: float = 1.0             # rlhf: discount over response tokens
  gae_lambda: float = 0.95       # rlhf: generalised advantage estimation's lambda
  ppo_epochs: int = 2            # rlhf: updates on each batch of rollouts
  max_new_tokens: int = 32       # rlhf: longest sampled response
  temperature: float = 1.0       # rlhf: rollout sampling temperature

  def __post_init__(self):
    _require(0 <= self.label_noise < 0.5, 'post.label_noise',
             f'must be in [0, 0.5) (at 0.5 labels carry no signal), got {self.label_noise}')
    for name in ('dpo_beta', 'clip_ratio', 'value_clip', 'temperature', 'gamma'):
      _require(getattr(self, name) > 0, f'post.{name}', f'must be positive, got {getattr(self, name)}')
    for name in ('kl_coef', 'kl_target', 'value_weight'):
      _require(getattr(self, name) >= 0, f'post.{name}', f'must be >= 0, got {getattr(self, name)}')
    for name in ('pairs_per_row', 'kl_horizon', 'ppo_epochs', 'max_new_tokens'):
      _require(getattr(self, name) > 0, f'post.{name}', f'must be positive, got {getattr(self, name)}')
    _require(0 <= self.gae_lambda <= 1 and self.gamma <= 1, 'post.gae_lambda',
             f'gae_lambda and gamma must be in [0, 1], got {self.gae_lambda} and {self.gamma}')


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Settings of ``eval.py``'s suites (``gemini_mini/evals/``); none affects training."""

  batch_size: int = 8             # prompts generated together
  trials: int = 10                # items per haystack cell (context length x depth)
  context_lengths: tuple[int, ...] = (512, 1024, 2048)   # text haystack, multi-needle, ruler
  depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # needle depth in the context
  video_seconds: tuple[int, ...] = (8, 16, 32)   # video haystack lengths, one frame a second
  audio_seconds: tuple[int, ...] = (10, 20, 30)  # audio haystack lengths
  num_needles: int = 10           # multi-needle: needles in one context
  perplexity_tokens: int = 8192   # NLL by position over windows of this many tokens
  perplexity_windows: int = 16    # windows per long document, their NLL averaged by position
  task_examples: int = 100        # captions, transcripts, keywords (of each voice split) scored
  samples: int = 8                # self-consistency: k sampled answers
  consistency_threshold: float = 0.5  # tau: the majority's share needed to beat greedy
  temperature: float = 0.7        # self-consistency sampling temperature
  factuality_items: int = 300     # factuality, preference: held-out post-training items, in order
  reward_from: str = ''           # preference: the reward model's run_dir ('' = post.reward_from)
  seed: int = 0

  def __post_init__(self):
    for name in ('batch_size', 'trials', 'num_needles', 'perplexity_tokens',
                 'perplexity_windows', 'task_examples', 'samples', 'factuality_items'):
      _require(getattr(self, name) > 0, f'eval.{name}', f'must be positive, got {getattr(self, name)}')
    for name in ('context_lengths', 'video_seconds', 'audio_seconds'):
      values = getattr(self, name)
      _require(bool(values) and min(values) > 0, f'eval.{name}',
               f'must be a non-empty list of positive numbers, got {list(values)}')
    _require(bool(self.depths) and all(0 <= depth <= 1 for depth in self.depths), 'eval.depths',
             f'must be a non-empty list of fractions in [0, 1], got {list(self.depths)}')
    _require(0 < self.consistency_threshold <= 1, 'eval.consistency_threshold',
             f'must be in (0, 1], got {self.consistency_threshold}')
    _require(self.temperature > 0, 'eval.temperature', f'must be positive, got {self.temperature}')


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh axis sizes (at most one may be -1: all remaining devices) and, for
  multi-process runs, how to reach the other processes."""

  data: int = -1
  fsdp: int = 1
  expert: int = 1
  tensor: int = 1
  num_processes: int = 1         # >1: jax.distributed.initialize with the fields below;
                                 # -1: let JAX detect the cluster (TPU pods, SLURM, env vars)
  process_id: int = 0
  coordinator_address: str = ''  # host:port of process 0

  def __post_init__(self):
    sizes = {axis: getattr(self, axis) for axis in ('data', 'fsdp', 'expert', 'tensor')}
    for name, size in sizes.items():
      _require(size == -1 or size >= 1, f'mesh.{name}', f'must be >= 1 or -1 (the rest), got {size}')
    _require(list(sizes.values()).count(-1) <= 1, 'mesh',
             f'only one axis may be -1, got {sizes}')
    _require(self.num_processes == -1 or self.num_processes >= 1, 'mesh.num_processes',
             f'must be >= 1 or -1 (auto-detect), got {self.num_processes}')
    if self.num_processes > 1:
      _require(0 <= self.process_id < self.num_processes, 'mesh.process_id',
               f'{self.process_id} is not in [0, mesh.num_processes ({self.num_processes}))')
      _require(bool(self.coordinator_address), 'mesh.coordinator_address',
               'a multi-process run needs host:port of process 0, e.g. 10.0.0.1:1234')


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = ModelConfig()
  data: DataConfig = dataclasses.field(default_factory=DataConfig)  # checked when made
  train: TrainConfig = TrainConfig()
  mesh: MeshConfig = MeshConfig()
  eval: EvalConfig = EvalConfig()
  post: PostConfig = PostConfig()

  def __post_init__(self):
    stage = self.train.stage
    _require(stage != 'rlhf' or bool(self.post.reward_from), 'post.reward_from',
             'train.stage rlhf needs a reward model; set post.reward_from to the run_dir of a '
             'train.stage=reward run')
    _require(self.model.scalar_head == (stage in ('reward', 'rlhf')), 'model.scalar_head',
             f'train.stage {stage} {"needs" if stage in ("reward", "rlhf") else "has no use for"} '
             f'the scalar head (the reward model\'s score, PPO\'s value); set '
             f'model.scalar_head={str(stage in ("reward", "rlhf")).lower()}')
    _require(self.train.seq_len <= self.model.max_length, 'train.seq_len',
             f'{self.train.seq_len} exceeds model.max_length ({self.model.max_length}); '
             'shorten train.seq_len or raise model.max_length')
    _require(self.data.num_patches <= self.train.seq_len, 'data.num_patches',
             f'{self.data.num_patches} patches cannot fit in train.seq_len ({self.train.seq_len})')

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


_SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _coerce(key: str, value, annotation):
  """``value`` as the field's type, or a ConfigError naming ``key``."""
  if typing.get_origin(annotation) is tuple:  # tuple[int, ...]: a YAML list
    _require(isinstance(value, (list, tuple)), key,
             f'expected a list like [1, 2], got {type(value).__name__} {value!r}')
    element = typing.get_args(annotation)[0]
    return tuple(_coerce(f'{key}[{i}]', item, element) for i, item in enumerate(value))
  if typing.get_origin(annotation) is dict:  # dict[str, float]: a YAML mapping
    _require(isinstance(value, dict), key,
             f'expected a mapping like {{name: value}}, got {type(value).__name__} {value!r}')
    element = typing.get_args(annotation)[1]
    return {name: _coerce(f'{key}.{name}', item, element) for name, item in value.items()}
  if isinstance(annotation, types.UnionType):  # float | None: null, or the other type
    (other,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    return None if value is None else _coerce(key, value, other)
  if typing.get_origin(annotation) is Literal:
    choices = typing.get_args(annotation)
    _require(value in choices, key, f'{value!r} is not one of {list(choices)}')
    return value
  if annotation is float and isinstance(value, str):
    try:  # YAML 1.1 reads '3e-4' as a string
      value = float(value)
    except ValueError:
      pass
  if annotation is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  ok = isinstance(value, annotation) and not (annotation is int and isinstance(value, bool))
  _require(ok, key, f'expected {annotation.__name__}, got {type(value).__name__} {value!r}')
  return value


def _suggest(name: str, options) -> str:
  close = difflib.get_close_matches(name, list(options), n=1)
  return f'; did you mean {close[0]!r}?' if close else f'; valid keys: {sorted(options)}'


def _old_weight_task(name: str) -> str | None:
  """The task of a per-task weight field of configs before ``data.weights`` (``text_weight``
  -> ``text``), or None."""
  task = str(name).removesuffix('_weight')
  return task if task != str(name) and task in _task_names() else None


def migrate_saved(raw: dict) -> dict:
  """``raw`` with the fields ``data.{task}_weight`` folded into ``data.weights``, on top of
  the default weights as those fields were.

  Configs had one weight field per task until commit fbbc84c (issue 34) replaced them with
  the mapping ``data.weights``; checkpoints store their config as a dict, so
  ``from_dict`` applies this and runs saved before still load for eval and resume. ``load``
  refuses those fields in YAML and overrides instead, naming the new spelling.
  """
  data = raw.get('data')
  if not isinstance(data, dict) or not any(map(_old_weight_task, data)):
    return raw
  weights = data.get('weights', DataConfig().weights)
  weights = {**(weights if isinstance(weights, dict) else {}),
             **{_old_weight_task(name): value for name, value in data.items()
                if _old_weight_task(name)}}
  migrated = {}
  for name, value in data.items():  # in place of the first, before any 'weights.{task}'
    if name == 'weights' or _old_weight_task(name):
      migrated.setdefault('weights', weights)
    else:
      migrated[name] = value
  return {**raw, 'data': migrated}


def from_dict(raw: dict, source: str = 'config') -> Config:
  """Builds a ``Config`` from ``{section: {field: value}}``, rejecting unknown keys.

  A key ``field.entry`` sets one entry of a mapping field (``weights.text: 0.3`` in
  ``data``) on top of the mapping given before it, or of the default. A config saved by an
  older version is migrated first (``migrate_saved``).
  """
  if not isinstance(raw, dict):
    raise ConfigError(f'{source}: expected a mapping of sections, got {type(raw).__name__}')
  raw = migrate_saved(raw)
  sections = {}
  for section, values in raw.items():
    if section not in _SECTIONS:
      raise ConfigError(f'{section}: unknown section in {source}{_suggest(section, _SECTIONS)}')
    cls = _SECTIONS[section]
    values = values or {}
    if not isinstance(values, dict):
      raise ConfigError(f'{section}: expected a mapping of fields in {source}')
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
      key = f'{section}.{name}'
      field, dot, entry = str(name).partition('.')
      if field not in hints:
        raise ConfigError(f'{key}: unknown key in {source}{_suggest(field, hints)}')
      if dot:
        _require(typing.get_origin(hints[field]) is dict, key,
                 f'{section}.{field} is not a mapping; set it with {section}.{field}=VALUE')
        value = {**kwargs.get(field, getattr(cls(), field)), entry: value}
      kwargs[field] = _coerce(f'{section}.{field}', value, hints[field])
    sections[section] = cls(**kwargs)
  return Config(**sections)


def parse_override(override: str) -> tuple[str, str, object]:
  """``'model.d_model=512'`` -> ``('model', 'd_model', 512)`` (the value parsed as YAML)."""
  key, sep, text = override.partition('=')
  section, dot, name = key.strip().partition('.')
  if not sep or not dot or not name:
    raise ConfigError(f'{override!r}: an override must look like section.field=value, '
                      'e.g. train.steps=100')
  return section, name, yaml.safe_load(text) if text.strip() else text


def _read_yaml(path: pathlib.Path, seen: tuple[pathlib.Path, ...] = ()) -> dict:
  """A config file's sections, on top of those of the file its ``base:`` key names (a path
  relative to it): a preset states only what differs from its base, field by field."""
  if not path.is_file():
    raise ConfigError(f'{path}: config file not found; pass an existing file such as '
                      'configs/nano.yaml')
  try:
    raw = yaml.safe_load(path.read_text()) or {}
  except yaml.YAMLError as error:
    raise ConfigError(f'{path}: not valid YAML ({error})') from error
  if not isinstance(raw, dict):
    raise ConfigError(f'{path}: expected a mapping of sections, got {type(raw).__name__}')
  base = raw.pop('base', None)
  if base is None:
    return raw
  base_path = (path.parent / str(base)).resolve()
  _require(base_path not in seen, f'{path}: base', f'{base} leads back to itself; name a '
           'file that does not, directly or through its own base')
  merged = _read_yaml(base_path, seen + (path.resolve(),))
  for section, fields in raw.items():
    if isinstance(fields, dict) and isinstance(merged.get(section), dict):
      merged[section] = {**merged[section], **fields}
    else:
      merged[section] = fields
  return merged


def load(path: str | pathlib.Path | None = None, overrides=()) -> Config:
  """Reads a YAML config (or the defaults when ``path`` is None) and applies overrides. A
  file may start from another with ``base: other.yaml`` (``_read_yaml``)."""
  raw: dict = {}
  source = 'defaults'
  if path is not None:
    path = pathlib.Path(path)
    raw = _read_yaml(path)
    source = str(path)
  for override in overrides:
    section, name, value = parse_override(override)
    fields = raw.get(section) or {}
    if not isinstance(fields, dict):
      raise ConfigError(f'{section}: expected a mapping of fields in {source}')
    fields = {key: old for key, old in fields.items() if key != name}  # the last one wins
    raw[section] = {**fields, name: value}
  for name in raw['data'] if isinstance(raw.get('data'), dict) else ():
    task = _old_weight_task(name)
    _require(task is None, f'data.{name}', f'renamed: write data.weights.{task} '
             f'(in YAML, data: {{weights: {{{task}: ...}}}})')
  return from_dict(raw, source)
