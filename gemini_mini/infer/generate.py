"""Batched generation from interleaved text/image/audio prompts, with a KV cache.

    prompts --flatten--> right-aligned prefill batch --decoder.prefill--> cache, logits
            --one jitted while_loop--> sample, feed back, until every row stopped or
                                       max_new_tokens

Prompts of different lengths are right-aligned (left-padded) in one ``[B, T]`` prefill
batch: row b's ``L_b`` positions are segment 1 with positions ``0 .. L_b - 1``, the padding
before them is segment 0. Each row then computes exactly what it would alone: attention
decides who sees whom by segment id and position, never by slot (``layers/attention.py``),
so a real token (segment 1) never sees padding (segment 0) and RoPE sees the positions of
the unpadded prompt; padding is text, so it takes none of the row's patches or audio frames;
and the MoE layers decode with dropless dispatch, which routes every token on its own
(``generate``'s docstring says why).
Right-aligning puts every row's last prompt token in the last column, so the first
next-token logits are ``logits[:, -1]``, and all rows then append one token per step at the
cache's single shared write slot, each at its own positions ``L_b, L_b + 1, ...``.
"""

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemini_mini.batch import Batch, Modality
from gemini_mini.config import ModelConfig
from gemini_mini.infer import sampling
from gemini_mini.model import Decoder
from gemini_mini.modalities import interleave
from gemini_mini.modalities.segments import Segment

# Cache lengths are rounded up to a multiple of this, so prompts of similar length share
# one compiled decode loop.
CACHE_BUCKET = 64


@dataclasses.dataclass(frozen=True, eq=False)
class Generation:
  """One prompt's continuation.

  Attributes:
    tokens: ``[N] int32`` generated ids, without the prompt; ends with the stop id when one
      was generated (then ``N <= max_new_tokens``), else ``N == max_new_tokens``.
    text: ``tokens`` decoded, without the stop id (special ids are dropped).
  """

  tokens: np.ndarray
  text: str


