"""The preference stages: a reward model (``train.stage: reward``) and DPO (``dpo``).

Both read ``(chosen, rejected)`` batches of the same prompts (``data.preferences.PairStream``,
up to ``post.pairs_per_row`` pairs packed in a row, each its own segment) and run both halves
as one forward pass of ``2B`` rows:

- **reward**: the decoder with ``model.scalar_head`` scores each reply at the position that
  has read all of it (``infer.score.last_scored_index``), trained with the Bradley-Terry loss
  ``-log sigmoid(r_chosen - r_rejected)``;
- **dpo**: the policy's and the frozen reference's (``train.init_from``, the SFT model)
  log-probabilities of each reply, trained with DPO's loss at ``post.dpo_beta``.

Losses and metrics are means over the pairs of a step, however the rows pack them.

The MoE load-balance and z losses are added as in pretraining. The held-out evaluation reads
every pair of the ``eval`` split once, labelled by the gold judge (no label noise), and
reports the pairwise accuracy: the reward model's, or DPO's implicit reward's.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from gemini_mini import parallel
from gemini_mini.batch import Batch
from gemini_mini.config import Config
from gemini_mini.data.preferences import PairStream
from gemini_mini.infer.score import reply_logprobs, reply_masks, reply_scores
from gemini_mini.train import metrics as metrics_lib
from gemini_mini.train import objectives, runs
from gemini_mini.train.loss import LossWeights
from gemini_mini.train.optimizer import learning_rate_schedule, make_optimizer
from gemini_mini.train.stage import Stage
from gemini_mini.train.step import TrainState, abstract_train_state, apply_gradients

# What the preference stages read, for ``prepare.ensure``: the task whose dataset holds the
# post-training items.
DATASETS = {'demonstrations': 1.0}


def both(pair: tuple[Batch, Batch]) -> Batch:
  """The chosen rows, then the rejected rows: one ``[2B, ...]`` batch."""
  return jax.tree.map(lambda c, r: jnp.concatenate([c, r]), *pair)


def _split(x_B):
  """The chosen rows and the rejected rows of a ``both`` batch's values."""
  half = x_B.shape[0] // 2
  return x_B[:half], x_B[half:]


def make_objective(stage: str, graphdef, weights: LossWeights, beta: float, pairs_per_row: int,
                   reference_graphdef=None):
  """``objective(params, pair, reference_params) -> (loss, metrics)`` of ``stage``; the
  metrics are means over the pairs the chosen rows hold (the empty segments of a row, and the
  padding rows of the last held-out batch, count nowhere)."""

  def objective(params, pair, reference_params):
    batch = both(pair)
    valid_X = (reply_masks(pair[0], pairs_per_row).sum(axis=-1) > 0).astype(jnp.float32).ravel()
    model = nnx.merge(graphdef, params)
    if stage == 'reward':
      score_BU, aux = reply_scores(model, batch, pairs_per_row)
      chosen_X, rejected_X = (half.ravel() for half in _split(score_BU))
      loss, accuracy = objectives.bradley_terry(chosen_X, rejected_X, valid_X)
      extra = objectives.reward_means(chosen_X, rejected_X, valid_X)
    else:
      logp_BU, aux = reply_logprobs(model, batch, pairs_per_row)
      reference = nnx.merge(reference_graphdef, jax.lax.stop_gradient(reference_params))
      reference_BU, _ = reply_logprobs(reference, batch, pairs_per_row)
      loss, extra = objectives.dpo(*(half.ravel() for half in _split(logp_BU)),
                                   *(half.ravel() for half in _split(reference_BU)), beta,
                                   valid_X)
      accuracy = extra.pop('accuracy')
    total = loss + weights.load_balance * aux['load_balance'] + weights.router_z * aux['router_z']
    metrics = {'loss': total, 'preference_loss': loss, 'accuracy': accuracy, 'pairs': valid_X.sum(),
               'load_balance': aux['load_balance'], 'router_z': aux['router_z'], **extra,
               'expert_load_LE': aux['expert_load_LE'], 'dropped_L': aux['dropped_L']}
    return total, metrics

  return objective


