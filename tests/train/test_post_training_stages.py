"""The post-training stages through ``loop.run``: ``sft``, ``reward`` and ``dpo`` start from
their ``train.init_from`` run, score what they should, refuse a bad start by name, resume
exactly and shard like one device. Every run is a few steps of ``configs/test.yaml`` on the
small data, started from the session's tiny runs (``tests/conftest.py``)."""

import dataclasses
import importlib.util
import json
import math
import pathlib
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from gemini_mini import checkpoint
from gemini_mini import config as config_lib
from gemini_mini import parallel
from gemini_mini.data.preferences import PairStream
from gemini_mini.modalities import text as text_lib
from gemini_mini.train import loop, preference
from gemini_mini.train.loss import LossWeights

ROOT = pathlib.Path(__file__).resolve().parents[2]
# As conftest's post-training runs: rows that hold every post-training conversation.
POST = ('train.seq_len=512', 'data.num_audio_frames=192')
SFT = ('train.stage=sft', 'data.weights={demonstrations: 1.0}')
REWARD = ('train.stage=reward', 'model.scalar_head=true', 'post.pairs_per_row=3')


def load(data_dir, *overrides) -> config_lib.Config:
  return config_lib.load(ROOT / 'configs/test.yaml',
                         [f'data.dir={data_dir}', *POST, *overrides])


def saved_model(run_dir):
  """``(graphdef, params)`` of ``run_dir``'s latest checkpoint, built by its own saved config."""
  directory = pathlib.Path(run_dir) / 'checkpoints'
  step, saved = checkpoint.read_config(directory)
  model = config_lib.from_dict(saved).model
  graphdef, abstract = checkpoint.abstract_params(
      model, parallel.make_mesh(config_lib.MeshConfig()))
  return graphdef, checkpoint.restore_params(directory, step, abstract)


def saved_params(run_dir):
  return saved_model(run_dir)[1]


def by_path(params) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def assert_same(a: dict, b: dict):
  assert a.keys() == b.keys()
  for path in a:
    np.testing.assert_array_equal(a[path], b[path], err_msg=path)


def logged(run_dir) -> dict[int, dict]:
  records = [json.loads(line) for line in (pathlib.Path(run_dir) / 'metrics.jsonl').read_text()
             .splitlines()]
  return {r['step']: r for r in records}


@pytest.fixture(scope='module')
def reward_run_dir(small_data_dir, tiny_sft_run_dir, tmp_path_factory):
  """A reward model trained 4 steps from ``tiny_sft_run_dir`` without warm-up (its head
  leaves zero), logging every step, checkpoints at steps 2 and 4, held-out pairs at step 4."""
  run_dir = str(tmp_path_factory.mktemp('reward_run'))
  loop.run(load(small_data_dir, *REWARD, f'train.init_from={tiny_sft_run_dir}',
                f'train.run_dir={run_dir}', 'train.steps=4', 'train.warmup_steps=0',
                'train.checkpoint_every=2', 'train.log_every=1', 'train.eval_every=4'))
  return run_dir


# --- sft ---------------------------------------------------------------------------------

def test_sft_starts_from_the_init_from_runs_parameters_exactly(small_data_dir, tiny_run_dir,
                                                               tmp_path):
  config = load(small_data_dir, *SFT, f'train.init_from={tiny_run_dir}',
                f'train.run_dir={tmp_path}')
  state = loop.make_stage(config, parallel.make_mesh(config.mesh)).init_state()
  assert int(state.step) == 0
  assert_same(by_path(state.params), by_path(saved_params(tiny_run_dir)))


