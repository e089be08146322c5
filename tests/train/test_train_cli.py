"""``train.py`` end to end, as a user runs it: outputs, exact resume after SIGKILL, a kill
during an asynchronous save, Ctrl-C, a non-finite loss, and bad flags."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from gemini_mini import config as config_lib
from gemini_mini import parallel
from gemini_mini.train.checkpoint import Checkpointer
from gemini_mini.train.loop import make_data, make_train_data
from gemini_mini.train.optimizer import make_optimizer
from gemini_mini.train.step import abstract_train_state

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Slow enough per step (batch 8 x 256) that a kill can land between checkpoints.
BASE = ['--config', 'configs/test.yaml', 'train.batch_size=8', 'train.seq_len=256',
        'train.log_every=1', 'train.eval_every=0', 'train.warmup_steps=2']


def train_command(data_dir, run_dir, *overrides):
  return [sys.executable, 'train.py', *BASE, f'data.dir={data_dir}', f'train.run_dir={run_dir}',
          *overrides]


def run_train(*args, **kwargs):
  return subprocess.run(train_command(*args), cwd=ROOT, capture_output=True, text=True, **kwargs)


def logged(run_dir) -> dict[int, dict]:
  lines = (pathlib.Path(run_dir) / 'metrics.jsonl').read_text().splitlines()
  records = [json.loads(line) for line in lines]
  steps = [r['step'] for r in records]
  assert len(steps) == len(set(steps)), f'steps logged twice: {steps}'
  return {r['step']: r for r in records}


def final_params(run_dir, *overrides):
  config = config_lib.load(ROOT / 'configs/test.yaml', [*BASE[2:], *overrides])
  optimizer = make_optimizer(learning_rate=1.0, steps=1, warmup_steps=1, weight_decay=0.0,
                             grad_clip=1.0)  # only its state's structure matters here
  mesh = parallel.make_mesh(config.mesh)
  _, _, abstract = abstract_train_state(config.model, optimizer, mesh, config.train.seed)
  checkpointer = Checkpointer(pathlib.Path(run_dir) / 'checkpoints', keep=3,
                              config=config.to_dict())
  step, state, _ = checkpointer.restore(abstract)
  checkpointer.close()
  return step, state


def start_and_kill_when(data_dir, run_dir, condition, *overrides, timeout=300):
  """Starts train.py and SIGKILLs it as soon as ``condition(checkpoints_dir)`` holds."""
  process = subprocess.Popen(train_command(data_dir, run_dir, *overrides), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  checkpoints = pathlib.Path(run_dir) / 'checkpoints'
  deadline = time.time() + timeout
  while process.poll() is None and time.time() < deadline:
    if checkpoints.exists() and condition(checkpoints):
      process.send_signal(signal.SIGKILL)
      break
    time.sleep(0.005)
  return process.wait()


def test_a_run_writes_metrics_tensorboard_and_checkpoints_and_learns(small_data_dir, tmp_path):
  # Held-out steps that are not logging steps are evaluated and logged all the same.
  result = run_train(small_data_dir, tmp_path, 'train.steps=40', 'train.learning_rate=3e-3',
                     'train.log_every=2', 'train.eval_every=15', 'train.checkpoint_every=20')
  assert result.returncode == 0, result.stderr
  assert f'writing to {tmp_path}/' in result.stdout
  records = logged(tmp_path)
  assert sorted(records) == sorted([*range(2, 41, 2), 15])
  for key in ('loss', 'tokens_per_s', 'mfu', 'cross_entropy', 'load_balance', 'router_z',
              'grad_norm', 'expert_load/layer0/expert0', 'dropped/layer0'):
    assert key in records[40], key
  assert [step for step in records if 'eval/loss' in records[step]] == [15, 30, 40]
  assert records[40]['tokens_per_s'] > 0 and 0 < records[40]['mfu'] < 1
  first = np.mean([records[s]['loss'] for s in (2, 4, 6)])
  last = np.mean([records[s]['loss'] for s in (36, 38, 40)])
  assert last < first - 0.5, (first, last)
  assert any((tmp_path / 'tensorboard').glob('events.out.tfevents.*'))
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit()) == ['20', '40']


def test_the_warm_start_reads_the_repeat_task_alone(small_data_dir):
  config = config_lib.load(ROOT / 'configs/test.yaml', [
      f'data.dir={small_data_dir}', 'data.repeat_only_steps=3', 'data.weights.repeat=0.5'])
  train = make_train_data(config)
  assert train.get_state()['tasks'] == ['repeat']
  train.set_state(train.after_loss(train.get_state(), 3, 9.0))
  mixture = ['text', 'caption', 'speech', 'video', 'repeat']
  assert train.get_state()['tasks'] == mixture
  assert make_data(config, 'eval').get_state()['tasks'] == mixture


def test_held_out_rows_are_the_same_for_every_training_seed(small_data_dir):
  load = lambda seed: config_lib.load(ROOT / 'configs/test.yaml', [
      f'data.dir={small_data_dir}', f'train.seed={seed}'])
  eval_rows = [next(make_data(load(seed), 'eval')).tokens for seed in (0, 1)]
  np.testing.assert_array_equal(eval_rows[0], eval_rows[1])
  train_rows = [next(make_data(load(seed), 'train')).tokens for seed in (0, 1)]
  assert not np.array_equal(train_rows[0], train_rows[1])


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(small_data_dir, tmp_path):
  # The checkpoint of step 10 lies in the warm start's extension (a copy loss no step
  # reaches keeps repeats alone on past step 6 until step 12), so the resumed run must
  # restore the repeat iterator from the checkpoint, not from its step count.
  straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
  common = ('train.steps=20', 'train.checkpoint_every=5', 'data.repeat_only_steps=6',
            'data.repeat_only_until_loss=1e-9')
  assert run_train(small_data_dir, straight, *common).returncode == 0
  returncode = start_and_kill_when(small_data_dir, resumed, lambda d: (d / '10').is_dir(), *common)
  assert returncode == -signal.SIGKILL, 'the run ended before it could be killed'
  result = run_train(small_data_dir, resumed, *common)
  assert result.returncode == 0, result.stderr
  assert 'resuming from step 10' in result.stdout
  a, b = logged(straight), logged(resumed)
  assert sorted(a) == sorted(b) == list(range(1, 21))
  for step in range(1, 21):
    assert a[step]['loss'] == b[step]['loss'], step
  assert a[12]['data/repeat_share'] > 0.5 and 'data/text_share' not in a[12]  # the rest: padding
  assert 'data/repeat_share' not in a[20] and a[20]['data/text_share'] > 0
  (step_a, state_a), (step_b, state_b) = final_params(straight), final_params(resumed)
  assert step_a == step_b == 20
  jax.tree.map(np.testing.assert_array_equal, state_a, state_b)


@pytest.mark.slow
def test_a_kill_during_an_asynchronous_save_leaves_a_resumable_run(small_data_dir, tmp_path):
  # Kill while Orbax is still writing a step into its temporary directory.
  saving = lambda d: any('tmp' in p.name for p in d.iterdir())
  overrides = ('train.steps=12', 'train.checkpoint_every=2', 'model.d_model=256',
               'model.d_ff=1024')  # a bigger state takes longer to write
  caught = False
  for _ in range(3):
    caught |= start_and_kill_when(small_data_dir, tmp_path, saving, *overrides) == -signal.SIGKILL
    if caught:
      break
  assert caught, 'never caught a save in progress'
  result = run_train(small_data_dir, tmp_path, *overrides)
  assert result.returncode == 0, result.stderr
  assert sorted(logged(tmp_path)) == list(range(1, 13))
  assert final_params(tmp_path, *overrides[2:])[0] == 12


def test_ctrl_c_saves_and_exits_cleanly(small_data_dir, tmp_path):
  process = subprocess.Popen(train_command(small_data_dir, tmp_path, 'train.steps=1000',
                                           'train.checkpoint_every=1000'),
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = tmp_path / 'metrics.jsonl'
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
    assert process.poll() is None, process.communicate()
    time.sleep(0.05)
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr
  assert 'saved' in stderr
  step, _ = final_params(tmp_path, 'train.steps=1000')
  assert 3 <= step < 1000 and max(logged(tmp_path)) == step


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(small_data_dir,
                                                                             tmp_path):
  assert run_train(small_data_dir, tmp_path, 'train.steps=2').returncode == 0
  result = run_train(small_data_dir, tmp_path, 'train.steps=200', 'train.learning_rate=1e30',
                     'train.warmup_steps=0')
  assert result.returncode == 3, result.stderr
  last_line = result.stderr.strip().splitlines()[-1]
  assert 'non-finite' in last_line or 'loss is nan' in last_line, last_line
  assert 'last good checkpoint is step 2' in last_line
  assert final_params(tmp_path, 'train.steps=200')[0] == 2


@pytest.mark.parametrize('args, message', [
    (['model.d_modle=3'], "model.d_modle: unknown key"),
    (['train.steps=-1'], 'train.steps: must be positive'),
    (['mesh.data=3'], 'mesh: axis sizes'),
    (['train.batch_size=3', 'train.grad_accum_steps=2'], 'train.grad_accum_steps'),
    (['--config', 'configs/nope.yaml'], 'configs/nope.yaml: config file not found'),
])
def test_bad_flags_exit_nonzero_naming_the_problem(tmp_path, args, message):
  result = subprocess.run([sys.executable, 'train.py', *args, f'train.run_dir={tmp_path}'],
                          cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 2
  assert message in result.stderr.strip().splitlines()[-1]


def test_resuming_with_an_incompatible_config_names_the_fields(small_data_dir, tmp_path):
  assert run_train(small_data_dir, tmp_path, 'train.steps=1').returncode == 0
  result = run_train(small_data_dir, tmp_path, 'train.steps=2', 'model.num_layers=4')
  assert result.returncode == 2
  assert 'model.num_layers: 2 -> 4' in result.stderr.strip().splitlines()[-1]
