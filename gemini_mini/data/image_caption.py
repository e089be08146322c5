"""TFDS builder of real image-caption pairs: emoji, handwritten digits and printed words.

Sources (all offline; each image is uint8 RGB ``[32, 32, 3]``, ``modalities.image``'s size):
  ``emoji``: the single-code-point emoji of the Noto Color Emoji font (Debian
    ``fonts-noto-color-emoji``; every non-ASCII code point of its character map except
    combining marks, format characters and skin-tone modifiers: about 1,380), drawn by Pillow
    at 109 px (the font's only bitmap size), captioned with the lower-cased Unicode name
    (``'cat face'``). Emoji this Python's ``unicodedata`` cannot name (newer Unicode) or
    that Pillow draws as nothing are skipped and listed in the metadata.
  ``digits``: scikit-learn's ``load_digits()``, 1,797 real 8 x 8 handwritten digits (16
    grey levels), drawn as dark ink on white, captioned ``'handwritten digit seven'``.
  ``words``: the 3- and 4-letter words of the emoji captions (about 320: ``'cat'``,
    ``'moon'``), printed in DejaVu Sans Bold (Debian ``fonts-dejavu-core``), captioned
    ``'the word "cat"'``.
Each emoji and word is drawn in variants: an RNG seeded by a hash of the example id (the
class and its variant, e.g. ``'emoji/1F431/train3'``) picks the size (60-100% of the image
side), position and pastel background colour, and for words a dark ink colour. Each is
composed on a 128 x 128 canvas, then shrunk to 32 x 32 (bicubic, anti-aliased).

Splits, disjoint in images by construction, with the same classes in both, so caption
accuracy on ``eval`` measures recognising new images of known classes:
  ``eval``: emoji and words in variants training never uses (``'eval0'``, ...; train's are
    ``'train0'``, ...); for each digit class, the 16 images with the smallest hash of their
    pixels.
  ``train``: the other variants and digit images.
Classes are the emoji and words with the smallest hash (``NUM_CLASSES``); a split takes
their variants round-robin (variant 0 of every class, then variant 1, ...), and digits
round-robin over the ten classes in hash order, so classes stay balanced, ``small``'s
examples are a subset of ``full``'s and nothing changes between builds: every example has
the same bytes and order with the same Pillow, FreeType and fonts (the array_record files
themselves may still differ in their compressed bytes).

Configs (``NUM_EXAMPLES`` has the counts per source, ``NUM_CLASSES`` the emoji and words):
  ``small``: 64 train (24 emoji of 12 classes, 24 digits, 16 words of 8) + 32 eval (12, 12,
    8); 0.3 MB, built in about 2 s (3 s with imports).
  ``full``: 4,800 train (2,400 emoji of 300 classes, 1,600 digits, 800 words of 100) + 560
    eval (300, 160, 100); 9 MB on disk, built in about 11 s on 2 shared cores, 300 MB peak.

Features: ``image`` uint8 ``[32, 32, 3]``; ``caption``; ``source`` (``'emoji'``, ``'digits'``
or ``'words'``); ``label`` (the class: the emoji, the digit ``'7'`` or the word);
``example_id`` (``'emoji/1F431/eval0'``, ``'digits/1234'`` (its ``load_digits()`` index),
``'words/cat/train2'``; unique, also the example key). ``file_format='array_record'``: no
TensorFlow needed; read with ``builder.as_data_source(split)``; ``modalities.image.patchify``
turns an image into 16 patches of 192 values. The info's metadata holds per split the
examples and classes per source, and under ``skipped`` the emoji left out (``'U+1FAE8'``).

Needs the Debian packages ``fonts-noto-color-emoji`` and ``fonts-dejavu-core``: a missing one
raises ``sources.MissingSourceError`` with the ``apt-get install`` line; and scikit-learn
(imported only to build). Build: ``python -m gemini_mini.data.prepare [--subset small]
[--data-dir DIR]`` (with the other datasets; ``prepare.ensure_dataset`` for one).
"""

import collections
import functools
import hashlib
import itertools
import os
import pathlib
import re
import struct
import unicodedata
from collections.abc import Iterator
from typing import ClassVar, NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw, ImageFont

from gemini_mini.data import sources
from gemini_mini.modalities import image as image_lib

