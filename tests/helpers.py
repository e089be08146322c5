"""Helpers for tests of any package layer: random batches that honour the batch contract,
and the longest run of equal items in a sequence."""

import jax.numpy as jnp
import numpy as np

from gemini_mini import Batch, Modality


def make_batch(model_config, *, batch_size=2, length=64, num_patches=8, num_audio=8,
               documents=((64,), (40, 24)), images=(), audio=(), seed=0) -> Batch:
  """A random batch. ``documents[b]`` lists the lengths of row b's packed documents (the rest
  is padding); ``images`` / ``audio`` list ``(row, start, count)`` runs of item positions."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, model_config.vocab_size, (batch_size, length), dtype=np.int32)
  segment_ids = np.zeros((batch_size, length), np.int32)
  positions = np.zeros((batch_size, length), np.int32)
  for row, lengths in enumerate(documents):
    start = 0
    for segment, doc_length in enumerate(lengths, start=1):
      segment_ids[row, start:start + doc_length] = segment
      positions[row, start:start + doc_length] = np.arange(doc_length)
      start += doc_length
  modality = np.zeros((batch_size, length), np.int8)
  for kind, runs in ((Modality.IMAGE, images), (Modality.AUDIO, audio)):
    for row, start, count in runs:
      modality[row, start:start + count] = kind
  return Batch(
      tokens=jnp.asarray(tokens), modality=jnp.asarray(modality),
      segment_ids=jnp.asarray(segment_ids), positions=jnp.asarray(positions),
      targets=jnp.asarray(np.roll(tokens, -1, axis=1)),
      loss_mask=jnp.asarray((segment_ids != 0).astype(np.float32)),
      patches=jnp.asarray(rng.normal(size=(batch_size, num_patches, model_config.patch_dim)),
                          jnp.float32),
      audio=jnp.asarray(rng.normal(size=(batch_size, num_audio, model_config.audio_dim)),
                        jnp.float32))


def longest_run(sequence) -> int:
  """The most equal items in a row in ``sequence`` (a string's characters, a list's items)."""
  longest = current = 1
  for previous, item in zip(sequence[:-1], sequence[1:]):
    current = current + 1 if item == previous else 1
    longest = max(longest, current)
  return longest


PLAIN_WORDS = ('the', 'special', 'magic', 'number', 'for', 'is', 'and', 'of', 'a', 'in',
               'light', 'day', 'night', 'water', 'earth', 'said', 'God', 'was', 'good', 'what')


def plain_tokenizer(path, vocab_size: int = 200) -> str:
  """Trains a small SentencePiece model at ``path`` the way other projects' are made: its own
  ``<unk>``, ``<s>`` and ``</s>`` and none of gemini_mini's special tokens (as an imported
  checkpoint's ``tokenizer.model``). Digits and letters all covered. Returns the path."""
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  lines = [' '.join(rng.choice(PLAIN_WORDS, 12)) + f' {rng.integers(10**6)}.' for _ in range(2000)]
  lines.append('abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,:;?!-\'"')
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_prefix=str(path).removesuffix('.model'),
      vocab_size=vocab_size, model_type='bpe', character_coverage=1.0, unk_id=0, bos_id=1,
      eos_id=2, pad_id=-1, minloglevel=2)
  return str(path)
