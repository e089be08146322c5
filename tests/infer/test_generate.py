"""Batched generation against a slow reference that re-runs the full forward pass on the
growing sequences: prompts of different lengths with an image and audio, stop ids,
max_new_tokens, sampling settings, seeds, dropless decoding of capacity models, and one
compilation of the decode loop."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from gemini_mini import Batch, Modality
from gemini_mini import config as config_lib
from gemini_mini.infer import generate as generate_lib
from gemini_mini.infer.generate import generate
from gemini_mini.modalities import interleave
from gemini_mini.modalities import text as text_lib
from gemini_mini.modalities.segments import Segment
from gemini_mini.model import Decoder

TOKENIZER = text_lib.Tokenizer()
MODEL_CONFIG = config_lib.load('configs/test.yaml').model
RNG = np.random.default_rng(0)
BOS = [TOKENIZER.bos_id]
# Three lengths: 6, 13 (an image of 6 patches), 11 (a clip of 5 audio frames). Each ends
# with its own piece: a tied random model mostly predicts the last piece again, and rows that
# generate alike would hide a row mix-up.
PROMPTS = [
    [Segment.text(BOS + list(TOKENIZER.encode('The cat sat on the')))],
    [Segment.text(BOS + list(TOKENIZER.encode('Describe'))),
     Segment.image(RNG.normal(size=(6, MODEL_CONFIG.patch_dim))),
     Segment.text(TOKENIZER.encode('this picture:'))],
    [Segment.text(BOS), Segment.audio(RNG.normal(size=(5, MODEL_CONFIG.audio_dim))),
     Segment.text(TOKENIZER.encode('Transcript'))],
]
REFERENCE_LENGTH = 48


@pytest.fixture(scope='module')
def decoder():
  return Decoder(MODEL_CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope='module')
def forward(decoder):
  """``decoder(batch)``'s logits, compiled."""
  return jitted(decoder, lambda decoder, batch: decoder(batch)[0])


def jitted(decoder, method):
  """``method(decoder, *args)`` compiled, with ``decoder`` split into graph and state."""
  graphdef, state = nnx.split(decoder)
  call = jax.jit(lambda state, *args: method(nnx.merge(graphdef, state), *args))
  return lambda *args: call(state, *args)


def unpadded_batch(examples):
  """Each example alone in its row, left-aligned, in the training layout (``row_fields``)."""
  rows = [interleave.row_fields([e.tokens], [e.modality], REFERENCE_LENGTH) for e in examples]
  items = lambda name, width: np.stack([
      np.concatenate([getattr(e, name).reshape(-1, width), np.zeros((8, width))])[:8]
      for e in examples]).astype(np.float32)
  return Batch(**{name: np.stack([row[name] for row in rows]) for name in rows[0]},
               patches=items('patches', MODEL_CONFIG.patch_dim),
               audio=items('audio', MODEL_CONFIG.audio_dim))


def reference_greedy(forward, prompts, max_new_tokens):
  """Greedy tokens by re-running ``forward(batch)`` on the whole sequences every step."""
  examples = [interleave.flatten(prompt, TOKENIZER) for prompt in prompts]
  generated = [[] for _ in examples]
  for _ in range(max_new_tokens):
    logits_BTV = np.asarray(forward(unpadded_batch(examples)))
    for row, example in enumerate(examples):
      token = int(logits_BTV[row, len(example.tokens) - 1].argmax())
      generated[row].append(token)
      examples[row] = interleave.FlatExample(
          tokens=np.append(example.tokens, token).astype(np.int32),
          modality=np.append(example.modality, Modality.TEXT).astype(np.int8),
          patches=example.patches, audio=example.audio,
          scored=np.append(example.scored, True))
  return [np.array(tokens, np.int32) for tokens in generated]


def test_prompts_differ_in_length_and_modalities():
  examples = [interleave.flatten(prompt, TOKENIZER) for prompt in PROMPTS]
  assert [len(e.tokens) for e in examples] == [6, 13, 11]
  assert [len(e.patches) for e in examples] == [0, 6, 0]
  assert [len(e.audio) for e in examples] == [0, 0, 5]


def test_padded_prefill_logits_equal_each_prompt_alone(decoder, forward):
  examples = [interleave.flatten(prompt, TOKENIZER) for prompt in PROMPTS]
  batch, lengths_B = generate_lib.prefill_batch(
      examples, patch_dim=MODEL_CONFIG.patch_dim, audio_dim=MODEL_CONFIG.audio_dim)
  prefill = jitted(decoder, lambda decoder, batch: decoder.prefill(
      batch, decoder.init_cache(len(examples), 32))[0])
  logits_BTV = prefill(batch)
  alone_BTV = forward(unpadded_batch(examples))
  for row, length in enumerate(lengths_B):
    np.testing.assert_allclose(logits_BTV[row, -length:], alone_BTV[row, :length], atol=2e-5)


