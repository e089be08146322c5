"""The batch contract's host-side check: valid batches pass, each violation is named."""

import dataclasses

import numpy as np
import pytest

from gemini_mini import config as config_lib
from gemini_mini.batch import BatchError, check_batch
from helpers import make_batch

MODEL = config_lib.load('configs/test.yaml').model


def check(batch):
  check_batch(batch, vocab_size=MODEL.vocab_size, patch_dim=MODEL.patch_dim,
              audio_dim=MODEL.audio_dim)


def edit(batch, field, fn):
  array = np.array(getattr(batch, field))
  fn(array)
  return dataclasses.replace(batch, **{field: array})


def test_valid_batches_pass():
  check(make_batch(MODEL, images=[(0, 3, 8)], audio=[(1, 0, 8)]))
  check(make_batch(MODEL, documents=((10, 20, 30), (64,))))


def set_at(index, value):
  def fn(array):
    array[index] = value
  return fn


@pytest.mark.parametrize('field, fn, message', [
    ('tokens', set_at((0, 3), MODEL.vocab_size), 'ids must lie in'),
    ('targets', set_at((1, 3), -1), 'ids must lie in'),
    ('modality', set_at((0, 3), 7), 'values must be 0 (text), 1 (image) or 2 (audio)'),
    ('modality', set_at((0, slice(0, 9)), 1), 'a row has 9 image positions but only 8 items'),
    ('modality', set_at((1, slice(0, 9)), 2), 'a row has 9 audio positions but only 8 items'),
    ('positions', set_at((0, 5), 9), 'row 0 position 5 is 9, expected 5'),
    ('positions', set_at((1, 40), 40), 'row 1 position 40 is 40, expected 0'),
    ('segment_ids', set_at((0, 0), -2), 'negative segment id'),
])
def test_violations_name_the_field(field, fn, message):
  with pytest.raises(BatchError) as error:
    check(edit(make_batch(MODEL), field, fn))
  assert str(error.value).startswith(f'batch.{field}:') and message in str(error.value)


def test_a_segment_id_used_twice_in_a_row_is_rejected():
  batch = make_batch(MODEL, documents=((20, 20, 24), (64,)))
  batch = edit(batch, 'segment_ids', set_at((0, slice(40, 64)), 1))
  with pytest.raises(BatchError, match='segment_ids: row 0 uses a segment id for two separate runs'):
    check(batch)


def test_shape_mismatches():
  batch = make_batch(MODEL)
  with pytest.raises(BatchError, match=r'batch.loss_mask: shape \(2, 63\) differs'):
    check(dataclasses.replace(batch, loss_mask=batch.loss_mask[:, :63]))
  with pytest.raises(BatchError, match='batch.patches: expected shape .* model.patch_dim'):
    check(dataclasses.replace(batch, patches=batch.patches[:, :, :10]))
  with pytest.raises(BatchError, match='batch.audio: expected shape .* model.audio_dim'):
    check(dataclasses.replace(batch, audio=batch.audio[:1]))