NAME = 'image_captions'
SPLITS = ('train', 'eval')
SOURCES = ('emoji', 'digits', 'words')
NUM_EXAMPLES = {  # subset -> split -> source -> examples
    'small': {'train': {'emoji': 24, 'digits': 24, 'words': 16},
              'eval': {'emoji': 12, 'digits': 12, 'words': 8}},
    'full': {'train': {'emoji': 2400, 'digits': 1600, 'words': 800},  # of 1,637 train digits
             'eval': {'emoji': 300, 'digits': 160, 'words': 100}},
}
NUM_CLASSES = {'small': {'emoji': 12, 'words': 8}, 'full': {'emoji': 300, 'words': 100}}
DIGIT_EVAL_PER_CLASS = 16  # of 174-183 images per digit

EMOJI_FONT = '/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf'
EMOJI_FONT_SIZE = 109  # the size of the font's bitmaps; FreeType refuses any other
WORD_FONT = '/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf'
WORD_FONT_SIZE = 64    # drawn large, then shrunk with the canvas
WORD_LENGTHS = (3, 4)  # longer words are illegible at 32 px
FONT_PACKAGES = {'emoji': 'fonts-noto-color-emoji', 'words': 'fonts-dejavu-core'}

DIGIT_NAMES = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
DIGIT_CAPTION = 'handwritten digit {}'  # formatted with DIGIT_NAMES[digit]
WORD_CAPTION = 'the word "{}"'

CANVAS = 128                    # side of the square a variant is composed on, in pixels
SCALE_RANGE = (0.6, 1.0)        # the glyph's longer side over the canvas side
BACKGROUND_RANGE = (160, 255)   # per RGB channel, inclusive: pastel
INK_RANGE = (0, 96)             # words' ink, per RGB channel, inclusive: dark on pastel


class Item(NamedTuple):
  """One example before its image is drawn (``draw`` makes the image)."""

  example_id: str  # 'emoji/1F431/train3', 'digits/1234' or 'words/cat/eval0'
  source: str      # one of SOURCES
  label: str       # the class: the emoji, the digit ('7') or the word
  caption: str


def _hash(salt: str, text: str) -> int:
  return int.from_bytes(hashlib.sha256(f'{salt}:{text}'.encode()).digest()[:8], 'little')


def _code_points(font_path: str) -> list[int]:
  """The code points of a font's format-12 (full Unicode) character map, ascending."""
  try:
    data = pathlib.Path(font_path).read_bytes()
    num_tables, = struct.unpack_from('>H', data, 4)
    tables = {data[12 + 16 * i:16 + 16 * i]: struct.unpack_from('>I', data, 20 + 16 * i)[0]
              for i in range(num_tables)}
    cmap = tables[b'cmap']
    num_subtables, = struct.unpack_from('>H', data, cmap + 2)
    for i in range(num_subtables):
      subtable = cmap + struct.unpack_from('>I', data, cmap + 8 + 8 * i)[0]
      if struct.unpack_from('>H', data, subtable)[0] == 12:
        num_groups, = struct.unpack_from('>I', data, subtable + 12)
        groups = (struct.unpack_from('>II', data, subtable + 16 + 12 * g)
                  for g in range(num_groups))
        return sorted({cp for start, end in groups for cp in range(start, end + 1)})
    raise KeyError('no format-12 cmap subtable')
  except (OSError, KeyError, struct.error) as error:
    raise sources.CorruptSourceError(
        f'cannot read the character map of {font_path} ({error!r}); reinstall it with '
        f'`sudo apt-get install --reinstall {FONT_PACKAGES["emoji"]}`') from error


@functools.cache
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
  return ImageFont.truetype(path, size)


def emoji_glyph(emoji: str) -> np.ndarray | None:
  """``emoji`` drawn by Pillow at 109 px: uint8 RGBA ``[h, w, 4]`` cropped to its ink, or
  None when Pillow draws nothing or fails (a code point the font cannot show alone)."""
  font = _font(EMOJI_FONT, EMOJI_FONT_SIZE)
  try:
    _, _, width, height = font.getbbox(emoji)
    canvas = Image.new('RGBA', (max(width, 1), max(height, 1)))
    ImageDraw.Draw(canvas).text((0, 0), emoji, font=font, embedded_color=True)
  except (OSError, RuntimeError, ValueError):  # raqm_layout() fails on some code points
    return None
  box = canvas.getbbox()  # of the non-transparent pixels
  return None if box is None else np.asarray(canvas.crop(box))


