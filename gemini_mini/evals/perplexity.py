"""Perplexity suite: cumulative average NLL by token position on long held-out documents.

The documents are the ``long`` split of ``text_corpus`` (the King James Bible and the Flax
codebase, never trained on), each scored separately. From each document the suite cuts
``eval.perplexity_windows`` windows, their starts spread evenly from its first token to its
last full window; a window is ``<bos>`` then ``W - 1`` tokens, ``W = min(eval.perplexity_tokens,
model.max_length)``, run through the decoder as one row: the token at position ``n`` (bos is
0) is predicted from every token before it, ``n = 1 .. W - 1``. The NLL at each position is
averaged over the windows, as the Gemini 1.5 report averages over documents: one window's
curve is dominated by what its first hundred tokens happen to say. The model has no context
beyond ``model.max_length``, so when ``eval.perplexity_tokens`` asks for more the window is
clamped (a note is printed and the JSON records both numbers): scoring later tokens with a
shortened, sliding context would mix "NLL given n tokens" with "NLL given at most
max_length tokens" in one curve.

Per document, the cumulative average ``L(n) = mean(nll_1 .. nll_n)`` of the averaged NLL is
fitted with the power law ``a * n^(-b) + c`` of the Gemini 1.5 report (``fit_power_law``)
twice: over the whole window, and over the positions a training row holds (``n <
train.seq_len``, ``within_row``); positions past ``train.seq_len`` were never trained on
(the plot marks where they start). Writes ``perplexity.json``: figures ``{'window',
'tokens_requested', 'windows', DOCUMENT: {'tokens' (W - 1 scored positions), 'windows',
'nll_mean', 'a', 'b', 'c', 'r2', 'within_row': {'positions', 'a', 'b', 'c', 'r2'}}}`` with
DOCUMENT ``kjv_bible`` and ``flax_codebase``, and items ``[{'document', 'name', 'starts'
(each window's first token in the document), 'window_nll_mean' (per window), 'nll' (per
position, averaged over the windows)}]``; and ``perplexity_nll.png`` (the curves and both
fits, log position axis).
"""

import functools
import pathlib
from typing import NamedTuple, Sequence

import jax
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from gemini_mini.batch import Batch
from gemini_mini.evals import common
from gemini_mini.infer.load import Loaded
from gemini_mini.modalities import interleave
from gemini_mini.modalities import text as text_lib
from gemini_mini.train.loss import token_nll

SUITE = 'perplexity'
# Fitting b: a coarse grid over EXPONENT_RANGE, then zooming in around the best value. Past
# b = 3 the law is flat after its first few points: fitting those alone is not a trend.
EXPONENT_RANGE = (-1.0, 3.0)
GRID_POINTS = 256
ZOOM_ROUNDS = 4
ZOOM_POINTS = 41


class PowerLaw(NamedTuple):
  """``L(n) = a * n^(-b) + c`` and its coefficient of determination on the fitted curve."""

  a: float
  b: float
  c: float
  r2: float


