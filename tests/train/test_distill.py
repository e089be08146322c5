"""Distillation (``train.stage: distill``): the loss is ``(1 - alpha) * cross-entropy + alpha *
T**2 * KL(teacher_T || student_T)`` plus the MoE losses, the teacher is frozen, and the stage
resumes exactly. The teacher is the session's tiny pretrain run (``tests/conftest.py``); the
student is ``configs/test.yaml`` made narrower."""

import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemini_mini import checkpoint
from gemini_mini import config as config_lib
from gemini_mini import parallel
from gemini_mini.checkpoint import CheckpointError
from gemini_mini.param_count import count_params
from gemini_mini.train import loop
from gemini_mini.train.loss import LossWeights, distill_kl, loss_sums
from gemini_mini.train.step import Teacher
from helpers import make_batch
from test_post_training_stages import assert_same, by_path, logged, saved_params

ROOT = pathlib.Path(__file__).resolve().parents[2]
STUDENT = ('model.d_model=32', 'model.num_heads=2', 'model.head_dim=16', 'model.d_ff=64')


def student(data_dir, teacher_dir, run_dir, *overrides) -> config_lib.Config:
  return config_lib.load(ROOT / 'configs/test.yaml', [
      f'data.dir={data_dir}', *STUDENT, 'train.stage=distill', f'train.teacher={teacher_dir}',
      f'train.run_dir={run_dir}', *overrides])


def numpy_kl(student_V, teacher_V, temperature):
  """The definition, in float64: sum_v p(v) log(p(v) / q(v)) at temperature T."""
  softmax = lambda z: np.exp(z - z.max()) / np.exp(z - z.max()).sum()
  p = softmax(np.float64(teacher_V) / temperature)
  q = softmax(np.float64(student_V) / temperature)
  return float(np.sum(p * np.log(p / q)))


# --- the loss ----------------------------------------------------------------------------

def test_distill_kl_of_two_tokens_equals_the_hand_computed_value():
  # Teacher (0, log 3): p = (1/4, 3/4); student (0, 0): q = (1/2, 1/2).
  # KL = 1/4 log(1/2) + 3/4 log(3/2) = 0.130812...
  kl = distill_kl(jnp.array([[[0.0, 0.0]]]), jnp.array([[[0.0, np.log(3.0)]]]), 1.0)
  np.testing.assert_allclose(kl, [[0.25 * np.log(0.5) + 0.75 * np.log(1.5)]], rtol=1e-6)


@pytest.mark.parametrize('temperature', [0.5, 1.0, 2.0])
def test_distill_kl_equals_the_definition_at_each_temperature(temperature):
  rng = np.random.default_rng(0)
  student_BTV, teacher_BTV = rng.normal(0, 3, (2, 2, 2, 50)).astype(np.float32)
  kl_BT = np.asarray(distill_kl(student_BTV, teacher_BTV, temperature))
  expected = [[numpy_kl(student_BTV[b, t], teacher_BTV[b, t], temperature) for t in range(2)]
              for b in range(2)]
  np.testing.assert_allclose(kl_BT, expected, rtol=1e-5)
  assert np.all(np.asarray(distill_kl(teacher_BTV, teacher_BTV, temperature)) < 1e-6)


def test_the_distillation_loss_weighs_cross_entropy_by_1_minus_alpha_and_kl_by_alpha_t2(
    test_config):
  batch = make_batch(test_config.model, length=16, documents=((16,), (10, 4)))
  rng = np.random.default_rng(1)
  vocab = test_config.model.vocab_size
  student_BTV = rng.normal(0, 2, (*batch.tokens.shape, vocab)).astype(np.float32)
  teacher_BTV = rng.normal(0, 2, (*batch.tokens.shape, vocab)).astype(np.float32)
  aux = {'load_balance': jnp.float32(1.5), 'router_z': jnp.float32(2.5)}
  alpha, temperature = 0.3, 2.0
  weights = LossWeights.distillation(0.01, 0.001, 0.0, alpha, temperature)
  numerator, sums = loss_sums(student_BTV, aux, batch, weights, teacher_BTV, temperature)

  mask = np.asarray(batch.loss_mask, bool)
  log_q = student_BTV - np.log(np.exp(np.float64(student_BTV)).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_q, np.asarray(batch.targets)[..., None], -1)[..., 0]
  kl = np.array([[numpy_kl(student_BTV[b, t], teacher_BTV[b, t], temperature)
                  for t in range(mask.shape[1])] for b in range(mask.shape[0])])
  tokens = mask.sum()
  expected = ((1 - alpha) * nll[mask].sum() + alpha * temperature**2 * kl[mask].sum()
              + tokens * (0.01 * 1.5 + 0.001 * 2.5))
  np.testing.assert_allclose(numerator, expected, rtol=1e-5)
  np.testing.assert_allclose(sums['distill_kl'], kl[mask].sum(), rtol=1e-5)


def test_without_a_teacher_the_loss_is_pretrainings(test_config):
  batch = make_batch(test_config.model, length=16, documents=((16,), (10, 4)))
  logits_BTV = np.random.default_rng(2).normal(
      0, 2, (*batch.tokens.shape, test_config.model.vocab_size)).astype(np.float32)
  aux = {'load_balance': jnp.float32(1.0), 'router_z': jnp.float32(1.0)}
  numerator, sums = loss_sums(logits_BTV, aux, batch, LossWeights(0.01, 0.001, 0.0))
  assert 'distill_kl' not in sums
  assert float(numerator) == float(sums['cross_entropy'] + 0.01 * sums['load_balance']
                                   + 0.001 * sums['router_z'])


