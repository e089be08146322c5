"""WarmStart: repeats alone, then the mixture from its start; when the warm start ends; the
phase in the iterator state, so a resume in either phase reads what an uninterrupted run
would; Prefetch drops the repeats it built ahead when the warm start ends."""

import json
import time

import pytest

from gemini_mini.data.curriculum import WarmStart
from gemini_mini.data.mixture import Mixture
from gemini_mini.data.prefetch import Prefetch
from test_mixture import assert_same

MIXTURE = {'arithmetic': 1.0, 'repeat': 0.5}  # generated tasks: no prepared data needed


def mixture(weights):
  return Mixture('unused', 'train', weights, batch_size=2, seq_len=128, seed=0, num_patches=1,
                 num_audio_frames=1, patch_dim=192, audio_dim=320)


def warm_start(steps, until_loss=0.0):
  return WarmStart(mixture({'repeat': 1.0}), mixture(MIXTURE), steps=steps,
                   until_loss=until_loss)


def steps_read(steps, until_loss, losses, state=None, first_step=1):
  """``[(repeat_only, batch)]`` of the training steps ``first_step, ...``, one per loss, as
  the loop reads them through ``Prefetch`` (its thread ahead of the steps), and the state
  after each step."""
  source = warm_start(steps, until_loss)
  if state is not None:
    source.set_state(state)
  data = Prefetch(source, depth=3)
  read, states = [], []
  try:
    for step, loss in enumerate(losses, first_step):
      repeat_only = data.get_state()['repeat_only']
      read.append((repeat_only, next(data)))
      while not data._ready.full():  # batches of the old phase are built ahead
        time.sleep(0.01)
      data.report_loss(step, loss)
      states.append(json.loads(json.dumps(data.get_state())))  # as a checkpoint holds it
  finally:
    data.close()
  return read, states


def ends_at(steps, until_loss, losses):
  """The step after which the mixture begins (None: not within ``losses``)."""
  read, _ = steps_read(steps, until_loss, losses + [9.0])
  phases = [repeat_only for repeat_only, _ in read]
  return phases.index(False) if False in phases else None


@pytest.mark.parametrize('steps, until_loss, losses, step', [
    (3, 0.0, [0.1] * 5, 3),                  # the steps alone, whatever the loss
    (0, 0.0, [5.0] * 2, 0),                  # no warm start
    (3, 0.25, [0.1, 0.1, 0.2], 3),           # never before the steps
    (3, 0.25, [5.0, 5.0, 0.25, 0.3, 0.2], 5),  # then until a loss strictly below
    (3, 0.25, [5.0] * 8, 6),                 # at most twice the steps
])
def test_the_warm_start_ends_after_its_steps_or_when_the_copy_loss_falls(steps, until_loss,
                                                                         losses, step):
  assert ends_at(steps, until_loss, losses) == step


def test_repeats_alone_then_the_mixture_from_its_start():
  read, _ = steps_read(2, 0.5, [1.0, 1.0, 0.1, 1.0, 1.0])
  repeats, rest = mixture({'repeat': 1.0}), mixture(MIXTURE)
  expected = [next(repeats) for _ in range(3)] + [next(rest) for _ in range(2)]
  assert [repeat_only for repeat_only, _ in read] == [True] * 3 + [False] * 2
  assert_same([batch for _, batch in read], expected)


@pytest.mark.parametrize('cut', [2, 4, 5, 7])  # repeats, their extension, the switch, after
def test_a_resume_in_either_phase_reads_the_uninterrupted_batches(cut):
  losses = [1.0, 1.0, 1.0, 1.0, 0.1, 1.0, 1.0, 1.0, 1.0]  # the mixture begins after step 5
  straight, states = steps_read(3, 0.5, losses)
  resumed, _ = steps_read(3, 0.5, losses[cut:], state=states[cut - 1], first_step=cut + 1)
  assert [r for r, _ in resumed] == [r for r, _ in straight[cut:]]
  assert_same([batch for _, batch in resumed], [batch for _, batch in straight[cut:]])


def test_a_state_saved_before_the_phase_was_kept_resumes_by_its_tasks():
  _, states = steps_read(2, 0.5, [1.0, 1.0, 1.0, 0.1, 1.0])
  for cut in (3, 5):  # repeats alone, then the mixture
    old = {key: value for key, value in states[cut - 1].items() if key != 'repeat_only'}
    source = warm_start(2, 0.5)
    source.set_state(old)
    assert source.get_state() == states[cut - 1]
