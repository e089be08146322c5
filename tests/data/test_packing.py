"""Packing against a plain-Python reference: no leaks across segments, exact loss masks."""

import numpy as np
import pytest

from gemini_mini.batch import check_batch
from gemini_mini.data import packing

SHAPES = dict(num_patches=3, patch_dim=5, num_audio_frames=2, audio_dim=7)


def random_documents(seed, count=40, max_length=50):
  """Documents whose every token says which document and position it came from."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(0, max_length, count)
  return [np.arange(length, dtype=np.int32) + 1000 * (index + 1)
          for index, length in enumerate(lengths)]


def reference_rows(documents, seq_len, num_rows):
  """The token stream of all documents cut every ``seq_len`` tokens, one dict per row."""
  stream = [(doc, pos, int(token)) for doc, tokens in enumerate(documents)
            for pos, token in enumerate(tokens)]
  rows = []
  for start in range(0, num_rows * seq_len, seq_len):
    cells = stream[start:start + seq_len]
    row = {name: [] for name in ('tokens', 'segment_ids', 'positions', 'targets', 'loss_mask')}
    segment, position = 0, 0
    for t, (doc, _, token) in enumerate(cells):
      new_piece = t == 0 or cells[t - 1][0] != doc
      segment, position = (segment + 1, 0) if new_piece else (segment, position + 1)
      same_next = t + 1 < len(cells) and cells[t + 1][0] == doc
      row['tokens'].append(token)
      row['segment_ids'].append(segment)
      row['positions'].append(position)
      row['targets'].append(cells[t + 1][2] if same_next else 0)
      row['loss_mask'].append(1.0 if same_next else 0.0)
    rows.append(row)
  return rows


@pytest.mark.parametrize('seed, seq_len', [(0, 16), (1, 37), (2, 64), (3, 7), (4, 2)])
def test_packing_matches_reference(seed, seq_len):
  documents = random_documents(seed)
  num_rows = sum(map(len, documents)) // seq_len  # rows the stream fills completely
  cursor, got = packing.Cursor(), []
  for _ in range(num_rows):
    pieces, cursor = packing.take_pieces(lambda i: documents[i], cursor, seq_len)
    got.append(packing.pack_row(pieces, seq_len))
  for row, expected in zip(got, reference_rows(documents, seq_len, num_rows)):
    for name, values in expected.items():
      np.testing.assert_array_equal(row[name], values, err_msg=name)
    assert not row['modality'].any()


def test_no_segment_mixes_documents():
  documents, seq_len = random_documents(5, max_length=90), 32
  cursor = packing.Cursor()
  for _ in range(30):
    pieces, cursor = packing.take_pieces(lambda i: documents[i], cursor, seq_len)
    row = packing.pack_row(pieces, seq_len)
    for segment in np.unique(row['segment_ids']):
      tokens = row['tokens'][row['segment_ids'] == segment]
      assert len(set(tokens // 1000)) == 1  # one document
      assert (np.diff(tokens) == 1).all()   # a contiguous slice of it


def test_padding_and_batch_contract():
  pieces = [np.array([5, 6, 7], np.int32), np.array([8], np.int32), np.array([9, 10], np.int32)]
  row = packing.pack_row(pieces, 10)
  np.testing.assert_array_equal(row['segment_ids'], [1, 1, 1, 2, 3, 3, 0, 0, 0, 0])
  np.testing.assert_array_equal(row['positions'], [0, 1, 2, 0, 0, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(row['targets'], [6, 7, 0, 0, 10, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(row['loss_mask'], [1, 1, 0, 0, 1, 0, 0, 0, 0, 0])
  batch = packing.stack_rows([row, packing.pack_row([], 10)], **SHAPES)
  assert batch.patches.shape == (2, 3, 5) and batch.audio.shape == (2, 2, 7)
  assert batch.loss_mask.dtype == np.float32 and batch.modality.dtype == np.int8
  check_batch(batch, vocab_size=11, patch_dim=5, audio_dim=7)
  assert not batch.loss_mask[1].any() and not batch.segment_ids[1].any()


def test_too_many_tokens_is_an_error():
  with pytest.raises(ValueError, match='cut them with take_pieces'):
    packing.pack_row([np.zeros(6, np.int32), np.zeros(5, np.int32)], 10)
