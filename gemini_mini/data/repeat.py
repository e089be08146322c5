"""Repeated spans: a training task that reads no dataset and teaches copying from context.

    <bos> Repeat: | the 1 , of 3 the | 1 , of 3 | <eos>    (pieces; | marks the segments)

A span of ``MIN_SPAN`` to ``MAX_SPAN`` pieces drawn uniformly from the ``POOL_SIZE`` most
frequent pieces and the ten digits, then the same span again. The second copy is predictable
only by looking back: find where the previous piece occurred in the first copy and copy the
piece after it, the induction-head circuit (Olsson et al. 2022) that needle retrieval needs.

Half the spans (``RUN_SHARE``) hold a run: one of their pieces 3 to 5 times in a row
(``RUN_LENGTHS``). Inside a run, the last piece or two occur at several places of the first
copy, followed by different pieces, so the copy must keep its place some other way; needle
values need that (``6444683``: after ``644``, ``44`` is followed by ``4`` and by ``6``).
Learnt here, before any lookup, runs lift the recall of such needles and of ordinary ones;
placed in the haystack values instead, they do not (docs/retrieval.md#the-copy-circuit).

Only the pieces an induction head can predict are in the loss: the second copy after its
first piece. The rest stays out (``Segment.text(..., loss=False)``): the first copy is noise;
nothing marks where it ends, so the piece that opens the second copy cannot be predicted;
and ``<eos>`` after the last piece contradicts what looking back predicts there (the piece
that followed it the first time). With the first copy in the loss the circuit formed far
later (``bench/induction.py``).

Why this task exists: trained on haystacks alone, the nano model never formed that circuit,
and a needle's digits give almost no signal until it exists. Clean copy data of frequent
pieces forms it within a few hundred steps and a mixture far more slowly, hence
``data.repeat_only_steps`` (this task alone first); spans from the whole vocabulary stay near
chance, as each piece's embedding trains too seldom (docs/retrieval.md#the-copy-circuit).
"""

import functools

import numpy as np

from gemini_mini.data.examples import Example, NextRecord, Room
from gemini_mini.modalities.segments import Segment
from gemini_mini.modalities.text import Tokenizer

MIN_SPAN = 8
MAX_SPAN = 32
POOL_SIZE = 64
RUN_SHARE = 0.5
RUN_LENGTHS = (3, 5)


@functools.cache  # once per tokenizer, not once per example
def pool(tokenizer: Tokenizer) -> np.ndarray:
  """The pieces a span draws from: the ``POOL_SIZE`` most frequent ordinary pieces, and the
  digits (the values needles hide), sorted ids."""
  digits = [int(tokenizer.encode(str(d))[-1]) for d in range(10)]
  return np.unique(np.concatenate([tokenizer.ordinary_ids[:POOL_SIZE], digits]).astype(np.int32))


def repeat_example(next_record: NextRecord, tokenizer: Tokenizer, rng: np.random.Generator,
                   room: Room) -> Example:
  """``<bos>Repeat:``, the span, then the span again and ``<eos>``, with only the second
  copy after its first piece in the loss (and the prompt, which is constant); the span fits
  the row (at most ``(positions - 6) // 2`` pieces)."""
  del next_record
  prompt = np.concatenate([[tokenizer.bos_id], tokenizer.encode('Repeat:')])
  longest = max(2, min(MAX_SPAN, (room.positions - len(prompt) - 1) // 2))
  span = rng.choice(pool(tokenizer), int(rng.integers(min(MIN_SPAN, longest), longest + 1)))
  if rng.random() < RUN_SHARE:
    lay_run(span, rng)
  return span_twice(prompt, span, tokenizer.eos_id)


def lay_run(span: np.ndarray, rng: np.random.Generator) -> None:
  """Repeats one piece of ``span`` ``RUN_LENGTHS`` times in a row (at most the whole span),
  in place, at a random place; the pieces it covers are overwritten."""
  length = min(int(rng.integers(RUN_LENGTHS[0], RUN_LENGTHS[1] + 1)), len(span))
  start = int(rng.integers(len(span) - length + 1))
  span[start:start + length] = span[start]


def span_twice(prompt: np.ndarray, span: np.ndarray, eos_id: int) -> list[Segment]:
  """``prompt``, ``span`` twice and ``eos_id``, with only the prompt and the second copy
  after its first piece in the loss (``span`` of at least 2 pieces)."""
  return [Segment.text(prompt), Segment.text(np.append(span, span[0]), loss=False),
          Segment.text(span[1:]), Segment.text([eos_id], loss=False)]
