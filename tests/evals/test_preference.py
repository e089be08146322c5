"""Preference: pairwise accuracy and win rates from hand-made scores, the reward run's held-out
accuracy against pairs scored one at a time, the win-rate bookkeeping with scripted replies,
and an rlhf run end to end (its policy the SFT model itself) with its training curves."""

import dataclasses
import json

import numpy as np
import pytest

from gemini_mini.data import post_training
from gemini_mini.evals import common, preference
from gemini_mini.infer.generate import Generation
from gemini_mini.infer.load import Loaded, load
from gemini_mini.modalities import conversation, interleave
from gemini_mini.modalities.text import Tokenizer


def test_pairwise_accuracy_counts_ties_half():
  # 3 > 1 right, 1 = 1 tie, 2 < 5 wrong, 0 = 0 tie.
  assert preference.pairwise_accuracy([3, 1, 2, 0], [1, 1, 5, 0]) == (1 + 2 / 2) / 4
  with pytest.raises(ValueError, match='one of each per pair'):
    preference.pairwise_accuracy([1, 2], [1])


def test_win_rate_counts_wins_ties_and_losses():
  figures = preference.win_rate([1, 0, -1, 1, 0.5], [0, 0, 1, 1, -0.5])
  assert figures == pytest.approx({'items': 5, 'wins': 2, 'ties': 2, 'losses': 1,
                                   'win_rate': (2 + 2 / 2) / 5, 'policy_mean': 0.3,
                                   'reference_mean': 0.3})
  with pytest.raises(ValueError, match='one of each per item'):
    preference.win_rate([], [])


def stage_config(loaded: Loaded, stage: str, fields=None):
  """``loaded``'s config as a run of ``stage``; ``fields``: ``{(section, name): value}``."""
  config = loaded.config
  sections = {'train': {'stage': stage}, 'model': {'scalar_head': stage in ('reward', 'rlhf')}}
  for (section, name), value in (fields or {}).items():
    sections.setdefault(section, {})[name] = value
  return dataclasses.replace(config, **{
      section: dataclasses.replace(getattr(config, section), **values)
      for section, values in sections.items()})


def test_sft_and_pretrain_runs_are_skipped_with_a_reason(tiny_sft_run_dir, tmp_path):
  loaded = load(tiny_sft_run_dir)
  assert 'train.stage=sft' in preference.run(loaded, tmp_path)['skipped']
  pretrain = Loaded(None, stage_config(loaded, 'pretrain', {('train', 'init_from'): ''}), 0)
  assert 'train.stage=pretrain' in preference.run(pretrain, tmp_path)['skipped']
  assert not list(tmp_path.iterdir())


def test_reward_run_accuracy_reads_every_held_out_pair_in_order(tiny_reward_run_dir, tmp_path):
  loaded = load(tiny_reward_run_dir, ['eval.batch_size=7'])  # 24 pairs: the last batch padded
  figures = preference.run(loaded, tmp_path)
  record = json.loads((tmp_path / 'preference.json').read_text())
  held_out = post_training.builder(loaded.config.data.dir, 'small').as_data_source('eval')
  assert figures['pairs'] == len(held_out) == len(record['items'])
  assert [r['index'] for r in record['items']] == list(range(len(held_out)))
  assert sum(kind['pairs'] for kind in figures['by_kind'].values()) == figures['pairs']
  wins = [(r['chosen'] > r['rejected']) + (r['chosen'] == r['rejected']) / 2
          for r in record['items']]
  assert figures['accuracy'] == pytest.approx(np.mean(wins))
  # The first, the second (packed beside it: post.pairs_per_row) and the last pair (in a
  # padded batch), each scored alone in its batch.
  tokenizer, config = Tokenizer(), loaded.config
  assert config.post.pairs_per_row > 1
  for index in (0, 1, len(held_out) - 1):
    item = held_out[index]
    chosen, rejected = post_training.preference_pair(item)
    for reply, recorded in ((chosen, 'chosen'), (rejected, 'rejected')):
      flat = interleave.flatten(conversation.conversation(
          item.user_segments(tokenizer), reply, tokenizer), tokenizer)
      batch = interleave.pack_rows(
          [[flat]] + [[]] * 6, seq_len=config.train.seq_len, num_patches=config.data.num_patches,
          num_audio_frames=config.data.num_audio_frames, patch_dim=config.model.patch_dim,
          audio_dim=config.model.audio_dim)
      alone = preference.score_batch(loaded.decoder, batch)[0, 0]
      assert record['items'][index][recorded] == pytest.approx(alone, rel=1e-4, abs=1e-5)
  assert (tmp_path / 'preference_rm_accuracy.png').stat().st_size > 0


