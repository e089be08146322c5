"""Trains the shipped SentencePiece model: ``python -m gemini_mini.data.train_tokenizer``.

Input: from each corpus source's *train* documents and from the King James Bible, the lines
with the smallest hashes up to ``--megabytes`` per source (default 2.5, about 18 MB in all,
a few minutes on 2 cores). Equal shares keep the large sources (the dictionary) from
crowding out the small ones (fortunes). The Flax codebase, a long-context evaluation
document, is left out.

Model: unigram, 8192 pieces, identity normalisation with every space kept and
``add_dummy_prefix`` off (so code and text round-trip exactly), digits split, byte fallback,
``\\n`` a piece of its own, and the special tokens of ``gemini_mini.modalities.text`` as
control symbols at fixed ids. The conversation tokens (``text.TURN_TOKENS``) then replace the
learned pieces of lowest score, the last ids (``reserve_last_ids``): they were added after
models had been trained, and taking the rarest pieces' places kept every other id.
"""

import argparse
import collections
import hashlib
import io
import os
import pathlib
import time

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from gemini_mini.data import sources
from gemini_mini.data import text_corpus
from gemini_mini.modalities import text as text_lib


def sample_lines(megabytes: float) -> list[str]:
  """Up to ``megabytes`` of non-blank lines per source, picked by hash (deterministic)."""
  sources.check_installed()
  lines = []
  for source in sources.CORPUS_SOURCES + sources.LONG_SOURCES[:1]:  # + the Bible
    ranked = []
    for name, text in source.read(collections.Counter()):
      if source in sources.CORPUS_SOURCES and text_corpus.split_of(source.name, name) != 'train':
        continue
      for index, line in enumerate(text.split('\n')):
        if line.strip():
          key = hashlib.sha256(f'{source.name}/{name}/{index}'.encode()).digest()[:8]
          ranked.append((key, line))
    ranked.sort()
    budget = megabytes * 1e6
    for _, line in ranked:
      if budget <= 0:
        break
      lines.append(line)
      budget -= len(line.encode()) + 1
  return lines


def train(lines: list[str], output: pathlib.Path) -> None:
  """Trains on ``lines`` (one sentence each) and writes the model to ``output``."""
  special = text_lib.MODALITY_TOKENS + text_lib.TIME_STAMP_TOKENS
  model = io.BytesIO()  # not model_prefix, which would record this machine's path
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model, model_type='unigram',
      vocab_size=text_lib.VOCAB_SIZE, character_coverage=0.9995, byte_fallback=True,
      split_digits=True, normalization_rule_name='identity', remove_extra_whitespaces=False,
      add_dummy_prefix=False, allow_whitespace_only_pieces=True, max_sentence_length=16384,
      pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece='<pad>', bos_piece='<bos>',
      eos_piece='<eos>', unk_piece='<unk>', control_symbols=list(special),
      user_defined_symbols=['\n'], input_sentence_size=0, shuffle_input_sentence=False,
      num_threads=os.cpu_count() or 1, minloglevel=2)
  output.write_bytes(reserve_last_ids(model.getvalue(), text_lib.TURN_TOKENS))


def reserve_last_ids(model: bytes, pieces: tuple[str, ...]) -> bytes:
  """The serialized SentencePiece ``model`` with its last ``len(pieces)`` pieces turned into
  the control symbols ``pieces``, in order. A unigram model lists its learned pieces by
  falling score, so these are the rarest; text that held them is encoded by other pieces
  or byte fallback."""
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model)
  normal = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
  last = proto.pieces[len(proto.pieces) - len(pieces):]
  if any(entry.type != normal for entry in last):
    raise ValueError(f'the last {len(pieces)} pieces are not all learned pieces; '
                     'train with a larger vocab_size')
  for entry, piece in zip(last, pieces):
    entry.piece, entry.score = piece, 0.0
    entry.type = sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL
  return proto.SerializeToString()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--megabytes', type=float, default=2.5, help='input per source')
  parser.add_argument('--output', type=pathlib.Path, default=text_lib.DEFAULT_MODEL)
  args = parser.parse_args()
  start = time.time()
  lines = sample_lines(args.megabytes)
  print(f'sampled {len(lines):,} lines, {sum(map(len, lines)) / 1e6:.1f} M characters '
        f'in {time.time() - start:.0f} s; training ...', flush=True)
  start = time.time()
  train(lines, args.output)
  tokenizer = text_lib.Tokenizer(args.output)
  characters = sum(map(len, lines))
  tokens = sum(len(tokenizer.encode(line)) for line in lines)
  print(f'wrote {args.output} ({tokenizer.vocab_size} pieces) in {time.time() - start:.0f} s; '
        f'{characters / tokens:.2f} characters per token on the sample')


if __name__ == '__main__':
  main()
