"""The image-caption builder: expected counts, train/eval disjoint in ids and images but
sharing their classes, 32 x 32 RGB images, caption templates, determinism, clear errors."""

import collections
import unicodedata

import numpy as np
import pytest

from gemini_mini.data import image_caption, prepare, sources
from gemini_mini.modalities import image as image_lib


def _read(builder):
  return {split: [{key: value.decode() if isinstance(value, bytes) else value
                   for key, value in builder.as_data_source(split)[i].items()}
                  for i in range(builder.info.splits[split].num_examples)]
          for split in image_caption.SPLITS}


@pytest.fixture(scope='module')
def small(tmp_path_factory):
  """The small config, built once for this module: ``(examples by split, builder)``."""
  builder = prepare.ensure_dataset(image_caption, str(tmp_path_factory.mktemp('captions')),
                                   'small')
  return _read(builder), builder


@pytest.fixture(scope='module')
def full_selection():
  """``select('full')`` (no images): ``(items by split, skipped emoji)``."""
  skipped = {}
  return image_caption.select('full', skipped), skipped


def test_counts_match_the_config(small):
  examples, builder = small
  metadata = builder.info.metadata
  chosen = image_caption.select('small')
  for split in image_caption.SPLITS:
    expected = image_caption.NUM_EXAMPLES['small'][split]
    counted = collections.Counter(example['source'] for example in examples[split])
    assert metadata[split]['num_examples'] == dict(counted) == expected
    assert metadata[split]['num_classes'] == {**image_caption.NUM_CLASSES['small'], 'digits': 10}
    assert sorted(example['example_id'] for example in examples[split]) == sorted(
        item.example_id for item in chosen[split])
  assert set(metadata['skipped']) == {'emoji_unnamed', 'emoji_unrenderable'}
  rows = [line.split() for line in image_caption.summary(builder).splitlines()]
  assert ['eval', 'emoji', '12', '12'] in rows and ['train', 'digits', '24', '10'] in rows


def test_splits_are_disjoint_in_ids_and_images(small):
  examples, _ = small
  ids = {split: {example['example_id'] for example in examples[split]}
         for split in image_caption.SPLITS}
  images = {split: {example['image'].tobytes() for example in examples[split]}
            for split in image_caption.SPLITS}
  assert not ids['train'] & ids['eval'] and not images['train'] & images['eval']
  for split in image_caption.SPLITS:
    assert len(ids[split]) == len(images[split]) == len(examples[split])  # all distinct


def test_images_are_32x32_rgb_and_redrawn_identically(small):
  examples, _ = small
  size = image_lib.IMAGE_SIZE
  for example in examples['train'] + examples['eval']:
    image_HWC = example['image']
    assert image_HWC.dtype == np.uint8 and image_HWC.shape == (size, size, 3)
    assert image_HWC.std() > 20, example['example_id']  # a picture, not a flat colour
    item = image_caption.Item(**{field: example[field] for field in image_caption.Item._fields})
    np.testing.assert_array_equal(image_caption.draw(item), image_HWC)
  assert image_lib.patchify(examples['eval'][0]['image']).shape == (16, 192)


def test_captions_follow_the_templates(small):
  examples, _ = small
  for example in examples['train'] + examples['eval']:
    label, caption = example['label'], example['caption']
    if example['source'] == 'emoji':
      assert caption == unicodedata.name(label).lower() and len(label) == 1
      assert example['example_id'].startswith(f'emoji/{ord(label):X}/')
    elif example['source'] == 'digits':
      assert caption == f'handwritten digit {image_caption.DIGIT_NAMES[int(label)]}'
    else:
      assert caption == f'the word "{label}"' and label.isalpha() and 3 <= len(label) <= 4


def test_every_eval_class_is_in_train(full_selection):
  selected, _ = full_selection
  for subset in image_caption.NUM_EXAMPLES:
    selection = selected if subset == 'full' else image_caption.select(subset)
    for source in image_caption.SOURCES:
      labels = {split: collections.Counter(item.label for item in selection[split]
                                           if item.source == source)
                for split in image_caption.SPLITS}
      assert set(labels['eval']) <= set(labels['train']), (subset, source)
      assert sum(labels['eval'].values()) == image_caption.NUM_EXAMPLES[subset]['eval'][source]
      if source == 'digits':
        assert len(labels['eval']) == 10
      else:
        assert len(labels['train']) == image_caption.NUM_CLASSES[subset][source]
        # round-robin: every class has as many variants as any other, give or take one
        assert max(labels['train'].values()) - min(labels['train'].values()) <= 1
  digits = {split: {item.example_id for item in selected[split] if item.source == 'digits'}
            for split in image_caption.SPLITS}
  assert not digits['train'] & digits['eval']
  assert collections.Counter(item.label for item in selected['eval'] if item.source == 'digits'
                             ) == {str(d): image_caption.DIGIT_EVAL_PER_CLASS for d in range(10)}


def test_selection_is_deterministic_and_small_is_in_full(full_selection):
  selected, skipped = full_selection
  again = {}
  assert image_caption.select('full', again) == selected and again == skipped
  small = image_caption.select('small')
  for split in image_caption.SPLITS:
    assert set(small[split]) <= set(selected[split])
  item = small['train'][0]
  np.testing.assert_array_equal(image_caption.draw(item), image_caption.draw(item))


def test_emoji_inventory():
  skipped = {}
  emoji = image_caption.emoji_inventory(skipped)
  assert len(emoji) > 1000 and '\U0001F431' in emoji  # cat face
  assert image_caption.emoji_caption('\U0001F431') == 'cat face'
  assert not {'7', '#', '\U0001F3FB', '\u200D', '\uFE0F'} & set(emoji)  # not standalone
  assert all(code.startswith('U+') for codes in skipped.values() for code in codes)
  assert 'cat' in image_caption.word_inventory(emoji)


def test_missing_font_names_the_apt_line(monkeypatch, tmp_path):
  monkeypatch.setattr(image_caption, 'EMOJI_FONT', str(tmp_path / 'NotoColorEmoji.ttf'))
  with pytest.raises(sources.MissingSourceError,
                     match='apt-get install -y fonts-noto-color-emoji$'):
    image_caption.check_installed()
  monkeypatch.setattr(image_caption, 'WORD_FONT', str(tmp_path / 'DejaVuSans-Bold.ttf'))
  monkeypatch.setattr(image_caption.os, 'geteuid', lambda: 1000)  # never apt-get from a test
  with pytest.raises(sources.MissingSourceError,
                     match='apt-get install -y fonts-dejavu-core fonts-noto-color-emoji$'):
    prepare.ensure_dataset(image_caption, str(tmp_path / 'data'), 'small')