def test_win_rates_of_scripted_replies_without_a_reward_model(tiny_sft_run_dir, tmp_path,
                                                             monkeypatch):
  """The policy gives the reference reply at even indices and the rejected one at odd ones,
  the SFT model always the reference: ties, then losses, by the gold judge."""
  sft = load(tiny_sft_run_dir, ['eval.factuality_items=6', 'eval.batch_size=6'])
  dpo = Loaded(None, stage_config(sft, 'dpo', {('train', 'init_from'): tiny_sft_run_dir,
                                               ('train', 'run_dir'): str(tmp_path / 'dpo')}), 3)
  held_out = post_training.builder(sft.config.data.dir, 'small').as_data_source('eval')
  items, tokenizer = [held_out[i] for i in range(6)], Tokenizer()

  def fake_generate_all(loaded, prompts, tokenizer_, *, max_new_tokens, stop_ids):
    assert stop_ids == (tokenizer.end_of_turn_id,) and len(prompts) == 6
    policy = loaded.decoder is None
    texts = [item.rejected if policy and item.index % 2 else item.reference for item in items]
    return [Generation(tokenizer.encode(text), text) for text in texts]

  monkeypatch.setattr(common, 'generate_all', fake_generate_all)
  figures = preference.run(dpo, tmp_path)
  assert figures['gold'] == pytest.approx({
      'items': 6, 'wins': 0, 'ties': 3, 'losses': 3, 'win_rate': 3 / 2 / 6,
      'policy_mean': np.mean([post_training.judge(i, i.rejected).score if i.index % 2 else 1.0
                              for i in items]), 'reference_mean': 1.0})
  assert figures['reward_model'].startswith('skipped: neither eval.reward_from')
  assert figures['reward_model_run'] is None and 'plots' not in figures  # dpo: no RL curves
  assert figures['factuality']['reference']['recall'] == 1.0
  assert sum(kind['gold']['items'] for kind in figures['by_kind'].values()) == 6
  records = json.loads((tmp_path / 'preference.json').read_text())['items']
  assert [r['policy_gold'] for r in records] == [
      post_training.judge(i, i.rejected if i.index % 2 else i.reference).score for i in items]
  assert (tmp_path / 'preference_win_rate.png').stat().st_size > 0


def test_rlhf_run_against_itself_ties_everywhere_and_plots_its_curves(
    tiny_sft_run_dir, tiny_reward_run_dir, tmp_path):
  run_dir = tmp_path / 'rlhf'
  run_dir.mkdir()
  logged = [{'step': s, 'reward': 0.1 * s, 'reward_std': 0.5, 'kl': 0.02 * s,
             'kl_coef': 0.05, 'gold_score': -0.5 + 0.05 * s, 'loss': 1.0} for s in range(1, 6)]
  logged.append({'step': 6, 'loss': 0.9})  # a step without the RL keys
  (run_dir / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in logged))
  sft = load(tiny_sft_run_dir, ['eval.factuality_items=4', 'eval.batch_size=4'])
  policy = Loaded(sft.decoder, stage_config(sft, 'rlhf', {
      ('train', 'init_from'): tiny_sft_run_dir, ('train', 'run_dir'): str(run_dir),
      ('post', 'reward_from'): tiny_reward_run_dir}), sft.step)
  out = tmp_path / 'out'
  figures = preference.run(policy, out)
  # The policy is its reference: the same greedy replies, tied by both scorers.
  for scorer in ('gold', 'reward_model'):
    assert figures[scorer]['ties'] == 4 and figures[scorer]['win_rate'] == 0.5
  assert figures['reward_model_run'] == tiny_reward_run_dir
  assert figures['plots'] == {'preference_reward_kl.png': 'written',
                              'preference_gold_vs_proxy.png': 'written'}
  for name in ('preference_reward_kl.png', 'preference_gold_vs_proxy.png',
               'preference_win_rate.png'):
    assert (out / name).read_bytes()[:4] == b'\x89PNG'
  record = json.loads((out / 'preference.json').read_text())
  assert record['figures'] == figures and len(record['items']) == 4
  assert all(r['policy_rm'] == r['reference_rm'] for r in record['items'])