# --- the stage ---------------------------------------------------------------------------

@pytest.fixture(scope='module')
def distill_run_dir(small_data_dir, tiny_run_dir, tmp_path_factory):
  """A student distilled for 4 steps from ``tiny_run_dir``, logging every step, checkpoints
  at steps 2 and 4, held-out loss at step 4."""
  run_dir = str(tmp_path_factory.mktemp('distill_run'))
  loop.run(student(small_data_dir, tiny_run_dir, run_dir, 'train.steps=4',
                   'train.checkpoint_every=2', 'train.log_every=1', 'train.eval_every=4',
                   'train.distill_alpha=0.5', 'train.distill_temperature=2.0'))
  return run_dir


def test_a_distill_run_logs_its_loss_as_the_weighted_sum_of_its_parts(distill_run_dir):
  records = logged(distill_run_dir)
  assert sorted(records) == [1, 2, 3, 4]
  for record in records.values():
    expected = (0.5 * record['cross_entropy'] + 0.5 * 4.0 * record['distill_kl']
                + 0.01 * record['load_balance'] + 0.001 * record['router_z'])
    np.testing.assert_allclose(record['loss'], expected, rtol=1e-5)
    assert record['distill_kl'] > 0
  assert records[4]['eval/distill_kl'] > 0 and records[4]['eval/cross_entropy'] > 0


def test_the_teacher_receives_no_gradient(small_data_dir, tiny_run_dir, tmp_path):
  config = student(small_data_dir, tiny_run_dir, tmp_path / 'run')
  stage = loop.make_stage(config, parallel.make_mesh(config.mesh))
  stage.open_data(None)
  try:
    batch = next(stage.data)
  finally:
    stage.close()
  teacher = Teacher(stage.teacher.graphdef, temperature=2.0)

  def objective(params, teacher_params):
    logits_BTV, aux = nnx.merge(stage.graphdef, params)(batch)
    return loss_sums(logits_BTV, aux, batch, stage.weights, teacher.logits(teacher_params, batch),
                     2.0)[0]

  params = stage.init_state().params
  student_grads, teacher_grads = jax.jit(jax.grad(objective, argnums=(0, 1)))(
      params, stage.teacher.params)
  assert all(not np.asarray(g).any() for g in jax.tree.leaves(teacher_grads))
  assert any(np.asarray(g).any() for g in jax.tree.leaves(student_grads))


def test_at_alpha_0_distillation_trains_as_pretraining(small_data_dir, tiny_run_dir, tmp_path):
  distilled, pretrained = tmp_path / 'distilled', tmp_path / 'pretrained'
  common = ('train.steps=2', 'train.log_every=1', 'train.eval_every=0')
  loop.run(student(small_data_dir, tiny_run_dir, distilled, 'train.distill_alpha=0', *common))
  loop.run(config_lib.load(ROOT / 'configs/test.yaml', [
      f'data.dir={small_data_dir}', *STUDENT, f'train.run_dir={pretrained}', *common]))
  distill_log, pretrain_log = logged(distilled), logged(pretrained)
  for step in (1, 2):  # step 2 shows the update was pretraining's
    np.testing.assert_allclose(distill_log[step]['cross_entropy'],
                               pretrain_log[step]['cross_entropy'], rtol=1e-6)
    np.testing.assert_allclose(distill_log[step]['loss'], pretrain_log[step]['loss'], rtol=1e-6)


def test_a_distill_run_killed_after_step_2_resumes_to_the_straight_runs_step_4(distill_run_dir,
                                                                              tmp_path):
  killed = tmp_path / 'killed'
  shutil.copytree(distill_run_dir, killed)
  shutil.rmtree(killed / 'checkpoints' / '4')
  _, saved = checkpoint.read_config(killed / 'checkpoints')
  loop.run(config_lib.from_dict({**saved, 'train': {**saved['train'], 'run_dir': str(killed),
                                                    'eval_every': 0}}))
  straight, resumed = logged(distill_run_dir), logged(killed)
  for step in (3, 4):
    assert resumed[step]['loss'] == straight[step]['loss'], step
    assert resumed[step]['distill_kl'] == straight[step]['distill_kl'], step
  assert_same(by_path(saved_params(killed)), by_path(saved_params(distill_run_dir)))


def test_a_teacher_of_another_vocabulary_is_refused_naming_the_field(small_data_dir,
                                                                     tiny_run_dir, tmp_path):
  config = student(small_data_dir, tiny_run_dir, tmp_path / 'run', 'model.vocab_size=4096')
  with pytest.raises(CheckpointError, match=r'train.teacher: .*model.vocab_size=8192'):
    loop.make_stage(config, parallel.make_mesh(config.mesh))


def test_a_teacher_that_is_no_run_is_refused_naming_the_field(small_data_dir, tmp_path):
  config = student(small_data_dir, tmp_path / 'nothing', tmp_path / 'run')
  with pytest.raises(CheckpointError, match='train.teacher: .* holds no checkpoints'):
    loop.make_stage(config, parallel.make_mesh(config.mesh))


# --- the preset --------------------------------------------------------------------------

def test_the_nano_student_has_about_a_quarter_of_nanos_active_parameters():
  nano = config_lib.load(ROOT / 'configs/nano.yaml')
  nano_student = config_lib.load(ROOT / 'configs/nano_student.yaml')
  ratio = count_params(nano_student.model)['active'] / count_params(nano.model)['active']
  assert 0.2 <= ratio <= 0.3, ratio
  assert nano_student.train.stage == 'distill' and nano_student.train.teacher == nano.train.run_dir
  assert nano_student.model.vocab_size == nano.model.vocab_size
