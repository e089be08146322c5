"""Preference suite: the reward model's held-out accuracy, and a post-trained policy's win rate
against the SFT model it started from, by the gold judge and by the reward model side by side.

What it measures depends on the loaded run's ``train.stage``:

* ``reward``: pairwise accuracy on every held-out pair (``PairStream`` over the ``eval`` split,
  label noise 0, so the labels are the gold judge's; rows shaped and packed by the run's
  ``train.seq_len``, ``data.num_patches``, ``data.num_audio_frames`` and
  ``post.pairs_per_row``, which leave each pair's score unchanged): the fraction of
  pairs whose chosen reply the reward model scores higher (ties half), overall and per kind,
  with the mean scores of chosen and rejected replies. Plot: ``preference_rm_accuracy.png``.
* ``rlhf``, ``dpo``: the policy (the loaded run) and its reference, the SFT run it started
  from (``train.init_from``), answer the first ``eval.factuality_items`` held-out items
  greedily in the conversation format (``factuality.held_out``, at most
  ``factuality.MAX_NEW_TOKENS`` tokens, stopping at ``<end_of_turn>``). Both replies are
  scored by the gold judge (``post_training.judge``) and by a reward model: ``eval.reward_from``
  or, when empty, the run's ``post.reward_from`` (the one PPO optimised; a DPO run has none
  unless given). The reward model reads the prompt and the generated tokens as PPO's rollouts
  do (``rlhf.rollout_batch``) and scores the last reply token (``infer.score.reply_scores``).
  The policy's win rate over SFT is ``(wins + ties / 2) / items`` by each scorer, overall and
  per kind (``win_rate``): a reward-model win rate well above the gold one is the proxy being
  over-optimised. With no reward model to use, only the gold figures are given and
  ``reward_model`` says why. Figures also hold both models' mean scores and their
  ``factuality.rates``. Plot: ``preference_win_rate.png``. An ``rlhf`` run's training
  curves are plotted from its ``metrics.jsonl`` (read from the run's saved ``train.run_dir``):
  ``preference_reward_kl.png`` (the reward model's reward, mean and spread, and the KL to the
  reference, with the KL coefficient, over RL steps) and ``preference_gold_vs_proxy.png``
  (gold score and reward over steps, and one against the other); a curve that was not logged
  is left out, and a plot with none of its curves is not drawn (``figures['plots']`` lists
  what was written or why not).
* ``pretrain``, ``sft``: skipped, with the reason (no reward model, no policy to compare).

Writes ``preference.json``; its ``items`` are the held-out pairs' scores (reward run) or both
models' replies and scores (rlhf, dpo).
"""

import functools
import pathlib
from typing import Sequence

import jax
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from gemini_mini.checkpoint import CheckpointError
from gemini_mini.data import post_training, prepare
from gemini_mini.data.preferences import PairStream
from gemini_mini.evals import common, factuality
from gemini_mini.infer.generate import Generation
from gemini_mini.infer.score import reply_scores
from gemini_mini.infer.load import Loaded, load
from gemini_mini.modalities import conversation, interleave
from gemini_mini.modalities.segments import Segment
from gemini_mini.modalities.text import Tokenizer
from gemini_mini.train.metrics import read_metrics

SUITE = 'preference'
POLICY_STAGES = ('rlhf', 'dpo')
ROW_BUCKET = 64  # reward-model rows are rounded up to this many positions: one compile


@functools.partial(jax.jit, static_argnames=('graphdef', 'num_replies'))
def _scores(graphdef, state, batch, num_replies):
  score_BU, _ = reply_scores(nnx.merge(graphdef, state), batch, num_replies)
  return score_BU


def score_batch(decoder, batch, num_replies: int = 1) -> np.ndarray:
  """The scalar head's score of each reply a row holds (``infer.score.reply_masks``),
  ``[B, num_replies]``."""
  graphdef, state = nnx.split(decoder)
  return np.asarray(_scores(graphdef, state, batch, num_replies))


def pairwise_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> float:
  """The fraction of pairs whose chosen score is higher, ties counting half."""
  chosen, rejected = np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)
  if chosen.shape != rejected.shape or not chosen.size:
    raise ValueError(f'{chosen.size} chosen and {rejected.size} rejected scores; pass one of '
                     'each per pair, at least one pair')
  return float(np.mean(chosen > rejected) + np.mean(chosen == rejected) / 2)