def fit_power_law(n_N: np.ndarray, loss_N: np.ndarray) -> PowerLaw:
  """Least-squares fit of ``loss_N ~ a * n_N^(-b) + c`` with ``b`` in ``EXPONENT_RANGE``.

  For a fixed ``b`` the law is linear in ``a`` and ``c`` (a line through the points
  ``(n^(-b), L)``), so those come from ordinary least squares; ``b`` is the value whose fit
  has the smallest squared error, found on a coarse grid and refined by zooming in. This
  stays exact where fitting a line in log-log for each ``c`` breaks down: a curve that
  flattens onto ``c`` makes ``log(L - c)`` blow up at its tail. ``r2 = 1 - SSE / SST``.

  Args:
    n_N: positions ``[N]``, all > 0.
    loss_N: the curve ``[N]``.

  Raises:
    ValueError: fewer than 3 points, or a position <= 0.
  """
  n_N, loss_N = np.asarray(n_N, np.float64), np.asarray(loss_N, np.float64)
  if len(n_N) < 3 or n_N.shape != loss_N.shape:
    raise ValueError(f'a power law needs >= 3 points of matching shape, got positions '
                     f'{n_N.shape} and losses {loss_N.shape}; score a longer document')
  if n_N.min() <= 0:
    raise ValueError(f'positions must be positive for n^(-b), got {n_N.min()}; count from 1')

  def fits(b_G):  # -> (a_G, c_G, sse_G), one least-squares line per candidate b
    x_GN = n_N ** -b_G[:, None]
    dx_GN = x_GN - x_GN.mean(1, keepdims=True)
    variance_G = (dx_GN ** 2).sum(1)
    # b = 0 makes n^(-b) constant: then only c is fitted.
    a_G = np.where(variance_G > 0, dx_GN @ (loss_N - loss_N.mean())
                   / np.where(variance_G > 0, variance_G, 1), 0)
    c_G = loss_N.mean() - a_G * x_GN.mean(1)
    return a_G, c_G, ((loss_N - a_G[:, None] * x_GN - c_G[:, None]) ** 2).sum(1)

  b_G = np.linspace(*EXPONENT_RANGE, GRID_POINTS)
  for _ in range(ZOOM_ROUNDS):
    best, step = int(np.argmin(fits(b_G)[2])), b_G[1] - b_G[0]
    b_G = np.linspace(b_G[best] - step, b_G[best] + step, ZOOM_POINTS)
  a_G, c_G, sse_G = fits(b_G)
  best = int(np.argmin(sse_G))
  total = ((loss_N - loss_N.mean()) ** 2).sum()
  r2 = 1 - sse_G[best] / total if total > 0 else float(sse_G[best] == 0)
  return PowerLaw(float(a_G[best]), float(b_G[best]), float(c_G[best]), float(r2))


def cumulative_mean(nll_N: np.ndarray) -> np.ndarray:
  """``[N]`` float64: entry ``n - 1`` is the mean of ``nll_N[:n]``."""
  nll_N = np.asarray(nll_N, np.float64)
  return np.cumsum(nll_N) / np.arange(1, len(nll_N) + 1)


def long_documents(data_dir: str, subset: str, count: int, windows: int,
                   tokenizer: text_lib.Tokenizer | None = None
                   ) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
  """``{source: (name, starts_K, ids_KL)}`` for the documents of the ``long`` split: ``K <=
  windows`` windows, window k ``<bos>`` and the ``L - 1 = count - 1`` tokens from token
  ``starts_K[k]`` (``L`` is shorter only for a document shorter than that, then one window).
  The starts are spread evenly from 0 to the last full window, duplicates dropped. Builds the
  text corpus under ``data_dir`` first if it is missing. Whole documents are encoded (0.3 s
  for the Bible): a cut text could end mid-piece."""
  tokenizer = tokenizer or text_lib.Tokenizer()
  documents = {}
  for source, (name, ids) in common.long_documents(data_dir, subset, tokenizer).items():
    last = max(len(ids) - (count - 1), 0)
    starts_K = np.unique(np.linspace(0, last, windows).round().astype(np.int64))
    ids_KL = np.stack([np.concatenate([[tokenizer.bos_id], ids[start:start + count - 1]])
                       for start in starts_K]).astype(np.int32)
    documents[source] = (name, starts_K, ids_KL)
  return documents


@functools.partial(jax.jit, static_argnames='graphdef')
def _nll(graphdef, state, batch: Batch):
  logits_BTV, _ = nnx.merge(graphdef, state)(batch)
  return token_nll(logits_BTV, batch.targets)[0]


def position_nll(decoder, documents: Sequence[np.ndarray], *, batch_size: int
                 ) -> list[np.ndarray]:
  """The decoder's NLL of every token given all before it, documents ``batch_size`` at a
  time, each in its own row (shorter ones padded to the longest).

  Args:
    decoder: a ``model.Decoder``.
    documents: token ids ``[L_d]``, each at most ``model.max_length`` long and >= 2.

  Returns:
    Per document, float64 ``[L_d - 1]``: entry ``n - 1`` is ``-log p(token n | tokens < n)``,
    computed in float32 as in training (``loss.token_nll``).
  """
  config = decoder.config
  graphdef, state = nnx.split(decoder)
  results = []
  for start in range(0, len(documents), batch_size):
    group = documents[start:start + batch_size]
    length = max(len(ids) for ids in group)
    rows = [interleave.row_fields([ids], [np.zeros(len(ids), np.int8)], length) for ids in group]
    # The embedder gathers from the item axis even when no position uses it: one zero item.
    batch = Batch(**{name: np.stack([row[name] for row in rows]) for name in rows[0]},
                  patches=np.zeros((len(group), 1, config.patch_dim), np.float32),
                  audio=np.zeros((len(group), 1, config.audio_dim), np.float32))
    nll_BT = np.asarray(_nll(graphdef, state, batch), np.float64)
    # Position t's target is token t + 1 of the same row; the last real position has none.
    results += [nll_T[:len(ids) - 1] for nll_T, ids in zip(nll_BT, group)]
  return results