def test_an_sft_batch_scores_the_reply_tokens_only(small_data_dir, tiny_run_dir):
  config = load(small_data_dir, *SFT, f'train.init_from={tiny_run_dir}')
  batch = next(loop.make_data(config, 'train'))
  tokenizer = text_lib.Tokenizer()
  for row in range(batch.tokens.shape[0]):
    # Reference: a walk over the row's tokens. After <model>, every target up to and
    # including the reply's <end_of_turn> is scored; nothing else is.
    expected, in_reply = np.zeros(batch.tokens.shape[1]), False
    for t, token in enumerate(batch.tokens[row]):
      if token == tokenizer.model_id:
        in_reply = True
      elif token == tokenizer.end_of_turn_id:
        in_reply = False
      expected[t] = in_reply
    assert expected.sum() > 0, 'a demonstrations row holds no reply'
    np.testing.assert_array_equal(batch.loss_mask[row], expected, err_msg=f'row {row}')
    assert batch.targets[row][expected > 0][-1] == tokenizer.end_of_turn_id


# --- reward ------------------------------------------------------------------------------

def test_a_reward_model_starts_from_the_sft_decoder_with_a_zero_head(small_data_dir,
                                                                     tiny_sft_run_dir, tmp_path):
  config = load(small_data_dir, *REWARD, f'train.init_from={tiny_sft_run_dir}',
                f'train.run_dir={tmp_path}')
  state = loop.make_stage(config, parallel.make_mesh(config.mesh)).init_state()
  params = by_path(state.params)
  head = {path: value for path, value in params.items() if 'scalar_head' in path}
  assert head and all(not value.any() for value in head.values()), head
  decoder = {path: value for path, value in params.items() if path not in head}
  assert_same(decoder, by_path(saved_params(tiny_sft_run_dir)))


def test_a_reward_run_logs_its_held_out_pairwise_accuracy(reward_run_dir):
  records = logged(reward_run_dir)
  assert sorted(records) == [1, 2, 3, 4]
  for step, record in records.items():
    for key in ('loss', 'preference_loss', 'accuracy', 'reward_margin', 'load_balance'):
      assert math.isfinite(record[key]), (step, key)
  assert 'eval/accuracy' not in records[3]
  assert 0 <= records[4]['eval/accuracy'] <= 1
  assert math.isfinite(records[4]['eval/preference_loss'])