def win_rate(policy: Sequence[float], reference: Sequence[float]) -> dict:
  """``{'items', 'wins', 'ties', 'losses', 'win_rate', 'policy_mean', 'reference_mean'}``:
  per item the policy's score against the reference's, win rate ``(wins + ties / 2) /
  items``."""
  policy, reference = np.asarray(policy, np.float64), np.asarray(reference, np.float64)
  if policy.shape != reference.shape or not policy.size:
    raise ValueError(f'{policy.size} policy and {reference.size} reference scores; pass one '
                     'of each per item, at least one item')
  wins, ties = int(np.sum(policy > reference)), int(np.sum(policy == reference))
  return {'items': int(policy.size), 'wins': wins, 'ties': ties,
          'losses': int(policy.size) - wins - ties,
          'win_rate': (wins + ties / 2) / policy.size, 'policy_mean': float(policy.mean()),
          'reference_mean': float(reference.mean())}


def reward_accuracy(loaded: Loaded) -> tuple[dict, list]:
  """A reward run's held-out pairwise accuracy (see the module docstring) and per-pair
  records."""
  model, data, train = loaded.config.model, loaded.config.data, loaded.config.train
  prepare.ensure(data.dir, data.subset, factuality.DATASETS)
  size = loaded.config.eval.batch_size
  per_row = loaded.config.post.pairs_per_row
  stream = PairStream(data.dir, 'eval', batch_size=size, seq_len=train.seq_len,
                      num_patches=data.num_patches, num_audio_frames=data.num_audio_frames,
                      patch_dim=model.patch_dim, audio_dim=model.audio_dim, seed=train.seed,
                      label_noise=0.0, pairs_per_row=per_row, subset=data.subset)
  records = []
  for chosen, rejected in stream:
    chosen_BU = score_batch(loaded.decoder, chosen, per_row)
    rejected_BU = score_batch(loaded.decoder, rejected, per_row)
    for row, row_items in enumerate(stream.last_items):
      for u, item in enumerate(row_items):
        records.append({'index': item.index, 'kind': item.kind, 'answerable': item.answerable,
                        'chosen': float(chosen_BU[row, u]),
                        'rejected': float(rejected_BU[row, u])})

  def summary(chosen_records) -> dict:
    chosen_ = [r['chosen'] for r in chosen_records]
    rejected_ = [r['rejected'] for r in chosen_records]
    return {'pairs': len(chosen_records), 'accuracy': pairwise_accuracy(chosen_, rejected_),
            'chosen_mean': float(np.mean(chosen_)), 'rejected_mean': float(np.mean(rejected_))}

  by_kind = {kind: summary(chosen) for kind in post_training.KINDS
             if (chosen := [r for r in records if r['kind'] == kind])}
  return {'stage': 'reward', **summary(records), 'by_kind': by_kind}, records


