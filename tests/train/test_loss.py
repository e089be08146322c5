"""The training objective against numpy, and exact gradient accumulation."""


import jax
import jax.numpy as jnp
import numpy as np
import optax

from gemini_mini import Modality, config as config_lib, parallel
from gemini_mini.train.loss import LossWeights, document_contains, finalize, loss_sums, token_nll
from gemini_mini.train.optimizer import learning_rate_schedule
from gemini_mini.train.step import (
    abstract_train_state, init_train_state, make_train_step)
from helpers import make_batch

CONFIG = config_lib.load('configs/test.yaml', ['train.batch_size=4'])


def test_token_nll_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (2, 5))
  nll, log_z = token_nll(jnp.asarray(logits), jnp.asarray(targets))
  expected_log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
  expected = expected_log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(nll, expected, rtol=1e-5)
  np.testing.assert_allclose(log_z, expected_log_z, rtol=1e-6)


def test_document_contains_marks_whole_documents():
  batch = make_batch(CONFIG.model, batch_size=2, documents=((20, 30), (64,)),
                     images=[(0, 25, 3)], audio=[(1, 60, 2)])
  image = np.asarray(document_contains(batch, Modality.IMAGE))
  audio = np.asarray(document_contains(batch, Modality.AUDIO))
  assert not image[0, :20].any() and image[0, 20:50].all() and not image[0, 50:].any()
  assert audio[1].all() and not audio[0].any() and not image[1].any()


def test_loss_is_cross_entropy_plus_weighted_router_losses():
  batch = make_batch(CONFIG.model, batch_size=2, documents=((20, 30), (64,)), images=[(0, 25, 3)])
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(2, 64, CONFIG.model.vocab_size)), jnp.float32)
  aux = {'load_balance': jnp.float32(1.25), 'router_z': jnp.float32(4.0)}
  weights = LossWeights(load_balance=0.1, router_z=0.01, logit_z=0.001)
  _, sums = loss_sums(logits, aux, batch, weights)
  metrics = finalize(sums, weights)
  nll, log_z = map(np.asarray, token_nll(logits, batch.targets))
  mask = np.asarray(batch.loss_mask)
  ce = (nll * mask).sum() / mask.sum()
  z = (log_z ** 2 * mask).sum() / mask.sum()
  np.testing.assert_allclose(metrics['cross_entropy'], ce, rtol=1e-5)
  np.testing.assert_allclose(metrics['loss'], ce + 0.1 * 1.25 + 0.01 * 4.0 + 0.001 * z, rtol=1e-5)
  image_doc = np.zeros_like(mask, bool)
  image_doc[0, 20:50] = True
  np.testing.assert_allclose(metrics['cross_entropy_image'],
                             (nll * mask)[image_doc].sum() / mask[image_doc].sum(), rtol=1e-5)
  assert np.isnan(metrics['cross_entropy_audio'])  # no audio document: no measurement


def test_gradient_accumulation_equals_the_full_batch():
  # Plain SGD with rate 1: the parameter change is the gradient itself (Adam's first step
  # is sign-like and would hide or blow up small differences).
  optimizer = optax.sgd(1.0)
  mesh = parallel.make_mesh(CONFIG.mesh)
  graphdef, shardings, _ = abstract_train_state(CONFIG.model, optimizer, mesh, seed=0)
  # Unequal token counts per micro-batch: exactness needs sums, not means of means.
  batch = make_batch(CONFIG.model, batch_size=4, documents=((64,), (10,), (40, 24), (5,)))
  schedule = learning_rate_schedule(1e-3, 10, 1)
  results = []
  for accumulation in (1, 2, 4):
    state = init_train_state(CONFIG.model, optimizer, shardings, seed=0)
    step = jax.jit(make_train_step(graphdef, optimizer, schedule, LossWeights(0, 0), accumulation))
    results.append(step(state, batch))
  (state1, m1) = results[0]
  for state_n, m_n in results[1:]:
    np.testing.assert_allclose(m_n['cross_entropy'], m1['cross_entropy'], rtol=1e-6)
    np.testing.assert_allclose(m_n['grad_norm'], m1['grad_norm'], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), state_n.params,
                 state1.params)


def test_schedule_warms_up_then_decays_to_a_tenth():
  schedule = learning_rate_schedule(1.0, steps=100, warmup_steps=10)
  np.testing.assert_allclose([schedule(0), schedule(10), schedule(100)], [0.1, 1.0, 0.1], rtol=1e-5)
  assert schedule(5) < schedule(10) and schedule(50) < schedule(10)