def plot(curves: dict[str, np.ndarray], fits: dict[str, tuple[PowerLaw, PowerLaw]],
         path: pathlib.Path, *, step: int, seq_len: int) -> None:
  """Cumulative NLL by position (log x) with each document's fits in its colour: over the
  whole window dashed, over a training row's positions dotted."""
  figure, axes = plt.subplots(figsize=(7, 4.5))
  for (document, curve_N), color in zip(curves.items(), plt.rcParams['axes.prop_cycle']):
    n_N = np.arange(1, len(curve_N) + 1)
    axes.plot(n_N, curve_N, color=color['color'], label=document)
    for fit, style, n_F, where in ((fits[document][0], '--', n_N, 'all'),
                                   (fits[document][1], ':', n_N[:seq_len - 1], 'row')):
      axes.plot(n_F, fit.a * n_F ** -fit.b + fit.c, style, color=color['color'],
                label=f'fit ({where}) {fit.a:.2f} n^({-fit.b:.2f}) + {fit.c:.2f}, '
                      f'R² {fit.r2:.3f}')
  longest = max(len(curve_N) for curve_N in curves.values())
  if seq_len < longest:
    axes.axvline(seq_len, color='grey', linestyle='-.', label='train.seq_len')
  axes.set(xscale='log', xlabel='token position n', ylabel='mean NLL of tokens 1..n (nats)',
           title=f'Cumulative NLL on held-out long documents (step {step})')
  axes.legend(fontsize=7)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def run(loaded: Loaded, out_dir) -> dict:
  """Scores the long documents' windows, fits the power laws, writes the JSON and the plot;
  returns the figures (see the module docstring)."""
  config = loaded.config
  requested = config.eval.perplexity_tokens
  window = min(requested, config.model.max_length)
  if window < requested:
    print(f'perplexity: eval.perplexity_tokens={requested} exceeds model.max_length='
          f'{config.model.max_length}, the longest context the model has; scoring '
          f'windows of {window} tokens', flush=True)
  documents = long_documents(config.data.dir, config.data.subset, window,
                             config.eval.perplexity_windows, loaded.tokenizer)
  row = min(config.train.seq_len, window) - 1  # positions a training row holds
  figures = {'window': window, 'tokens_requested': requested,
             'windows': config.eval.perplexity_windows}
  curves, fits, items = {}, {}, []
  for document, (name, starts_K, ids_KL) in documents.items():
    nll_KN = np.stack(position_nll(loaded.decoder, list(ids_KL),
                                   batch_size=config.eval.batch_size))
    nll_N = nll_KN.mean(0)
    curves[document] = cumulative_mean(nll_N)
    n_N = np.arange(1, len(nll_N) + 1)
    fits[document] = (fit_power_law(n_N, curves[document]),
                      fit_power_law(n_N[:row], curves[document][:row]))
    figures[document] = {'tokens': len(nll_N), 'windows': len(starts_K),
                         'nll_mean': float(curves[document][-1]), **fits[document][0]._asdict(),
                         'within_row': {'positions': row, **fits[document][1]._asdict()}}
    items.append({'document': document, 'name': name, 'starts': starts_K.tolist(),
                  'window_nll_mean': [round(float(value), 5) for value in nll_KN.mean(1)],
                  'nll': [round(float(value), 5) for value in nll_N]})
  common.write_result(out_dir, SUITE, loaded, figures, items)
  plot(curves, fits, pathlib.Path(out_dir) / f'{SUITE}_nll.png', step=loaded.step,
       seq_len=config.train.seq_len)
  return figures