def reward_scores(reward_model: Loaded, prompts: Sequence[list[Segment]],
                  generations: Sequence[Generation], tokenizer: Tokenizer) -> np.ndarray:
  """The reward model's score of each prompt followed by its generated tokens, one per row,
  ``eval.batch_size`` rows at a time, all batches one shape."""
  flats = [interleave.flatten(list(prompt) + [Segment.text(generation.tokens)], tokenizer)
           for prompt, generation in zip(prompts, generations, strict=True)]
  config = reward_model.decoder.config
  longest = max(len(flat.tokens) for flat in flats)
  shapes = dict(seq_len=min(-(-longest // ROW_BUCKET) * ROW_BUCKET, config.max_length),
                num_patches=max(1, *(len(flat.patches) for flat in flats)),
                num_audio_frames=max(1, *(len(flat.audio) for flat in flats)),
                patch_dim=config.patch_dim, audio_dim=config.audio_dim)
  if longest > shapes['seq_len']:
    raise ValueError(f'a prompt and its reply take {longest} positions but the reward model '
                     f'reads at most model.max_length={config.max_length}')
  size, scores = reward_model.config.eval.batch_size, []
  for start in range(0, len(flats), size):
    rows = [[flat] for flat in flats[start:start + size]]
    batch = interleave.pack_rows(rows + [[]] * (size - len(rows)), **shapes)
    scores.append(score_batch(reward_model.decoder, batch)[:len(rows), 0])
  return np.concatenate(scores)


def load_reward_model(loaded: Loaded) -> tuple[Loaded | None, str]:
  """``(reward model, its run_dir)``: ``eval.reward_from``, else ``post.reward_from``;
  ``(None, why)`` when neither is set.

  Raises:
    CheckpointError: the run named is not a ``train.stage=reward`` run (or has no
      checkpoint).
  """
  key, run_dir = 'eval.reward_from', loaded.config.eval.reward_from
  if not run_dir:
    key, run_dir = 'post.reward_from', loaded.config.post.reward_from
  if not run_dir:
    return None, ('skipped: neither eval.reward_from nor post.reward_from names a reward run; '
                  'pass eval.reward_from=RUN_DIR for the reward model win rate')
  reward_model = load(run_dir, [f'eval.batch_size={loaded.config.eval.batch_size}'])
  if reward_model.config.train.stage != 'reward':
    raise CheckpointError(f'{key}: {run_dir} is a train.stage={reward_model.config.train.stage} '
                          'run; pass the train.run_dir of a train.stage=reward run')
  return reward_model, run_dir


def policy_against_reference(loaded: Loaded) -> tuple[dict, list]:
  """An rlhf or dpo run's win rates over its SFT reference (see the module docstring) and
  per-item records."""
  tokenizer, init_from = loaded.tokenizer, loaded.config.train.init_from
  prompted = factuality.held_out(loaded, loaded.config.eval.factuality_items)
  prompts, items = [prompt for prompt, _ in prompted], [item for _, item in prompted]
  reference = load(init_from)
  generations = {}
  for name, decoder in (('policy', loaded.decoder), ('reference', reference.decoder)):
    generations[name] = common.generate_all(
        Loaded(decoder, loaded.config, loaded.step), prompts, tokenizer,
        max_new_tokens=factuality.MAX_NEW_TOKENS, stop_ids=conversation.stop_ids(tokenizer))
  replies = {name: [g.text.strip() for g in gens] for name, gens in generations.items()}
  verdicts = {name: [post_training.judge(item, reply) for item, reply in zip(items, texts)]
              for name, texts in replies.items()}
  gold = {name: [v.score for v in found] for name, found in verdicts.items()}
  reward_model, reward_from = load_reward_model(loaded)
  rm = None if reward_model is None else {
      name: reward_scores(reward_model, prompts, gens, tokenizer)
      for name, gens in generations.items()}

  def rates_of(chosen: list[int]) -> dict:
    pick = lambda scores: [scores[i] for i in chosen]
    figures = {'gold': win_rate(pick(gold['policy']), pick(gold['reference']))}
    if rm is not None:
      figures['reward_model'] = win_rate(pick(rm['policy']), pick(rm['reference']))
    return figures

  every = list(range(len(items)))
  figures = {'stage': loaded.config.train.stage, 'reference_run': init_from,
             'reference_step': reference.step,
             'reward_model_run': reward_from if reward_model is not None else None,
             **rates_of(every),
             'by_kind': {kind: rates_of(chosen) for kind in post_training.KINDS
                         if (chosen := [i for i in every if items[i].kind == kind])},
             'factuality': {name: factuality.rates([item.answerable for item in items], found)
                            for name, found in verdicts.items()}}
  if reward_model is None:
    figures['reward_model'] = reward_from  # why it was skipped
  records = [{'index': item.index, 'kind': item.kind, 'answerable': item.answerable,
              **{f'{name}_reply': replies[name][i] for name in replies},
              **{f'{name}_gold': gold[name][i] for name in gold},
              **({} if rm is None else {f'{name}_rm': float(rm[name][i]) for name in rm})}
             for i, item in enumerate(items)]
  return figures, records


def _logged(columns: dict, name: str) -> tuple[np.ndarray, np.ndarray] | None:
  """``(steps, values)`` where ``name`` was logged with a finite value, or None."""
  if name not in columns:
    return None
  finite = np.isfinite(columns[name])
  return (columns['step'][finite], columns[name][finite]) if finite.any() else None


def plot_reward_kl(columns: dict, path: pathlib.Path) -> bool:
  """The reward model's reward (mean, and mean +- std where logged) and the KL to the
  reference (with the KL coefficient on a second axis) over RL steps; False, drawing
  nothing, when neither reward nor KL was logged."""
  reward, kl = _logged(columns, 'reward'), _logged(columns, 'kl')
  if reward is None and kl is None:
    return False
  figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  if reward is not None:
    left.plot(*reward, label='reward mean')
    spread = _logged(columns, 'reward_std')
    if spread is not None:
      steps, std = spread
      mean = np.interp(steps, *reward)
      left.fill_between(steps, mean - std, mean + std, alpha=0.25, label='+- std')
    left.legend(fontsize=8)
  left.set(xlabel='step', ylabel='reward model score', title='Reward of the rollouts')
  if kl is not None:
    right.plot(*kl, color='C3', label='KL to reference')
    right.legend(loc='upper left', fontsize=8)
  coefficient = _logged(columns, 'kl_coef')
  if coefficient is not None:
    twin = right.twinx()
    twin.plot(*coefficient, color='C7', linestyle='--', label='kl_coef')
    twin.set_ylabel('KL coefficient')
    twin.legend(loc='upper right', fontsize=8)
  right.set(xlabel='step', ylabel='KL per reply (nats)', title='KL to the SFT model')
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)
  return True


def plot_gold_vs_proxy(columns: dict, path: pathlib.Path) -> bool:
  """The gold judge's mean score and the reward model's reward over steps (two axes) and,
  where both were logged, one against the other coloured by step; False, drawing nothing,
  when neither was logged."""
  gold, reward = _logged(columns, 'gold_score'), _logged(columns, 'reward')
  if gold is None and reward is None:
    return False
  figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  if gold is not None:
    left.plot(*gold, color='C2', label='gold score')
    left.legend(loc='upper left', fontsize=8)
  left.set(xlabel='step', ylabel='gold judge score', title='Gold against proxy over RL')
  if reward is not None:
    twin = left.twinx()
    twin.plot(*reward, color='C0', label='reward (proxy)')
    twin.set_ylabel('reward model score')
    twin.legend(loc='upper right', fontsize=8)
  both = np.isfinite(columns.get('gold_score', np.nan)) & np.isfinite(columns.get('reward', np.nan))
  if np.any(both):
    dots = right.scatter(columns['reward'][both], columns['gold_score'][both],
                         c=columns['step'][both], s=12)
    figure.colorbar(dots, ax=right, label='step')
  right.set(xlabel='reward model score', ylabel='gold judge score', title='Per logged step')
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)
  return True


