"""Perplexity: the power-law fit on synthetic curves and noise, the NLL by position against
a float64 numpy reference and a prefix-by-prefix loop, and the suite end to end on the tiny
checkpoint (windows clamped to ``model.max_length``)."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from gemini_mini import Batch
from gemini_mini import config as config_lib
from gemini_mini.evals import common, perplexity
from gemini_mini.infer.load import load
from gemini_mini.modalities import interleave
from gemini_mini.modalities.text import Tokenizer
from gemini_mini.model import Decoder

MODEL_CONFIG = config_lib.load('configs/test.yaml').model


@pytest.mark.parametrize('a, b, c', [(2.5, 0.4, 1.8), (0.8, 1.2, 0.3), (4.0, 0.05, 0.0)])
def test_power_law_fit_recovers_a_synthetic_curve(a, b, c):
  n_N = np.arange(1, 4097)
  fit = perplexity.fit_power_law(n_N, a * n_N ** -b + c)
  assert (fit.a, fit.b, fit.c) == pytest.approx((a, b, c), rel=1e-3, abs=1e-4)
  assert fit.r2 > 1 - 1e-9


def test_power_law_fit_of_noise_has_low_r2():
  rng = np.random.default_rng(0)
  fit = perplexity.fit_power_law(np.arange(1, 4097), rng.normal(5, 0.5, 4096))
  assert fit.r2 < 0.01
  # Noise around a decaying law still finds the law.
  n_N = np.arange(1, 4097)
  noisy = perplexity.fit_power_law(n_N, 3 * n_N ** -0.5 + 2 + rng.normal(0, 0.01, 4096))
  assert noisy.r2 > 0.95 and noisy.b == pytest.approx(0.5, abs=0.05)


def test_power_law_fit_names_bad_input():
  with pytest.raises(ValueError, match='>= 3 points'):
    perplexity.fit_power_law([1, 2], [3.0, 2.0])
  with pytest.raises(ValueError, match='positions must be positive'):
    perplexity.fit_power_law([0, 1, 2], [3.0, 2.0, 1.0])


def test_cumulative_mean():
  np.testing.assert_allclose(perplexity.cumulative_mean([4, 2, 0, 2]), [4, 3, 2, 2])


REFERENCE_LENGTH = 48  # one compiled shape for every reference call


def reference_nll(forward, ids):
  """One document alone, right-padded, full logits, log-softmax in float64 numpy."""
  row = interleave.row_fields([ids], [np.zeros(len(ids), np.int8)], REFERENCE_LENGTH)
  batch = Batch(**{name: value[None] for name, value in row.items()},
                patches=np.zeros((1, 1, MODEL_CONFIG.patch_dim), np.float32),
                audio=np.zeros((1, 1, MODEL_CONFIG.audio_dim), np.float32))
  logits_TV = np.asarray(forward(batch)[0], np.float64)[:len(ids) - 1]
  log_p_TV = logits_TV - logits_TV.max(-1, keepdims=True)
  log_p_TV -= np.log(np.exp(log_p_TV).sum(-1, keepdims=True))
  return -log_p_TV[np.arange(len(ids) - 1), ids[1:]]


def test_position_nll_matches_references():
  decoder = Decoder(MODEL_CONFIG, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(decoder)
  call = jax.jit(lambda state, batch: nnx.merge(graphdef, state)(batch)[0])
  forward = lambda batch: call(state, batch)
  rng = np.random.default_rng(0)
  documents = [np.concatenate([[1], rng.integers(300, MODEL_CONFIG.vocab_size, length - 1)])
               .astype(np.int32) for length in (40, 25, 40, 33)]
  nlls = perplexity.position_nll(decoder, documents, batch_size=2)  # two batches, one shape
  for ids, nll_N in zip(documents, nlls):
    assert nll_N.dtype == np.float64 and nll_N.shape == (len(ids) - 1,)
    np.testing.assert_allclose(nll_N, reference_nll(forward, ids), atol=2e-4)
  # Position n sees exactly tokens 0 .. n - 1: the last entry of the prefix ids[:n + 1].
  for n in (1, 9, 24):
    assert nlls[1][n - 1] == pytest.approx(reference_nll(forward, documents[1][:n + 1])[-1],
                                           abs=2e-4)


def test_long_documents_are_windows_spread_over_each_document(small_data_dir):
  tokenizer = Tokenizer()
  whole = common.long_documents(small_data_dir, 'small', tokenizer)
  documents = perplexity.long_documents(small_data_dir, 'small', 64, 5)
  assert list(documents) == ['flax_codebase', 'kjv_bible']
  for source, (name, starts_K, ids_KL) in documents.items():
    ids = whole[source][1]
    assert name == whole[source][0] and ids_KL.shape == (5, 64) and ids_KL.dtype == np.int32
    # Evenly spread: the first window opens the document, the last one ends it.
    assert starts_K[0] == 0 and starts_K[-1] == len(ids) - 63
    assert np.abs(np.diff(starts_K) - (len(ids) - 63) / 4).max() <= 1
    for start, window_L in zip(starts_K, ids_KL):
      assert window_L[0] == tokenizer.bos_id
      np.testing.assert_array_equal(window_L[1:], ids[start:start + 63])
  name, starts_K, ids_KL = documents['kjv_bible']
  assert name == 'Gen1:1-Rev22:21'
  assert tokenizer.decode(ids_KL[0]).startswith('\nGenesis 1\n\n  1 In the beginning God')


def test_a_document_shorter_than_the_window_is_one_window(small_data_dir):
  length = len(common.long_documents(small_data_dir, 'small', Tokenizer())['kjv_bible'][1])
  _, starts_K, ids_KL = perplexity.long_documents(small_data_dir, 'small', length + 50,
                                                  4)['kjv_bible']
  assert starts_K.tolist() == [0] and ids_KL.shape == (1, length + 1)


@pytest.mark.parametrize('tokens, window', [(256, 256), (1024, 512)])
def test_suite_writes_curves_fits_and_plot(tiny_run_dir, tmp_path, capsys, tokens, window):
  loaded = load(tiny_run_dir, [f'eval.perplexity_tokens={tokens}', 'eval.perplexity_windows=3'])
  figures = perplexity.run(loaded, tmp_path)
  assert ('exceeds model.max_length=512' in capsys.readouterr().out) == (tokens > window)
  record = json.loads((tmp_path / 'perplexity.json').read_text())
  assert record['suite'] == 'perplexity' and record['figures'] == figures
  assert figures['window'] == window and figures['tokens_requested'] == tokens
  assert figures['windows'] == 3
  assert [item['document'] for item in record['items']] == ['flax_codebase', 'kjv_bible']
  row = min(loaded.config.train.seq_len, window) - 1
  for item in record['items']:
    scores = figures[item['document']]
    assert set(scores) == {'tokens', 'windows', 'nll_mean', 'a', 'b', 'c', 'r2', 'within_row'}
    assert scores['tokens'] == len(item['nll']) == window - 1
    assert scores['windows'] == len(item['starts']) == len(item['window_nll_mean']) == 3
    # Equal-length windows: the by-position average and the per-window means agree.
    assert scores['nll_mean'] == pytest.approx(np.mean(item['nll']), abs=1e-5)
    assert scores['nll_mean'] == pytest.approx(np.mean(item['window_nll_mean']), abs=1e-5)
    assert 0 < scores['nll_mean'] < 2 * np.log(MODEL_CONFIG.vocab_size)
    assert scores['r2'] <= 1 and scores['within_row']['r2'] <= 1
    assert scores['within_row']['positions'] == row
    curve_N = perplexity.cumulative_mean(item['nll'])
    expected = perplexity.fit_power_law(np.arange(1, row + 1), curve_N[:row])
    assert scores['within_row']['b'] == pytest.approx(expected.b, abs=1e-3)
  assert (tmp_path / 'perplexity_nll.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
