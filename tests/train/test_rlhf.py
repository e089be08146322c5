"""The PPO stage: rollout rows score the reply alone, a resumed run samples and learns what an
uninterrupted one does, the frozen models stay frozen, and a sharded step equals one device's."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from gemini_mini import config as config_lib
from gemini_mini.modalities import conversation
from gemini_mini.modalities import text as text_lib
from gemini_mini.modalities.segments import Segment
from gemini_mini.train import loop, metrics as metrics_lib
from gemini_mini.train.rlhf import RLHFStage, rollout_batch, rollout_seed

TOKENIZER = text_lib.Tokenizer()
SCRIPT = pathlib.Path(__file__).with_name('rlhf_sharded.py')


def rlhf_config(data_dir, sft_run, reward_run, run_dir, *overrides):
  return config_lib.load('configs/test.yaml', [
      f'data.dir={data_dir}', f'train.run_dir={run_dir}', 'train.stage=rlhf',
      f'train.init_from={sft_run}', f'post.reward_from={reward_run}', 'model.scalar_head=true',
      'train.seq_len=512', 'data.num_audio_frames=192', 'train.batch_size=4',
      'train.eval_every=0', 'train.log_every=1', 'post.max_new_tokens=6', 'post.kl_target=3',
      'train.learning_rate=1e-2', *overrides])


def test_a_rollout_row_scores_the_sampled_reply_and_nothing_of_the_prompt():
  prompt = conversation.prompt([conversation.user_text('What is 2 + 3?', TOKENIZER),
                                Segment.image(np.ones((16, 192), np.float32))], TOKENIZER)
  reply = np.array([101, 102, TOKENIZER.end_of_turn_id], np.int32)
  batch = rollout_batch([prompt, prompt[:1] + prompt[-1:]], [reply, reply[:1]], TOKENIZER,
                        seq_len=64, num_patches=16, num_audio_frames=1, patch_dim=192,
                        audio_dim=320)
  tokens, mask = np.asarray(batch.tokens), np.asarray(batch.loss_mask)
  for row, length in ((0, 3), (1, 1)):
    start = int(np.flatnonzero(tokens[row] == TOKENIZER.model_id)[0])
    # Position t predicts token t + 1: from <model> on, exactly the reply's tokens.
    np.testing.assert_array_equal(np.flatnonzero(mask[row]), start + np.arange(length))
    np.testing.assert_array_equal(np.asarray(batch.targets)[row, start:start + length],
                                  reply[:length])


def test_the_sampling_seed_depends_on_the_step_and_the_run_seed_alone():
  assert rollout_seed(0, 5) == rollout_seed(0, 5)
  assert len({rollout_seed(seed, step) for seed in range(3) for step in range(50)}) == 150


class StopAfter(loop.StopRequest):
  """Ctrl-C as the loop sees it, arriving during step ``STEP``."""
  STEP = 2

  def __init__(self):
    super().__init__()
    self.checks = 0

  def agreed(self) -> bool:
    self.checks += 1
    return self.checks == self.STEP


def test_a_stopped_and_resumed_run_equals_one_straight_through(
    small_data_dir, tiny_sft_run_dir, tiny_reward_run_dir, tmp_path, monkeypatch):
  # One config for all three runs, so they share compiled programs (rlhf.compiled_steps).
  config = lambda run_dir: rlhf_config(small_data_dir, tiny_sft_run_dir, tiny_reward_run_dir,
                                       run_dir, 'train.steps=3', 'train.checkpoint_every=3')
  straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
  loop.run(config(straight))
  with monkeypatch.context() as patch:
    patch.setattr(loop, 'StopRequest', StopAfter)
    loop.run(config(resumed))  # stops cleanly after step 2, saving it
  assert sorted(int(p.name) for p in (resumed / 'checkpoints').iterdir() if p.name.isdigit()) == [2]
  loop.run(config(resumed))
  a, b = (metrics_lib.read_metrics(run) for run in (straight, resumed))
  # The adaptive KL coefficient, the sampled replies (reward, length, KL) and the updates.
  for key in ('loss', 'reward', 'kl', 'response_length', 'kl_coef', 'gold_score', 'grad_norm'):
    np.testing.assert_allclose(a[key], b[key], rtol=1e-6, err_msg=key)
  assert a['kl_coef'][2] != a['kl_coef'][0]  # the controller moved, and was restored


def test_the_reference_and_reward_models_never_change(
    small_data_dir, tiny_sft_run_dir, tiny_reward_run_dir, tmp_path):
  config = rlhf_config(small_data_dir, tiny_sft_run_dir, tiny_reward_run_dir, tmp_path / 'r',
                       'train.steps=3', 'train.checkpoint_every=3')
  stage = RLHFStage(config, loop.parallel.make_mesh(config.mesh))
  frozen = [jax.tree.map(np.array, model.params) for model in (stage.reference, stage.reward)]
  state = stage.init_state()
  stage.open_data(None)
  before = jax.tree.map(np.array, state.params)
  for step in (1, 2):
    state, metrics = stage.train(state, step)
  assert metrics['grad_norm'] > 0
  changed = jax.tree.map(lambda x, y: not np.array_equal(x, y), before,
                         jax.tree.map(np.array, state.params))
  assert any(jax.tree.leaves(changed))  # the policy learned
  for model, saved in zip((stage.reference, stage.reward), frozen):
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, model.params), saved)


@pytest.mark.slow
def test_one_sharded_step_equals_one_device(small_data_dir, tiny_sft_run_dir,
                                            tiny_reward_run_dir, tmp_path):
  result = subprocess.run([sys.executable, str(SCRIPT), small_data_dir, tiny_sft_run_dir,
                           tiny_reward_run_dir, str(tmp_path)], capture_output=True, text=True,
                          check=True)
  results = json.loads(result.stdout.strip().splitlines()[-1])
  single, sharded = results['single'], results['data2_fsdp2']
  assert sharded['sharded_leaves'] > 0
  assert single['response_length'] == sharded['response_length']
  for key in ('reward', 'kl', 'loss', 'policy_loss', 'value_loss', 'grad_norm'):
    np.testing.assert_allclose(sharded[key], single[key], rtol=2e-4, atol=1e-6, err_msg=key)
  np.testing.assert_allclose(sharded['params'], single['params'], rtol=1e-4, atol=1e-6)
