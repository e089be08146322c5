"""RLHF (``train.stage: rlhf``): PPO against a reward model, with a KL penalty to the SFT model.

One step of the loop is one PPO iteration:

    prompts  --infer.generate (policy, KV cache, sampled)--> replies
    prompt + reply rows --score (no gradient)--> the policy's log-probabilities and values,
                          the reference's log-probabilities, the reward model's score
    per-token reward  r_t = -kl_coef * (log pi - log ref)_t,  + score at the reply's last token
    GAE (gamma, lambda) --> advantages (whitened) and returns
    post.ppo_epochs updates of  clipped policy loss + value_weight * clipped value loss
                                + the MoE load-balance and z losses

The policy is the decoder with a value head (``model.scalar_head``) that starts from
``train.init_from`` (the SFT run; the head starts at zero); the reference is that same SFT
run, frozen; the reward model is ``post.reward_from``, frozen. Frozen parameters are
arguments of the jitted functions, never differentiated. With ``post.kl_target`` > 0 the
coefficient follows Ziegler et al.'s proportional controller (``objectives.adaptive_kl_coef``).

A step is a pure function of the state, the prompt stream's position and the step number (the
sampling seed is derived from ``train.seed`` and the step), and the KL coefficient is saved
with the stream's state: a resumed run samples the same replies as an uninterrupted one.
The gold judge's score of the rollouts is logged beside the reward model's (``gold_score``,
``reward``), so over-optimisation of the proxy shows as the two part.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemini_mini import parallel
from gemini_mini.batch import Batch
from gemini_mini.config import Config
from gemini_mini.data import post_training
from gemini_mini.data.preferences import PromptStream
from gemini_mini.infer.generate import generate
from gemini_mini.infer.score import last_scored_index, reply_scores, token_logprobs
from gemini_mini.modalities import conversation, interleave
from gemini_mini.modalities.segments import Segment
from gemini_mini.modalities.text import Tokenizer
from gemini_mini.train import metrics as metrics_lib
from gemini_mini.train import objectives, runs
from gemini_mini.train.loss import LossWeights
from gemini_mini.train.optimizer import learning_rate_schedule, make_optimizer
from gemini_mini.train.preference import DATASETS
from gemini_mini.train.stage import Stage
from gemini_mini.train.step import TrainState, abstract_train_state, apply_gradients


def rollout_batch(prompts, replies, tokenizer, *, seq_len, num_patches, num_audio_frames,
                  patch_dim, audio_dim) -> Batch:
  """Each prompt followed by its sampled reply tokens (scored: the actions), one per row."""
  rows = []
  for prompt, tokens in zip(prompts, replies):
    flat = interleave.flatten(list(prompt) + [Segment.text(tokens)], tokenizer)
    if len(flat.tokens) > seq_len:
      raise ValueError(f'a prompt and its reply take {len(flat.tokens)} positions but '
                       f'train.seq_len is {seq_len}; raise train.seq_len or lower '
                       'post.max_new_tokens')
    rows.append([flat])
  return interleave.pack_rows(rows, seq_len=seq_len, num_patches=num_patches,
                              num_audio_frames=num_audio_frames, patch_dim=patch_dim,
                              audio_dim=audio_dim)


def make_score(graphdef, reference_graphdef, reward_graphdef, post):
  """``score(params, reference_params, reward_params, batch, kl_coef) -> rollout`` (a dict):
  what the update needs (old log-probabilities and values, advantages, returns) and what is
  logged. Nothing here is differentiated."""

  def score(params, reference_params, reward_params, batch: Batch, kl_coef):
    mask_BT = batch.loss_mask
    policy = nnx.merge(graphdef, params)
    h_BTD, _ = policy.hidden(batch)
    logits_BTV = policy.text.logits(h_BTD)
    logp_BT = token_logprobs(logits_BTV, batch.targets)
    values_BT = policy.scalar_head(h_BTD) * mask_BT
    reference_logits_BTV, _ = nnx.merge(reference_graphdef, reference_params)(batch)
    reference_logp_BT = token_logprobs(reference_logits_BTV, batch.targets)
    score_BU, _ = reply_scores(nnx.merge(reward_graphdef, reward_params), batch)
    score_B = score_BU[:, 0]  # one reply a row
    # k1 in the reward: summed over a reply it is the reply's log-ratio, whose expectation
    # is the KL and whose policy gradient is the KL's (objectives.kl_penalty).
    kl_BT = objectives.kl_penalty(logp_BT, reference_logp_BT, mask_BT, 'k1')
    last_BT = jax.nn.one_hot(last_scored_index(mask_BT) - 1, mask_BT.shape[1])
    rewards_BT = -kl_coef * kl_BT + score_B[:, None] * last_BT * mask_BT
    advantages_BT, returns_BT = objectives.gae(rewards_BT, values_BT, mask_BT, post.gamma,
                                               post.gae_lambda)
    replies = jnp.maximum(mask_BT.sum(), 1.0)
    rows = mask_BT.shape[0]
    return {
        'logp_BT': logp_BT, 'values_BT': values_BT, 'returns_BT': returns_BT,
        'advantages_BT': objectives.whiten(advantages_BT, mask_BT),
        'reward': score_B.mean(), 'reward_std': score_B.std(),
        'kl': kl_BT.sum() / rows,
        'kl_k3': objectives.kl_penalty(logp_BT, reference_logp_BT, mask_BT, 'k3').sum() / rows,
        'entropy': objectives.entropy(logits_BTV, mask_BT),
        'response_length': replies / rows,
    }

  return score


def make_update(graphdef, optimizer, schedule, post, weights):
  """``update(state, batch, rollout) -> (state, metrics)``: one PPO gradient step."""

  def objective(params, batch: Batch, rollout):
    mask_BT = batch.loss_mask
    policy = nnx.merge(graphdef, params)
    h_BTD, aux = policy.hidden(batch)
    logp_BT = token_logprobs(policy.text.logits(h_BTD), batch.targets)
    values_BT = policy.scalar_head(h_BTD)
    policy_loss, clip_fraction, approx_kl = objectives.ppo_policy_loss(
        logp_BT, rollout['logp_BT'], rollout['advantages_BT'], mask_BT, post.clip_ratio)
    value_loss = objectives.ppo_value_loss(values_BT, rollout['values_BT'],
                                           rollout['returns_BT'], mask_BT, post.value_clip)
    loss = (policy_loss + post.value_weight * value_loss
            + weights.load_balance * aux['load_balance'] + weights.router_z * aux['router_z'])
    return loss, {'loss': loss, 'policy_loss': policy_loss, 'value_loss': value_loss,
                  'clip_fraction': clip_fraction, 'approx_kl': approx_kl,
                  'load_balance': aux['load_balance'], 'router_z': aux['router_z'],
                  'expert_load_LE': aux['expert_load_LE'], 'dropped_L': aux['dropped_L']}

  def update(state: TrainState, batch: Batch, rollout):
    grads, metrics = jax.grad(objective, has_aux=True)(state.params, batch, rollout)
    state, applied = apply_gradients(state, grads, optimizer, schedule)
    return state, {**metrics, **applied}

  return update


def rollout_seed(seed: int, step: int) -> int:
  """The sampling seed of step ``step``: fixed by the run's seed and the step alone, so a
  resumed run samples what an uninterrupted one did."""
  return int(np.random.SeedSequence([seed, step]).generate_state(1)[0] & 0x7FFFFFFF)


def optimizer_settings(train, post) -> tuple:
  """``make_optimizer``'s settings for PPO: its schedule counts updates, ``post.ppo_epochs``
  a step."""
  return (('learning_rate', train.learning_rate), ('steps', train.steps * post.ppo_epochs),
          ('warmup_steps', train.warmup_steps * post.ppo_epochs),
          ('weight_decay', train.weight_decay), ('grad_clip', train.grad_clip))


@functools.cache
def ppo_optimizer(settings: tuple):
  """One optimizer object per setting, so that ``compiled_steps`` finds it again."""
  return make_optimizer(**dict(settings))


@functools.cache
def compiled_steps(model_config, reference_graphdef, reward_graphdef, settings: tuple,
                   weights: LossWeights, post, mesh):
  """``(score, update)``, jitted, built once per process for equal settings: a resumed run,
  or another stage of the same config in one process (tests, notebooks), reuses the
  compiled programs."""
  options = dict(settings)
  graphdef, shardings, _ = abstract_train_state(model_config, ppo_optimizer(settings), mesh, 0)
  schedule = learning_rate_schedule(options['learning_rate'], options['steps'],
                                    options['warmup_steps'])
  score = jax.jit(make_score(graphdef, reference_graphdef, reward_graphdef, post))
  update = jax.jit(make_update(graphdef, ppo_optimizer(settings), schedule, post, weights),
                   donate_argnums=0, out_shardings=(shardings, None))
  return score, update


class RLHFStage(Stage):
  """``rlhf`` for ``loop.run``. Its held-out figures come from ``eval.py --suite
  factuality`` and ``--suite preference``, not from the loop."""

  def __init__(self, config: Config, mesh):
    t, p, m, d = config.train, config.post, config.model, config.data
    self.config, self.mesh = config, mesh
    self.reference = runs.load_frozen(t.init_from, mesh, key='train.init_from')
    self.reward = runs.load_frozen(p.reward_from, mesh, key='post.reward_from', stage='reward')
    settings = optimizer_settings(t, p)
    self.optimizer = ppo_optimizer(settings)
    self.graphdef, self.shardings, self.abstract = abstract_train_state(
        m, self.optimizer, mesh, t.seed)
    weights = LossWeights(t.load_balance_weight, t.router_z_weight, t.logit_z_weight)
    self._score, self._update = compiled_steps(
        m, self.reference.graphdef, self.reward.graphdef, settings, weights, p, mesh)
    self.tokenizer = Tokenizer()
    self.kl_coef = p.kl_coef
    self._rows = dict(seq_len=t.seq_len, num_patches=d.num_patches,
                      num_audio_frames=d.num_audio_frames, patch_dim=m.patch_dim,
                      audio_dim=m.audio_dim)
    # Every rollout batch padded to one shape: one compiled generation for the whole run.
    self._prompt_shape = (t.seq_len - p.max_new_tokens, d.num_patches, d.num_audio_frames)
    tokens = t.batch_size * t.seq_len
    self.tokens_per_step = tokens
    # Counted: the updates, and the three scoring forward passes as one more (a forward pass
    # is a third of a trained token); generation's cached decoding is left out.
    self.flops_per_step = (metrics_lib.train_flops_per_token(m, t.seq_len) * tokens
                           * (p.ppo_epochs + 1))
    self.data = None

  def datasets(self) -> dict[str, float]:
    return DATASETS

  def open_data(self, state: dict | None) -> None:
    t, d = self.config.train, self.config.data
    self.data = PromptStream(d.dir, 'preference', batch_size=t.batch_size, seed=t.seed,
                             subset=d.subset, process_index=jax.process_index(),
                             process_count=jax.process_count())
    if state is not None:
      self.data.set_state(state['prompts'])
      self.kl_coef = float(state['kl_coef'])

  def data_state(self) -> dict:
    return {'prompts': self.data.get_state(), 'kl_coef': self.kl_coef}

  def train(self, state: TrainState, step: int):
    t, p = self.config.train, self.config.post
    prompts, items = zip(*next(self.data))
    policy = nnx.merge(self.graphdef, state.params)
    # Outside the mesh context: generate builds its own graph, which logical axis names
    # must not try to shard there; the parameters keep their shardings.
    generations = generate(policy, prompts, self.tokenizer, max_new_tokens=p.max_new_tokens,
                           temperature=p.temperature, stop_ids=conversation.stop_ids(self.tokenizer),
                           seed=rollout_seed(t.seed, step), prompt_shape=self._prompt_shape)
    batch = parallel.host_local_to_global(
        rollout_batch(prompts, [g.tokens for g in generations], self.tokenizer, **self._rows),
        self.mesh)
    with jax.set_mesh(self.mesh):
      rollout = self._score(state.params, self.reference.params, self.reward.params, batch,
                            jnp.float32(self.kl_coef))
      logged = {name: rollout.pop(name) for name in
                ('reward', 'reward_std', 'kl', 'kl_k3', 'entropy', 'response_length')}
      for _ in range(p.ppo_epochs):
        state, metrics = self._update(state, batch, rollout)
    gold = [post_training.judge(item, g.text) for item, g in zip(items, generations)]
    logged.update(gold_score=np.mean([v.score for v in gold]),
                  gold_hallucinated=np.mean([v.hallucinated for v in gold]),
                  kl_coef=self.kl_coef)
    if p.kl_target > 0:
      self.kl_coef = float(objectives.adaptive_kl_coef(self.kl_coef, float(logged['kl']),
                                                       p.kl_target, p.kl_horizon, t.batch_size))
    return state, {**metrics, **logged}