def word_glyph(word: str) -> np.ndarray:
  """``word`` in DejaVu Sans Bold at 64 px: uint8 ink coverage ``[h, w]``, cropped to it."""
  font = _font(WORD_FONT, WORD_FONT_SIZE)
  left, top, right, bottom = font.getbbox(word)
  canvas = Image.new('L', (right - left, bottom - top))
  ImageDraw.Draw(canvas).text((-left, -top), word, fill=255, font=font)
  return np.asarray(canvas.crop(canvas.getbbox()))


def emoji_inventory(skipped: dict[str, list[str]] | None = None) -> list[str]:
  """Every single-code-point emoji of the font that has a Unicode name and draws, by code
  point.

  Args:
    skipped: if given, ``skipped['emoji_unnamed']`` and ``skipped['emoji_unrenderable']``
      get the left-out code points (``'U+1FAE8'``).
  """
  skipped = {} if skipped is None else skipped
  found = []
  for code_point in _code_points(EMOJI_FONT):
    emoji = chr(code_point)
    category = unicodedata.category(emoji)  # 'Cn': newer than this Python's Unicode
    if category == 'Cn' and code_point >= 0x80:
      skipped.setdefault('emoji_unnamed', []).append(f'U+{code_point:04X}')
    # ASCII are keycap bases ('#', '7'); marks, format characters and skin-tone modifiers
    # (ZWJ, VS16, tags, U+20E3) only build sequences; Co is the font's private flags.
    elif code_point < 0x80 or category[0] in 'MCZ' or category == 'Sk':
      continue
    elif emoji_glyph(emoji) is None:
      skipped.setdefault('emoji_unrenderable', []).append(f'U+{code_point:04X}')
    else:
      found.append(emoji)
  return found


def emoji_caption(emoji: str) -> str:
  """The lower-cased Unicode name: ``'cat face'``."""
  return unicodedata.name(emoji).lower()