def test_a_fixed_prompt_shape_changes_no_token(decoder):
  # PPO pads every rollout batch to one shape, so that one program serves the whole run.
  bucketed = generate(decoder, PROMPTS, TOKENIZER, max_new_tokens=6, stop_ids=())
  fixed = generate(decoder, PROMPTS, TOKENIZER, max_new_tokens=6, stop_ids=(),
                   prompt_shape=(40, 8, 8))
  for a, b in zip(bucketed, fixed):
    np.testing.assert_array_equal(a.tokens, b.tokens)
  with pytest.raises(ValueError, match='more than prompt_shape'):
    generate(decoder, PROMPTS, TOKENIZER, max_new_tokens=6, prompt_shape=(12, 8, 8))


def test_greedy_generation_equals_full_forward_reference(decoder, forward):
  generations = generate(decoder, PROMPTS, TOKENIZER, max_new_tokens=10, stop_ids=())
  expected = reference_greedy(forward, PROMPTS, 10)
  for generation, tokens in zip(generations, expected):
    np.testing.assert_array_equal(generation.tokens, tokens)
    assert generation.text == TOKENIZER.decode(tokens)
  assert len({tuple(g.tokens) for g in generations}) == 3  # the rows really differ


def test_capacity_models_decode_with_dropless_dispatch(decoder, forward):
  # Capacity sizes expert slots per call, so generate decodes with dropless whatever the
  # config: a capacity model generates what its parameters give under dropless (``forward``,
  # re-run on the growing sequences).
  config = dataclasses.replace(MODEL_CONFIG, moe_dispatch='capacity', capacity_factor=0.25)
  capacity = Decoder(config, rngs=nnx.Rngs(1))
  nnx.update(capacity, nnx.state(decoder))
  examples = [interleave.flatten(prompt, TOKENIZER) for prompt in PROMPTS]
  _, aux = jitted(capacity, lambda decoder, batch: decoder(batch))(unpadded_batch(examples))
  assert aux['dropped_L'].max() > 0  # capacity dispatch would drop slots of these prompts
  generations = generate(capacity, PROMPTS, TOKENIZER, max_new_tokens=6, stop_ids=())
  for generation, tokens in zip(generations, reference_greedy(forward, PROMPTS, 6)):
    np.testing.assert_array_equal(generation.tokens, tokens)


def test_stop_ids_cut_each_row_after_its_first_stop(decoder):
  full = [g.tokens for g in generate(decoder, PROMPTS, TOKENIZER, max_new_tokens=10,
                                     stop_ids=())]
  stop = int(full[1][3])
  generations = generate(decoder, PROMPTS, TOKENIZER, max_new_tokens=10, stop_ids=[stop])
  for generation, tokens in zip(generations, full):
    hits = np.flatnonzero(tokens == stop)
    end = hits[0] + 1 if len(hits) else len(tokens)
    np.testing.assert_array_equal(generation.tokens, tokens[:end])
    assert generation.text == TOKENIZER.decode(tokens[:end - 1] if len(hits) else tokens)
  assert len(generations[1].tokens) <= 4 and generations[1].tokens[-1] == stop


@pytest.mark.parametrize('max_new_tokens', [1, 3])
def test_max_new_tokens_is_respected(decoder, max_new_tokens):
  generations = generate(decoder, PROMPTS, TOKENIZER, max_new_tokens=max_new_tokens,
                         stop_ids=())
  assert [len(g.tokens) for g in generations] == [max_new_tokens] * 3


def test_top_k_one_is_greedy_and_seeds_are_deterministic(decoder):
  run = lambda **settings: [g.tokens for g in generate(
      decoder, PROMPTS, TOKENIZER, max_new_tokens=6, stop_ids=(), **settings)]
  for greedy, top_one in zip(run(), run(temperature=1.0, top_k=1, seed=7)):
    np.testing.assert_array_equal(top_one, greedy)
  first, again, other = (run(temperature=1.0, top_p=0.9, seed=seed) for seed in (3, 3, 4))
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  assert any((a != b).any() for a, b in zip(first, other))


def test_decode_loop_compiles_once_per_batch_size_and_cache_length(decoder):
  generate(decoder, PROMPTS, TOKENIZER, max_new_tokens=5)
  compiled = generate_lib._decode_loop._cache_size()
  shorter = [[Segment.text(BOS + [700, 701])], PROMPTS[1], PROMPTS[0]]  # same cache bucket
  generate(decoder, shorter, TOKENIZER, max_new_tokens=9, temperature=0.8, top_k=20,
           top_p=0.9, stop_ids=(5, 6, 7), seed=1)
  assert generate_lib._decode_loop._cache_size() == compiled


@pytest.mark.parametrize('prompts, settings, match', [
    ([], {}, 'no prompts'),
    (PROMPTS, {'top_p': 0.0}, 'top_p'),
    (PROMPTS, {'max_new_tokens': 0}, 'max_new_tokens'),
    (PROMPTS, {'stop_ids': [MODEL_CONFIG.vocab_size]}, 'stop_ids'),
    ([[Segment.image(np.zeros((2, 5)))]], {}, 'model.patch_dim'),
    (PROMPTS, {'max_new_tokens': MODEL_CONFIG.max_length}, 'model.max_length'),
])
def test_bad_requests_name_the_problem(decoder, prompts, settings, match):
  with pytest.raises(ValueError, match=match):
    generate(decoder, prompts, TOKENIZER, **{'max_new_tokens': 4, **settings})