def plot_rl_curves(run_dir: str, out_dir: pathlib.Path) -> dict:
  """The two training-curve plots of an rlhf run; ``{file name: 'written' or why not}``."""
  names = ('preference_reward_kl.png', 'preference_gold_vs_proxy.png')
  try:
    columns = read_metrics(run_dir)
  except FileNotFoundError as error:
    return {name: f'skipped: {error}' for name in names}
  return {name: 'written' if draw(columns, out_dir / name)
          else 'skipped: none of its curves was logged'
          for name, draw in zip(names, (plot_reward_kl, plot_gold_vs_proxy))}


def plot_win_rate(figures: dict, path: pathlib.Path, *, step: int) -> None:
  """The policy's win rate over SFT by the gold judge and the reward model, overall and per
  kind."""
  groups = {'all': figures, **figures['by_kind']}
  figure, axes = plt.subplots(figsize=(8, 4))
  x = np.arange(len(groups))
  for offset, scorer in ((-0.2, 'gold'), (0.2, 'reward_model')):
    values = [g[scorer]['win_rate'] if isinstance(g.get(scorer), dict) else np.nan
              for g in groups.values()]
    axes.bar_label(axes.bar(x + offset, values, 0.4, label=scorer.replace('_', ' ')),
                   fmt='%.2f', fontsize=7)
  axes.axhline(0.5, color='k', linewidth=0.8, linestyle=':')
  axes.set_xticks(x, [f'{name}\n({g["gold"]["items"]})' for name, g in groups.items()])
  axes.set(ylim=(0, 1.05), ylabel='win rate over SFT (ties half)',
           title=f'{figures["stage"]} (step {step}) against its SFT model, held out')
  axes.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def plot_accuracy(figures: dict, path: pathlib.Path, *, step: int) -> None:
  """The reward model's held-out pairwise accuracy, overall and per kind."""
  groups = {'all': figures, **figures['by_kind']}
  figure, axes = plt.subplots(figsize=(7, 4))
  bars = axes.bar([f'{name}\n({g["pairs"]})' for name, g in groups.items()],
                  [g['accuracy'] for g in groups.values()])
  axes.bar_label(bars, fmt='%.2f', fontsize=8)
  axes.axhline(0.5, color='k', linewidth=0.8, linestyle=':')
  axes.set(ylim=(0, 1.05), ylabel='pairwise accuracy (gold labels)',
           title=f'Reward model (step {step}), held-out pairs')
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def run(loaded: Loaded, out_dir) -> dict:
  """The measures of the run's stage (see the module docstring): writes the JSON and plots
  and returns the figures, or ``{'skipped': reason}`` for a pretrain or sft run."""
  stage, out = loaded.config.train.stage, pathlib.Path(out_dir)
  skipped = common.skip_for_text_only(loaded, 'conversation turns')
  if skipped:
    return skipped
  if stage == 'reward':
    figures, records = reward_accuracy(loaded)
    common.write_result(out, SUITE, loaded, figures, records)
    plot_accuracy(figures, out / f'{SUITE}_rm_accuracy.png', step=loaded.step)
    return figures
  if stage not in POLICY_STAGES:
    return {'skipped': f'train.stage={stage} has neither a reward model to test nor a '
                       'policy to compare with its SFT model; evaluate a reward, rlhf or dpo run'}
  figures, records = policy_against_reference(loaded)
  out.mkdir(parents=True, exist_ok=True)
  if stage == 'rlhf':
    figures['plots'] = plot_rl_curves(loaded.config.train.run_dir, out)
  common.write_result(out, SUITE, loaded, figures, records)
  plot_win_rate(figures, out / f'{SUITE}_win_rate.png', step=loaded.step)
  return figures