def word_inventory(emoji: list[str]) -> list[str]:
  """The distinct 3- and 4-letter words of the captions of ``emoji``, sorted."""
  pattern = re.compile(f'[a-z]{{{min(WORD_LENGTHS)},{max(WORD_LENGTHS)}}}')
  return sorted({word for e in emoji for word in emoji_caption(e).split()
                 if pattern.fullmatch(word)})


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits: ``(pixels_NHW uint8 in 0..16 [1797, 8, 8], digit_N int [1797])``."""
  # Imported here: scikit-learn pulls in scipy (about 1 s) and only building needs digits.
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  digits = load_digits()
  pixels_NHW = digits.images.astype(np.uint8)
  pixels_NHW.setflags(write=False)  # shared by every caller through the cache
  return pixels_NHW, digits.target


def _variants(source: str, classes: list[str], split: str, count: int) -> Iterator[Item]:
  """``count`` drawn variants of ``classes``, round-robin: variant 0 of each, then 1, ..."""
  caption = emoji_caption if source == 'emoji' else WORD_CAPTION.format
  ranked = ((variant, label) for variant in itertools.count() for label in classes)
  for variant, label in itertools.islice(ranked, count):
    key = f'{ord(label):X}' if source == 'emoji' else label
    yield Item(f'{source}/{key}/{split}{variant}', source, label, caption(label))


def _digit_items(subset: str) -> dict[str, list[Item]]:
  pixels_NHW, digit_N = _digits()
  by_digit = collections.defaultdict(list)  # digit -> indices in hash order
  # Hashing the pixels, not the index, keeps each image's split if the order ever changes.
  hashes = [_hash('digit', pixels_HW.tobytes().hex()) for pixels_HW in pixels_NHW]
  for index in sorted(range(len(digit_N)), key=hashes.__getitem__):
    by_digit[int(digit_N[index])].append(index)
  pools = {'eval': [indices[:DIGIT_EVAL_PER_CLASS] for _, indices in sorted(by_digit.items())],
           'train': [indices[DIGIT_EVAL_PER_CLASS:] for _, indices in sorted(by_digit.items())]}
  selected = {}
  for split in SPLITS:
    count = NUM_EXAMPLES[subset][split]['digits']
    round_robin = [index for rank in itertools.zip_longest(*pools[split]) for index in rank
                   if index is not None]
    if len(round_robin) < count:
      raise ValueError(f'{count} {split} digits requested but only {len(round_robin)} exist; '
                       f'lower NUM_EXAMPLES[{subset!r}][{split!r}]["digits"]')
    selected[split] = [Item(f'digits/{index}', 'digits', str(digit_N[index]),
                            DIGIT_CAPTION.format(DIGIT_NAMES[digit_N[index]]))
                       for index in round_robin[:count]]
  return selected


def select(subset: str, skipped: dict[str, list[str]] | None = None) -> dict[str, list[Item]]:
  """The examples of each split for ``subset``, without images, in a fixed order.

  Args:
    subset: ``'full'`` or ``'small'``.
    skipped: if given, receives the emoji left out (see ``emoji_inventory``).

  Returns:
    ``{split: items}``: per split, its emoji, then its digits, then its words, as many of
    each as ``NUM_EXAMPLES[subset][split]`` says.

  Raises:
    ValueError: ``subset`` is unknown, or a source has fewer classes or digits than asked.
  """
  if subset not in NUM_EXAMPLES:
    raise ValueError(f"subset {subset!r} is unknown; use 'full' or 'small'")
  emoji = emoji_inventory(skipped)
  classes = {}
  for source, inventory in (('emoji', emoji), ('words', word_inventory(emoji))):
    count = NUM_CLASSES[subset][source]
    if len(inventory) < count:
      raise ValueError(f'{count} {source} classes requested but only {len(inventory)} exist; '
                       f'lower NUM_CLASSES[{subset!r}][{source!r}]')
    classes[source] = sorted(inventory, key=lambda label, s=source: _hash(s, label))[:count]
  digits = _digit_items(subset)
  return {split: [*_variants('emoji', classes['emoji'], split,
                             NUM_EXAMPLES[subset][split]['emoji']),
                  *digits[split],
                  *_variants('words', classes['words'], split,
                             NUM_EXAMPLES[subset][split]['words'])]
          for split in SPLITS}


def _to_uint8(image_HWC: np.ndarray) -> np.ndarray:
  return np.round(image_HWC * 255).astype(np.uint8)


def compose(glyph: np.ndarray, seed: int) -> np.ndarray:
  """One variant of a glyph: uint8 RGB ``[32, 32, 3]``.

  Args:
    glyph: uint8 RGBA ``[h, w, 4]`` (an emoji) or ink coverage ``[h, w]`` (a word, inked in
      a dark colour from the RNG).
    seed: seeds the RNG that picks the glyph's size and position and the background.
  """
  rng = np.random.default_rng(seed)
  background = tuple(int(c) for c in rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1, 3))
  if glyph.ndim == 2:
    ink = rng.integers(INK_RANGE[0], INK_RANGE[1] + 1, 3).astype(np.uint8)
    glyph = np.concatenate([np.broadcast_to(ink, (*glyph.shape, 3)), glyph[:, :, None]], axis=2)
  height, width = glyph.shape[:2]
  scale = rng.uniform(*SCALE_RANGE) * CANVAS / max(height, width)
  size = (max(1, round(width * scale)), max(1, round(height * scale)))
  position = (int(rng.integers(CANVAS - size[0] + 1)), int(rng.integers(CANVAS - size[1] + 1)))
  # Pillow premultiplies alpha while resizing RGBA, so edges get no dark halo.
  sprite = Image.fromarray(glyph, 'RGBA').resize(size, Image.Resampling.LANCZOS)
  canvas = Image.new('RGB', (CANVAS, CANVAS), background)
  canvas.paste(sprite, position, sprite)  # blended by the sprite's alpha
  return _to_uint8(image_lib.resize(np.asarray(canvas)))


def draw(item: Item) -> np.ndarray:
  """The image of ``item``: uint8 RGB ``[32, 32, 3]``, the same bytes on every call.

  Raises:
    ValueError: an emoji that does not draw (``select`` never picks one).
  """
  if item.source == 'digits':
    pixels_NHW, _ = _digits()
    ink_HW = pixels_NHW[int(item.example_id.split('/')[1])] / 16
    return _to_uint8(image_lib.resize(1 - ink_HW))  # dark ink on white paper
  if item.source == 'emoji':
    glyph = emoji_glyph(item.label)
    if glyph is None:
      raise ValueError(f'emoji {item.label!r} ({item.example_id}) does not draw with '
                       f'{EMOJI_FONT}; take emoji from emoji_inventory()')
  else:
    glyph = word_glyph(item.label)
  return compose(glyph, _hash('variant', item.example_id))


def _missing_packages() -> list[str]:
  return sorted(FONT_PACKAGES[source] for source, path in
                (('emoji', EMOJI_FONT), ('words', WORD_FONT)) if not os.path.exists(path))


def install_missing() -> None:
  """Installs the missing fonts' packages (see ``sources.apt_install``)."""
  sources.apt_install(_missing_packages(), 'image captions')