def prefill_batch(examples: Sequence[interleave.FlatExample], *, patch_dim: int,
                  audio_dim: int, length: int | None = None, bucket: int = 1,
                  items: tuple[int, int] | None = None) -> tuple[Batch, np.ndarray]:
  """Right-aligns ``examples`` in one batch of numpy arrays (see the module docstring).

  Args:
    length: ``T``, at least the longest example; None: the longest.
    bucket: the patch and audio-frame axes are rounded up to a multiple of this, so that
      batches of similar prompts share one compiled prefill.
    items: ``(patches, audio frames)``, the sizes of those axes instead.

  Returns:
    ``(batch, lengths_B)``: per-position fields ``[B, T]``, row b's patches and audio frames
    first in ``patches [B, P, patch_dim]`` and ``audio [B, A, audio_dim]``; ``lengths_B``
    the examples' lengths.
  """
  lengths_B = np.array([len(example.tokens) for example in examples], np.int32)
  batch_size, length = len(examples), int(lengths_B.max()) if length is None else length
  round_up = lambda n: -(-n // bucket) * bucket
  # At least one item: the embedder gathers from the item axis even when no row uses it.
  num_patches, num_audio = items or (
      round_up(max(1, *(len(example.patches) for example in examples))),
      round_up(max(1, *(len(example.audio) for example in examples))))
  fields = {name: np.zeros((batch_size, length), dtype) for name, dtype in (
      ('tokens', np.int32), ('modality', np.int8), ('segment_ids', np.int32),
      ('positions', np.int32), ('targets', np.int32), ('loss_mask', np.float32))}
  patches = np.zeros((batch_size, num_patches, patch_dim), np.float32)
  audio = np.zeros((batch_size, num_audio, audio_dim), np.float32)
  for row, example in enumerate(examples):
    start = length - len(example.tokens)
    fields['tokens'][row, start:] = example.tokens
    fields['modality'][row, start:] = example.modality
    fields['segment_ids'][row, start:] = 1
    fields['positions'][row, start:] = np.arange(len(example.tokens))
    for items, out in ((example.patches, patches), (example.audio, audio)):
      if len(items):  # an example without items holds a [0, 0] array
        out[row, :len(items)] = items
  return Batch(**fields, patches=patches, audio=audio), lengths_B


def generate(decoder, prompts: Sequence[Sequence[Segment]], tokenizer, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             stop_ids: Sequence[int] | None = None, seed: int = 0,
             prompt_shape: tuple[int, int, int] | None = None) -> list[Generation]:
  """Continues each prompt with text tokens, all prompts as one batch.

  The MoE layers run with ``moe_dispatch: dropless`` whatever ``decoder.config`` says (the
  parameters are the same for both dispatches). Capacity dispatch sizes each expert's slots
  by the tokens of one call, so the tokens a prompt or a decoding step would drop, and with
  them the logits, would differ from the training forward's over the same sequence;
  dropless drops none, and cached decoding equals that forward.

  Args:
    decoder: a ``model.Decoder``.
    prompts: B examples, each a list of ``Segment`` (text, image, audio) in reading order;
      text usually starts with ``tokenizer.bos_id``.
    tokenizer: a ``text.Tokenizer`` (placeholder ids for ``flatten``, ``decode`` for text).
    max_new_tokens: the most tokens generated per prompt, >= 1.
    temperature, top_k, top_p: see ``sampling.sample``; temperature 0 (default) is greedy.
    stop_ids: a row stops after generating any of these; None means ``(tokenizer.eos_id,)``,
      ``()`` never stops early.
    seed: the sampling seed; the same seed and inputs give the same output.
    prompt_shape: ``(positions, patches, audio frames)`` every prompt batch is padded to, so
      that every call compiles one program (PPO's rollouts); None rounds each call's longest
      prompt and item counts up to a multiple of ``CACHE_BUCKET``.

  Returns:
    One ``Generation`` per prompt, in order.

  Raises:
    ValueError: a bad setting, or a prompt that is empty, has items of the wrong width, or
      does not leave room for ``max_new_tokens`` within ``model.max_length``.
  """
  config = decoder.config
  stop_ids = (tokenizer.eos_id,) if stop_ids is None else tuple(stop_ids)
  _check_settings(config, len(prompts), max_new_tokens, temperature, top_k, top_p, stop_ids)
  examples = [interleave.flatten(prompt, tokenizer) for prompt in prompts]
  _check_prompts(config, examples, max_new_tokens)
  # Prompt lengths and item counts rounded up to CACHE_BUCKET (within model.max_length), or
  # to prompt_shape: batches of similar prompts share compiled programs.
  longest = max(len(example.tokens) for example in examples)
  length = min(-(-longest // CACHE_BUCKET) * CACHE_BUCKET, config.max_length - max_new_tokens)
  if prompt_shape is not None:
    length, num_patches, num_audio = prompt_shape
    _check_shape(config, examples, prompt_shape, max_new_tokens)
  batch, lengths_B = prefill_batch(examples, patch_dim=config.patch_dim,
                                   audio_dim=config.audio_dim, length=length,
                                   bucket=CACHE_BUCKET if prompt_shape is None else 1,
                                   items=None if prompt_shape is None else (num_patches, num_audio))
  needed = batch.tokens.shape[1] + max_new_tokens
  cache_length = min(-(-needed // CACHE_BUCKET) * CACHE_BUCKET, config.max_length)
  is_stop_V = np.zeros(config.vocab_size, bool)
  is_stop_V[list(stop_ids)] = True

  graphdef, state = _dropless_graphdef(config), nnx.state(decoder)
  logits_BV, cache = _prefill(graphdef, state, batch, cache_length)
  generated_BS, steps, _ = _decode_loop(
      graphdef, state, logits_BV, cache, jnp.asarray(lengths_B), jnp.int32(max_new_tokens),
      jnp.asarray(is_stop_V), jax.random.key(seed), jnp.float32(temperature),
      jnp.int32(top_k), jnp.float32(top_p))

  generations = []
  for tokens in np.asarray(generated_BS)[:, :int(steps)]:
    stops = np.flatnonzero(is_stop_V[tokens])
    end = stops[0] + 1 if len(stops) else len(tokens)
    text = tokenizer.decode(tokens[:end - 1] if len(stops) else tokens)
    generations.append(Generation(tokens=tokens[:end].copy(), text=text))
  return generations


@functools.cache
def _dropless_graphdef(config: ModelConfig) -> nnx.GraphDef:
  """The graph of ``Decoder(config)`` with ``moe_dispatch: dropless``, whose parameters are
  those of either dispatch (built once per config)."""
  config = dataclasses.replace(config, moe_dispatch='dropless')
  return nnx.graphdef(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))


@functools.partial(jax.jit, static_argnames=('graphdef', 'cache_length'))
def _prefill(graphdef, state, batch: Batch, cache_length: int):
  """``(logits_BV, cache)``: the prompts in a fresh cache and each row's next-token logits."""
  decoder = nnx.merge(graphdef, state)
  cache = decoder.init_cache(batch.tokens.shape[0], cache_length)
  logits_B1V, cache = decoder.prefill(batch, cache, last_only=True)
  return logits_B1V[:, 0], cache


@functools.partial(jax.jit, static_argnames=('graphdef',), donate_argnames=('cache',))
def _decode_loop(graphdef, state, logits_BV, cache, lengths_B, max_new_tokens, is_stop_V, key,
                 temperature, top_k, top_p):
  """Samples from ``logits_BV``, then feeds each token back until every row has produced a
  stop id (``is_stop_V``) or ``max_new_tokens`` tokens.

  Everything but the shapes is traced, so this compiles once per (batch size, cache
  length). Returns ``(generated_BS, steps, cache)``: row b's tokens in
  ``generated_BS[b, :steps]`` (a cache-length buffer, which bounds ``max_new_tokens``), 0
  after its stop id. The final cache is returned so that it can alias the donated input:
  the loop then updates one cache in place instead of holding a second copy.
  """
  decoder = nnx.merge(graphdef, state)
  batch_size, cache_length = lengths_B.shape[0], cache[0].k_JHS.shape[-1]
  choose = lambda logits_BV, step: sampling.sample(
      logits_BV, jax.random.fold_in(key, step), temperature=temperature, top_k=top_k,
      top_p=top_p)
  column = lambda value, dtype: jnp.full((batch_size, 1), value, dtype)
  # New tokens are text: no image or audio items, so the step skips both encoders.
  no_items = {'patches': jnp.zeros((batch_size, 0, decoder.config.patch_dim)),
              'audio': jnp.zeros((batch_size, 0, decoder.config.audio_dim))}

  def feed_back(carry):
    step, cache, tokens_B, done_B, generated_BS = carry
    # Token ``step - 1`` of row b sits at position L_b + step - 1, right after its prompt.
    batch = Batch(tokens=tokens_B[:, None], modality=column(Modality.TEXT, jnp.int8),
                  segment_ids=column(1, jnp.int32),
                  positions=(lengths_B + step - 1)[:, None].astype(jnp.int32),
                  targets=column(0, jnp.int32), loss_mask=column(0, jnp.float32), **no_items)
    logits_B1V, cache = decoder.decode(batch, cache)
    # Stopped rows still run (the batch moves in lockstep) but only write padding.
    tokens_B = jnp.where(done_B, 0, choose(logits_B1V[:, 0], step))
    generated_BS = generated_BS.at[:, step].set(tokens_B)
    return step + 1, cache, tokens_B, done_B | is_stop_V[tokens_B], generated_BS

  def going(carry):
    step, _, _, done_B, _ = carry
    return (step < max_new_tokens) & ~done_B.all()

  tokens_B = choose(logits_BV, 0)
  generated_BS = jnp.zeros((batch_size, cache_length), jnp.int32).at[:, 0].set(tokens_B)
  step, cache, _, _, generated_BS = jax.lax.while_loop(
      going, feed_back, (jnp.int32(1), cache, tokens_B, is_stop_V[tokens_B], generated_BS))
  return generated_BS, step, cache


def _check_settings(config, num_prompts, max_new_tokens, temperature, top_k, top_p, stop_ids):
  problems = [
      (num_prompts >= 1, 'no prompts; pass a list of examples, each a list of Segments'),
      (max_new_tokens >= 1, f'max_new_tokens is {max_new_tokens}; ask for at least 1'),
      (temperature >= 0, f'temperature is {temperature}; use 0 (greedy) or a positive value'),
      (top_k >= 0, f'top_k is {top_k}; use 0 (keep all) or a positive count'),
      (0 < top_p <= 1, f'top_p is {top_p}; use a probability in (0, 1] (1 keeps all)'),
      (all(0 <= i < config.vocab_size for i in stop_ids),
       f'stop_ids {stop_ids} leave [0, {config.vocab_size}); pass ids of the model\'s tokenizer')]
  for ok, message in problems:
    if not ok:
      raise ValueError(message)


def _check_shape(config, examples, prompt_shape, max_new_tokens):
  if prompt_shape[0] + max_new_tokens > config.max_length:
    raise ValueError(f'prompt_shape {tuple(prompt_shape)} with max_new_tokens={max_new_tokens} '
                     f'exceeds model.max_length={config.max_length}; pass fewer positions')
  for index, example in enumerate(examples):
    sizes = (len(example.tokens), len(example.patches), len(example.audio))
    if any(size > most for size, most in zip(sizes, prompt_shape)):
      raise ValueError(f'prompt {index} takes (positions, patches, audio frames) = {sizes}, '
                       f'more than prompt_shape {tuple(prompt_shape)}; pass a larger '
                       'prompt_shape or None')


def _check_prompts(config, examples, max_new_tokens):
  for index, example in enumerate(examples):
    if not len(example.tokens):
      raise ValueError(f'prompt {index} is empty; give it at least one segment (e.g. bos)')
    for name, items, width, key in (('image patches', example.patches, config.patch_dim,
                                     'model.patch_dim'),
                                    ('audio frames', example.audio, config.audio_dim,
                                     'model.audio_dim')):
      if len(items) and items.shape[1] != width:
        raise ValueError(f'prompt {index} has {name} of width {items.shape[1]} but {key} is '
                         f'{width}; build them with the settings the model was trained with')
    if len(example.tokens) + max_new_tokens > config.max_length:
      raise ValueError(f'prompt {index} takes {len(example.tokens)} positions, which with '
                       f'max_new_tokens={max_new_tokens} exceeds model.max_length='
                       f'{config.max_length}; shorten the prompt or lower max_new_tokens')
