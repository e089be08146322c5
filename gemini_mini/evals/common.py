"""What the suites share: result files, generation in batches, teacher-forced answers, and
scoring.

Every suite writes ``{out_dir}/{suite}.json``: ``{'suite', 'checkpoint_step', 'run_dir',
'config' (the eval section and the model), 'figures' (the suite's numbers), 'items'
(optional per-item records)}`` and its plots as ``{out_dir}/{suite}_*.png``.
"""

import dataclasses
import functools
import json
import pathlib
import re
from typing import Sequence

import jax
import matplotlib
import numpy as np
from flax import nnx

matplotlib.use('Agg')  # files only: evaluation runs headless

from gemini_mini.data import prepare, text_corpus  # noqa: E402
from gemini_mini.data.examples import as_str  # noqa: E402
from gemini_mini.data.mixture import DataError  # noqa: E402
from gemini_mini.infer.generate import Generation, generate  # noqa: E402
from gemini_mini.infer.load import Loaded  # noqa: E402
from gemini_mini.modalities import interleave  # noqa: E402
from gemini_mini.modalities.segments import Segment  # noqa: E402
from gemini_mini.modalities.text import Tokenizer  # noqa: E402


def write_result(out_dir: str | pathlib.Path, suite: str, loaded: Loaded, figures: dict,
                 items: list | None = None) -> pathlib.Path:
  """Writes the suite's JSON (see the module docstring); returns its path."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  record = {'suite': suite, 'checkpoint_step': loaded.step,
            'config': {'eval': dataclasses.asdict(loaded.config.eval),
                       'model': dataclasses.asdict(loaded.config.model),
                       'data': dataclasses.asdict(loaded.config.data)},
            'figures': figures}
  if items is not None:
    record['items'] = items
  path = out / f'{suite}.json'
  path.write_text(json.dumps(record, indent=1) + '\n')
  return path


def skip_for_text_only(loaded: Loaded, needs: str) -> dict | None:
  """``{'skipped': reason}`` when the run reads text with another model's tokenizer (an
  imported checkpoint's), which lacks the special tokens for ``needs``; else None."""
  if loaded.tokenizer.multimodal:
    return None
  return {'skipped': f'{loaded.tokenizer_path} is another model\'s tokenizer, without '
                     f'gemini_mini\'s tokens for {needs}'}


HAYSTACK_SOURCE = 'kjv_bible'  # the haystack prose: the long split's King James Bible


def long_documents(data_dir: str, subset: str, tokenizer: Tokenizer
                   ) -> dict[str, tuple[str, np.ndarray]]:
  """``{source: (name, ids [N] int32)}``: each whole document of the text corpus's ``long``
  split (never trained on), without bos; builds the corpus under ``data_dir`` first if it
  is missing."""
  source = prepare.ensure_dataset(text_corpus, data_dir, subset).as_data_source('long')
  return {as_str(record['source']): (as_str(record['name']), tokenizer.encode(
      as_str(record['text']))) for record in sorted(source, key=lambda r: r['source'])}


def bible_ids(data_dir: str, subset: str, tokenizer: Tokenizer) -> np.ndarray:
  """The King James Bible as ids ``[N] int32``: the haystack prose of the retrieval suites."""
  documents = long_documents(data_dir, subset, tokenizer)
  if HAYSTACK_SOURCE not in documents:
    raise DataError(f'the long split under {data_dir} has no {HAYSTACK_SOURCE} document; delete '
                    f'it and rebuild with `python -m gemini_mini.data.prepare --subset {subset}`')
  return documents[HAYSTACK_SOURCE][1]


def generate_all(loaded: Loaded, prompts: Sequence[list[Segment]], tokenizer: Tokenizer, *,
                 max_new_tokens: int, **sampling) -> list[Generation]:
  """``generate`` over ``prompts`` in batches of ``eval.batch_size``, in order."""
  size = loaded.config.eval.batch_size
  results = []
  for start in range(0, len(prompts), size):
    results += generate(loaded.decoder, list(prompts[start:start + size]), tokenizer,
                        max_new_tokens=max_new_tokens, **sampling)
  return results


@functools.partial(jax.jit, static_argnames='graphdef')
def _most_likely(graphdef, state, batch):
  logits_BTV, _ = nnx.merge(graphdef, state)(batch)
  return logits_BTV.argmax(-1)


def answer_hits(loaded: Loaded, examples: Sequence[tuple[list[Segment], Segment]],
                tokenizer: Tokenizer) -> list[np.ndarray]:
  """Teacher-forced answers: per ``(prompt, answer)``, bool ``[len(answer.data)]``, entry i
  whether the decoder's most likely next piece, given the prompt and the answer's pieces
  before i, is the answer's piece i. Shows how much of an answer a model has learnt where
  greedy generation, derailed by its first wrong piece, shows none. ``eval.batch_size``
  examples at a time, each alone in its row."""
  model = loaded.config.model
  graphdef, state = nnx.split(loaded.decoder)
  size = loaded.config.eval.batch_size
  hits = []
  for start in range(0, len(examples), size):
    group = examples[start:start + size]
    flats = [interleave.flatten([*prompt, answer], tokenizer) for prompt, answer in group]
    batch = interleave.pack_rows(
        [[flat] for flat in flats], seq_len=max(len(flat.tokens) for flat in flats),
        num_patches=max(1, *(len(flat.patches) for flat in flats)),
        num_audio_frames=max(1, *(len(flat.audio) for flat in flats)),
        patch_dim=model.patch_dim, audio_dim=model.audio_dim)
    predicted_BT = np.asarray(_most_likely(graphdef, state, batch))
    for predicted_T, flat, (_, answer) in zip(predicted_BT, flats, group):
      end, count = len(flat.tokens), len(answer.data)
      # Position t predicts token t + 1: the answer's pieces are read at end - count - 1 ...
      hits.append(predicted_T[end - count - 1:end - 1] == flat.tokens[end - count:])
  return hits


def normalize(text: str) -> str:
  """Lower case, punctuation dropped, whitespace collapsed: what string match compares."""
  return ' '.join(re.sub(r'[^\w\s]', ' ', text.lower()).split())


def exact_match(prediction: str, reference: str) -> bool:
  """Whether the prediction equals the reference after ``normalize``."""
  return normalize(prediction) == normalize(reference)


def word_error_rate(prediction: str, reference: str) -> float:
  """Word-level Levenshtein distance over the reference's word count (after ``normalize``);
  an empty reference gives 0 for an empty prediction, else 1."""
  hypothesis, truth = normalize(prediction).split(), normalize(reference).split()
  if not truth:
    return float(bool(hypothesis))
  previous = list(range(len(hypothesis) + 1))
  for i, word in enumerate(truth, 1):
    current = [i]
    for j, guess in enumerate(hypothesis, 1):
      current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (word != guess)))
    previous = current
  return previous[-1] / len(truth)