def check_installed() -> None:
  """Raises ``sources.MissingSourceError`` naming every missing font package and the line
  that installs them (``sudo apt-get install -y fonts-dejavu-core fonts-noto-color-emoji``)."""
  missing = _missing_packages()
  if missing:
    raise sources.MissingSourceError(
        f'image captions need the fonts {EMOJI_FONT} and {WORD_FONT} ({", ".join(missing)} '
        f'missing); install them with: sudo apt-get install -y {" ".join(missing)}')


class ImageCaptions(tfds.core.GeneratorBasedBuilder):
  """Real image-caption pairs; see the module docstring for sources, splits and features."""

  name = NAME
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES: ClassVar = {'1.0.0': 'Noto emoji, scikit-learn digits and DejaVu words.'}
  BUILDER_CONFIGS: ClassVar = [
      tfds.core.BuilderConfig(name='full', description='4800 train + 560 eval examples'),
      tfds.core.BuilderConfig(name='small', description='64 train + 32 eval, for tests/CI'),
  ]

  def __init__(self, **kwargs):
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    size = image_lib.IMAGE_SIZE
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8),
            'caption': tfds.features.Text(),
            'source': tfds.features.Text(),
            'label': tfds.features.Text(),
            'example_id': tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    check_installed()
    skipped = {'emoji_unnamed': [], 'emoji_unrenderable': []}
    selected = select(self.builder_config.name, skipped)
    self.info.metadata['skipped'] = skipped
    return {split: self._generate_examples(split, selected[split]) for split in SPLITS}

  def _generate_examples(self, split: str, selected: list[Item]):
    """Yields ``(example_id, example)`` for ``split``; records its counts in the metadata."""
    examples, classes = collections.Counter(), collections.defaultdict(set)
    for item in selected:
      examples[item.source] += 1
      classes[item.source].add(item.label)
      yield item.example_id, {'image': draw(item), **item._asdict()}
    self.info.metadata[split] = {
        'num_examples': {source: examples[source] for source in SOURCES},
        'num_classes': {source: len(classes[source]) for source in SOURCES}}


def builder(data_dir: str, subset: str = 'full') -> ImageCaptions:
  """The builder for ``subset`` (``'full'`` or ``'small'``) in ``data_dir`` (built or not)."""
  if subset not in NUM_EXAMPLES:
    raise ValueError(f"subset {subset!r} is unknown; use 'full' or 'small'")
  return ImageCaptions(data_dir=data_dir, config=subset)


def summary(captions: ImageCaptions) -> str:
  """Examples and classes per split and source, and the skipped emoji, from the metadata."""
  lines = [f'{"split":6} {"source":7} {"examples":>9} {"classes":>8}']
  for split in SPLITS:
    stats = captions.info.metadata[split]
    for source in SOURCES:
      lines.append(f'{split:6} {source:7} {stats["num_examples"][source]:>9,} '
                   f'{stats["num_classes"][source]:>8,}')
  skipped = captions.info.metadata['skipped']
  lines.append(f'skipped emoji: {len(skipped["emoji_unnamed"])} without a Unicode name in '
               f'this Python, {len(skipped["emoji_unrenderable"])} that do not draw')
  return '\n'.join(lines)