@pytest.mark.parametrize('pairs_per_row', [1, 3])
def test_the_reward_objective_is_bradley_terry_on_each_pairs_own_score(small_data_dir,
                                                                       reward_run_dir,
                                                                       pairs_per_row):
  graphdef, params = saved_model(reward_run_dir)
  # A head of unit scale, so scores spread well beyond the loss's flat middle.
  w_D = params['scalar_head']['w_D']
  w_D[...] = jax.random.normal(jax.random.key(0), w_D.shape)
  shapes = dict(seq_len=512, num_patches=96, num_audio_frames=192, patch_dim=192, audio_dim=320,
                seed=0, label_noise=0.0, subset='small')
  stream = PairStream(small_data_dir, 'eval', batch_size=3, pairs_per_row=pairs_per_row,
                      **shapes)
  pair = next(stream)
  weights = LossWeights(0.01, 0.001, 0.0)
  objective = preference.make_objective('reward', graphdef, weights, beta=0.1,
                                        pairs_per_row=pairs_per_row)
  loss, metrics = jax.jit(objective)(params, pair, None)
  count = sum(len(row) for row in stream.last_items)
  assert metrics['pairs'] == count and count > 3 * (pairs_per_row > 1)

  # Reference: the same pairs, each alone in a row through the model, its scalar read where
  # the input token is the reply's closing <end_of_turn> (the last one in the row).
  end_of_turn = text_lib.Tokenizer().end_of_turn_id
  @jax.jit
  def row_scalars(params, batch):
    model = nnx.merge(graphdef, params)
    return model.scalar_head(model.hidden(batch)[0])

  scores = []
  for batch in next(PairStream(small_data_dir, 'eval', batch_size=count, **shapes)):
    scores.append([])
    for row in range(batch.tokens.shape[0]):
      alone = jax.tree.map(lambda x: x[row:row + 1], batch)
      index = np.nonzero(batch.tokens[row] == end_of_turn)[0][-1]
      assert batch.loss_mask[row][index - 1] == 1 and batch.loss_mask[row][index:].sum() == 0
      scores[-1].append(float(row_scalars(params, alone)[0, index]))
  chosen, rejected = np.array(scores, np.float64)
  assert np.abs(chosen - rejected).min() > 1e-3, 'the scores do not separate the pairs'
  margin = chosen - rejected
  np.testing.assert_allclose(metrics['preference_loss'], np.mean(np.log1p(np.exp(-margin))),
                             rtol=1e-5)
  np.testing.assert_allclose(metrics['accuracy'], np.mean(margin > 0), rtol=1e-6)
  np.testing.assert_allclose(metrics['reward_chosen'], chosen.mean(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics['reward_rejected'], rejected.mean(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss, metrics['preference_loss'] + 0.01 * metrics['load_balance']
                             + 0.001 * metrics['router_z'], rtol=1e-6)


# --- dpo ---------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def dpo_at_step_0(small_data_dir, tiny_sft_run_dir, tmp_path_factory):
  """``(policy, grads, metrics)``: DPO's starting parameters, the gradients of its objective
  at the first step with respect to the policy's and the frozen reference's parameters, and
  its metrics."""
  config = load(small_data_dir, 'train.stage=dpo', 'post.pairs_per_row=3',
                f'train.init_from={tiny_sft_run_dir}',
                f'train.run_dir={tmp_path_factory.mktemp("dpo")}')
  stage = loop.make_stage(config, parallel.make_mesh(config.mesh))
  stage.open_data(None)
  pair = next(stage.data)
  weights = LossWeights(0.01, 0.001, 0.0)
  objective = preference.make_objective('dpo', stage.graphdef, weights, beta=0.1,
                                        pairs_per_row=config.post.pairs_per_row,
                                        reference_graphdef=stage.reference.graphdef)
  policy = stage.init_state().params
  grads, metrics = jax.jit(jax.grad(lambda policy, reference: objective(policy, pair, reference),
                                    argnums=(0, 1), has_aux=True))(
      policy, stage.reference.params)
  return policy, grads, metrics


def test_dpo_starts_from_the_sft_runs_parameters(dpo_at_step_0, tiny_sft_run_dir):
  policy, _, _ = dpo_at_step_0
  assert_same(by_path(policy), by_path(saved_params(tiny_sft_run_dir)))


def test_the_dpo_reference_receives_no_gradient(dpo_at_step_0):
  _, (policy, reference), _ = dpo_at_step_0
  assert all(not np.asarray(g).any() for g in jax.tree.leaves(reference))
  assert any(np.asarray(g).any() for g in jax.tree.leaves(policy))


def test_dpo_starts_at_log_2_and_chance_accuracy(dpo_at_step_0):
  _, _, metrics = dpo_at_step_0
  np.testing.assert_allclose(metrics['preference_loss'], math.log(2), rtol=1e-6)
  assert float(metrics['accuracy']) == 0.5


# --- presets -----------------------------------------------------------------------------

def preset(name: str) -> config_lib.Config:
  return config_lib.load(ROOT / 'configs' / f'{name}.yaml')


@pytest.mark.parametrize('name, stage, starts_from, reward_from', [
    ('nano_sft', 'sft', 'nano', None), ('nano_rm', 'reward', 'nano_sft', None),
    ('nano_dpo', 'dpo', 'nano_sft', None), ('nano_rlhf', 'rlhf', 'nano_sft', 'nano_rm')])
def test_each_post_training_preset_starts_from_the_run_of_the_preset_before_it(
    name, stage, starts_from, reward_from):
  # Checked here, not after an hour of pretraining: each stage's train.init_from is the
  # earlier preset's run_dir and builds this preset's decoder (a scalar head may be added);
  # the reward model (a frozen model built by its own config) is the reward preset's run.
  config, before = preset(name), preset(starts_from)
  assert config.train.stage == stage
  assert config.train.init_from == before.train.run_dir
  assert dataclasses.replace(config.model, scalar_head=False) == dataclasses.replace(
      before.model, scalar_head=False)
  if reward_from:
    reward = preset(reward_from)
    assert config.post.reward_from == reward.train.run_dir and reward.train.stage == 'reward'


# --- refusals ----------------------------------------------------------------------------

def train_main():
  """``train.py``'s ``main``, as the command line runs it."""
  spec = importlib.util.spec_from_file_location('train_script', ROOT / 'train.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.main


@pytest.mark.parametrize('overrides, message', [
    ([*SFT, 'train.init_from={tmp}/nothing'],
     'train.init_from: {tmp}/nothing holds no checkpoints/; pass the train.run_dir of a '
     'finished run'),
    ([*SFT, 'train.init_from={tiny_run_dir}', 'model.num_layers=4'],
     'model.num_layers: 2 -> 4'),
    ([*SFT, 'train.init_from={tiny_run_dir}', 'model.activation=silu', 'model.norm_eps=1e-5'],
     "model.activation: 'gelu' -> 'silu', model.norm_eps: 1e-06 -> 1e-05; start from it with "
     'model.activation=gelu model.norm_eps=1e-06'),
    (['train.stage=dpo', 'train.init_from={reward_run_dir}'],
     'is a train.stage=reward run, whose scalar head train.stage=dpo has no use for; pass '
     'the train.run_dir of an sft run'),
    ([*SFT], 'train.init_from: train.stage sft starts from another run\'s parameters'),
    (['train.stage=rlhf', 'model.scalar_head=true', 'train.init_from={tmp}'],
     'post.reward_from: train.stage rlhf needs a reward model'),
], ids=['missing', 'another_model', 'other_conventions', 'a_head_dropped', 'sft_without_init_from',
        'rlhf_without_reward_from'])
def test_a_bad_start_exits_2_naming_the_field(request, small_data_dir, tmp_path, capsys,
                                              overrides, message):
  values = {'tmp': str(tmp_path)}
  values.update({name: request.getfixturevalue(name)
                 for name in ('tiny_run_dir', 'reward_run_dir')
                 if any(f'{{{name}}}' in o for o in overrides)})

  def fill(text):
    for name, value in values.items():
      text = text.replace(f'{{{name}}}', value)
    return text

  argv = ['--config', str(ROOT / 'configs/test.yaml'), f'data.dir={small_data_dir}', *POST,
          f'train.run_dir={tmp_path}/run', *map(fill, overrides)]
  assert train_main()(argv) == 2
  last_line = capsys.readouterr().err.strip().splitlines()[-1]
  assert fill(message) in last_line, last_line


# --- resume and sharding -----------------------------------------------------------------

def test_a_reward_run_killed_after_step_2_resumes_to_the_straight_runs_step_4(reward_run_dir,
                                                                             tmp_path):
  # A run killed after logging step 3 but before saving step 4: the straight run's directory
  # without its step-4 checkpoint. Resuming must restore the pair stream from the checkpoint.
  killed = tmp_path / 'killed'
  shutil.copytree(reward_run_dir, killed)
  shutil.rmtree(killed / 'checkpoints' / '4')
  _, saved = checkpoint.read_config(killed / 'checkpoints')
  config = config_lib.from_dict({**saved, 'train': {**saved['train'], 'run_dir': str(killed),
                                                    'eval_every': 0}})
  loop.run(config)
  straight, resumed = logged(reward_run_dir), logged(killed)
  assert sorted(resumed) == [1, 2, 3, 4]
  for step in (1, 2, 3, 4):
    assert resumed[step]['loss'] == straight[step]['loss'], step
    assert resumed[step]['accuracy'] == straight[step]['accuracy'], step
  assert_same(by_path(saved_params(killed)), by_path(saved_params(reward_run_dir)))