class PreferenceStage(Stage):
  """``reward`` and ``dpo`` for ``loop.run``."""

  def __init__(self, config: Config, mesh):
    t, p = config.train, config.post
    self.config, self.mesh = config, mesh
    self.optimizer = make_optimizer(learning_rate=t.learning_rate, steps=t.steps,
                                    warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
                                    grad_clip=t.grad_clip)
    self.graphdef, self.shardings, self.abstract = abstract_train_state(
        config.model, self.optimizer, mesh, t.seed)
    self.reference = None
    reference_graphdef = None
    if t.stage == 'dpo':
      self.reference = runs.load_frozen(t.init_from, mesh, key='train.init_from')
      reference_graphdef = self.reference.graphdef
    weights = LossWeights(t.load_balance_weight, t.router_z_weight, t.logit_z_weight)
    objective = make_objective(t.stage, self.graphdef, weights, p.dpo_beta, p.pairs_per_row,
                               reference_graphdef)
    schedule = learning_rate_schedule(t.learning_rate, t.steps, t.warmup_steps)

    def train_step(state: TrainState, pair, reference_params):
      grads, metrics = jax.grad(objective, has_aux=True)(state.params, pair, reference_params)
      state, update = apply_gradients(state, grads, self.optimizer, schedule)
      return state, {**metrics, **update}

    pair_sharding = parallel.batch_sharding(mesh)
    reference_sharding = None if self.reference is None else jax.tree.map(
        lambda a: a.sharding, self.reference.params)
    self._train_step = jax.jit(train_step, donate_argnums=0,
                               in_shardings=(self.shardings, pair_sharding, reference_sharding),
                               out_shardings=(self.shardings, None))
    self._eval_step = jax.jit(lambda params, pair, reference: objective(params, pair, reference)[1])
    rows = 2 * t.batch_size * t.seq_len  # chosen and rejected
    self.tokens_per_step = rows
    # The reference's forward pass is a third of a trained token's FLOPs.
    per_token = metrics_lib.train_flops_per_token(config.model, t.seq_len)
    self.flops_per_step = per_token * rows * (4 / 3 if t.stage == 'dpo' else 1)
    self.data = None

  def datasets(self) -> dict[str, float]:
    return DATASETS

  def _stream(self, split: str, label_noise: float) -> PairStream:
    m, d, t = self.config.model, self.config.data, self.config.train
    return PairStream(d.dir, split, batch_size=t.batch_size, seq_len=t.seq_len,
                      num_patches=d.num_patches, num_audio_frames=d.num_audio_frames,
                      patch_dim=m.patch_dim, audio_dim=m.audio_dim, seed=t.seed,
                      label_noise=label_noise, pairs_per_row=self.config.post.pairs_per_row,
                      subset=d.subset,
                      process_index=jax.process_index(), process_count=jax.process_count())

  def open_data(self, state: dict | None) -> None:
    self.data = self._stream('preference', self.config.post.label_noise)
    if state is not None:
      self.data.set_state(state)

  def data_state(self) -> dict:
    return self.data.get_state()

  def _reference_params(self):
    return None if self.reference is None else self.reference.params

  def train(self, state: TrainState, step: int):
    del step
    pair = parallel.host_local_to_global(next(self.data), self.mesh)
    with jax.set_mesh(self.mesh):
      return self._train_step(state, pair, self._reference_params())

  def evaluate(self, params) -> dict:
    """Held-out pairs, each once, labelled by the gold judge: pair-weighted means."""
    totals, pairs = {}, 0.0
    for pair in self._stream('eval', 0.0):
      with jax.set_mesh(self.mesh):
        metrics = self._eval_step(params, parallel.host_local_to_global(pair, self.mesh),
                                  self._reference_params())
      count = float(metrics['pairs'])
      for name in ('preference_loss', 'accuracy', 'reward_margin', 'reward_chosen',
                   'reward_rejected'):
        totals[name] = totals.get(name, 0.0) + float(metrics[name]) * count
      pairs += count
    return {f'eval/{name}': total / max(pairs, 1.0) for name, total in totals.items()}
