"""TFDS builder of short video clips at 1 frame a second: moving emoji, one frame with a word.

A clip lasts ``S`` seconds (4 to 16, drawn per clip) and is stored as its 1 fps frames,
uint8 ``[S, 32, 32, 3]`` (the model's image size, so ``video.video_segments(frames, 1.0,
tokenizer)`` gives 2 + 2 S segments, 19 S + 2 positions). It is a few *shots* of 2 to 5
seconds (the last one may be shorter), each one emoji from Noto Color Emoji (a real drawn
image, 14-24 px across) on a plain background colour, drifting 0.75-2.5 px a second in a
straight line so that consecutive frames differ like video. Exactly one frame, second
``word_second``, also carries a word: black DejaVu Sans Bold capitals stretched to fill a
white box over ``WORD_BOX`` (all 32 columns x rows 6-25, 62% of the frame), legible at 32 x 32;
the rest of that frame shows the shot going on. The clips feed "which word appears in the
video, and at what second?" training and, through ``render_emoji_frame`` and
``render_word_frame``, a video needle-in-a-haystack eval that composes longer videos.

Words: ``WORDS``, 159 common English words of 3 to 5 letters (40 + 63 + 56), uppercase,
shared by both splits: eval tests reading known words in unseen clips.

Emoji: every single code point of the blocks in ``EMOJI_BLOCKS`` that the installed font
draws, except the skin-tone and hair components, those that show letters or digits
(``EMOJI_WITH_TEXT``: they would compete with the word) and those mostly white (over
``MAX_WHITE_FRACTION`` of their opaque pixels, so no emoji frame looks like the word box):
1,042 with Debian 12's font. Backgrounds are never near-white (saturation >= 0.35, value
<= 0.9).

Splits, disjoint in emoji by construction (in ``full``, no eval frame equals a train frame;
the 7% of word frames whose emoji hides behind the box differ by background colour):
  ``eval``: clips whose shots use the emoji whose hash falls in 20% (197 emoji);
  ``train``: clips of the other emoji (845).
Clip ``i`` of a split comes from an RNG seeded by a hash of ``(split, i)``: the same bytes on
every build, and the ``small`` config's clips are the first of ``full``'s.

Configs: ``small`` (32 train + 16 eval clips, 481 s of video, 0.7 MB, built in 2 s) and
``full`` (2000 + 200 clips, 21,964 frames = 6.1 hours at 1 fps, 67 MB of pixels stored in
20 MB; built in 36 s, 32 CPU seconds on one core, 300 MB peak memory).

Features: ``frames`` uint8 ``[S, 32, 32, 3]`` (frame ``t`` shown at second ``t``);
``seconds`` (int32, ``S``); ``word`` (``'HAPPY'``); ``word_second`` (int32, in ``[0, S)``);
``emoji`` (the shots' emoji, in order, joined without separator); ``shot_starts`` (int32
``[num_shots]``, the second each shot begins; the first is 0); ``clip_id``
(``'train/00042'``, unique; also the example key). ``file_format='array_record'``: no
TensorFlow needed; read with ``builder.as_data_source(split)``. The info's metadata holds
per split ``num_examples``, ``seconds`` (in all), ``num_emoji`` (the split's emoji) and
``num_words`` (distinct words used).

Needs the Debian packages ``fonts-noto-color-emoji`` and ``fonts-dejavu-core``: a missing one
raises ``sources.MissingSourceError`` with the ``apt-get install`` line.
"""

import colorsys
import functools
import hashlib
import math
import os
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw, ImageFont

from gemini_mini.data import sources
from gemini_mini.modalities import image as image_lib

NAME = 'video_clips'
SPLITS = ('train', 'eval')
NUM_EXAMPLES = {'small': {'train': 32, 'eval': 16}, 'full': {'train': 2000, 'eval': 200}}
EVAL_PER_MILLE = 200
FRAME_SIZE = image_lib.IMAGE_SIZE
SECONDS_RANGE = (4, 16)            # clip length, inclusive
SHOT_SECONDS_RANGE = (2, 5)        # shot length, inclusive (the last shot is cut to fit)
EMOJI_SIZE_RANGE = (14.0, 24.0)    # the emoji's longer side, frame pixels
DRIFT_RANGE = (0.75, 2.5)          # emoji speed, frame pixels a second
OVERHANG = 3.0                     # how far (px) an emoji may drift past the frame's edge
SUPERSAMPLE = 4                    # frames are drawn this much larger, then downsampled
WORD_BOX = (0, 6, 32, 26)          # left, top, right, bottom (exclusive), frame pixels
WORD_MARGIN = (1, 2)               # white around the text inside the box: x, y pixels

EMOJI_FONT = '/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf'
WORD_FONT = '/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf'
FONT_PACKAGES = {'EMOJI_FONT': 'fonts-noto-color-emoji', 'WORD_FONT': 'fonts-dejavu-core'}
EMOJI_FONT_SIZE = 109              # the one size of Noto Color Emoji's bitmaps
WORD_FONT_SIZE = 100               # big, so the stretched text is drawn smooth

EMOJI_BLOCKS = ((0x1F300, 0x1F5FF),  # Miscellaneous Symbols and Pictographs
                (0x1F600, 0x1F64F),  # Emoticons
                (0x1F680, 0x1F6FF),  # Transport and Map Symbols
                (0x1F900, 0x1F9FF),  # Supplemental Symbols and Pictographs
                (0x1FA70, 0x1FAFF))  # Symbols and Pictographs Extended-A
EMOJI_COMPONENTS = (*range(0x1F3FB, 0x1F400),  # skin tones: alone, colour swatches
                    *range(0x1F9B0, 0x1F9B4))  # hair styles: alone, a wisp of hair
EMOJI_WITH_TEXT = frozenset(
    '\U0001F3E7\U0001F4AF\U0001F519\U0001F51A\U0001F51B\U0001F51C\U0001F51D\U0001F51E'
    '\U0001F51F\U0001F520\U0001F521\U0001F522\U0001F523\U0001F524\U0001F6BE')  # ATM, 100, ...
MAX_WHITE_FRACTION = 0.25          # of an emoji's opaque pixels that may be near-white
NEAR_WHITE = 230                   # every channel at least this: near-white

WORDS = (  # 40 + 63 + 56 words, each group alphabetical
    'ANT', 'ARM', 'BAG', 'BED', 'BEE', 'BIG', 'BOX', 'BUS', 'CAR', 'CAT', 'COW', 'CUP', 'DOG',
    'DRY', 'EAR', 'EAT', 'EGG', 'EYE', 'FOX', 'FUN', 'HAT', 'HOT', 'ICE', 'JAM', 'KEY', 'LEG',
    'MAP', 'NET', 'OWL', 'PEN', 'PIG', 'RED', 'RUN', 'SEA', 'SKY', 'SUN', 'TEA', 'TOY', 'VAN',
    'WET',
    'BEAR', 'BELL', 'BIRD', 'BLUE', 'BOAT', 'BONE', 'BOOK', 'CAKE', 'COAT', 'COLD', 'CORN', 'DEER',
    'DESK', 'DOOR', 'DUCK', 'FACE', 'FARM', 'FAST', 'FIRE', 'FISH', 'FROG', 'GATE', 'GIFT', 'GOAT',
    'GOLD', 'HAND', 'HILL', 'HOME', 'JUMP', 'KING', 'KITE', 'LAKE', 'LAMP', 'LEAF', 'LION', 'MILK',
    'MOON', 'NEST', 'NOSE', 'PARK', 'PINK', 'RAIN', 'RICE', 'RING', 'ROAD', 'ROCK', 'ROSE', 'SAND',
    'SHIP', 'SHOE', 'SING', 'SLOW', 'SNOW', 'SOCK', 'SOUP', 'STAR', 'SWIM', 'TREE', 'WALK', 'WARM',
    'WIND', 'WOLF', 'YEAR',
    'APPLE', 'BEACH', 'BLACK', 'BREAD', 'BROWN', 'BRUSH', 'CHAIR', 'CHALK', 'CLOCK', 'CLOUD',
    'DANCE', 'FIELD', 'GRAPE', 'GRASS', 'GREEN', 'HAPPY', 'HEART', 'HORSE', 'HOTEL', 'HOUSE',
    'KNIFE', 'LEMON', 'LIGHT', 'MONEY', 'MOUSE', 'MUSIC', 'NIGHT', 'OCEAN', 'PAINT', 'PAPER',
    'PEACH', 'PHONE', 'PIANO', 'PLANE', 'PLANT', 'PLATE', 'RIVER', 'ROBOT', 'SHARK', 'SHEEP',
    'SMALL', 'SMILE', 'SNAKE', 'SPOON', 'STONE', 'STORM', 'SUGAR', 'TABLE', 'TIGER', 'TRAIN',
    'TRUCK', 'WATER', 'WHALE', 'WHITE', 'WORLD', 'ZEBRA')


def _hash(salt: str, text: str) -> int:
  return int.from_bytes(hashlib.sha256(f'{salt}:{text}'.encode()).digest()[:8], 'little')


def _missing_packages() -> list[str]:
  return sorted({package for constant, package in FONT_PACKAGES.items()
                 if not os.path.exists(globals()[constant])})


def install_missing() -> None:
  """Installs the missing fonts' packages (see ``sources.apt_install``)."""
  sources.apt_install(_missing_packages(), 'video clips')


def check_installed() -> None:
  """Raises ``sources.MissingSourceError`` naming every missing font and the line that
  installs it (``sudo apt-get install -y fonts-dejavu-core fonts-noto-color-emoji``)."""
  missing = _missing_packages()
  if missing:
    paths = ', '.join(globals()[constant] for constant, package in FONT_PACKAGES.items()
                      if package in missing)
    raise sources.MissingSourceError(
        f'video clips need the fonts {paths} (not found); install them with: '
        f'sudo apt-get install -y {" ".join(missing)}')


@functools.lru_cache(maxsize=4)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
  if not os.path.exists(path):
    check_installed()  # `path` is EMOJI_FONT or WORD_FONT: raises with the apt line
  return ImageFont.truetype(path, size)


@functools.lru_cache(maxsize=64)  # a shot draws its emoji once a second
def _emoji_glyph(char: str) -> Image.Image | None:
  """``char`` drawn by the emoji font, cropped to its ink, premultiplied ``'RGBa'``; None when
  the font has no glyph for it."""
  font = _font(EMOJI_FONT, EMOJI_FONT_SIZE)
  left, top, right, bottom = font.getbbox(char)
  if right <= left or bottom <= top:
    return None
  glyph = Image.new('RGBA', (right, bottom), (0, 0, 0, 0))
  ImageDraw.Draw(glyph).text((0, 0), char, font=font, embedded_color=True)
  ink = glyph.getbbox()
  return None if ink is None else glyph.crop(ink).convert('RGBa')  # resizes without halos


def _is_usable(char: str) -> bool:
  glyph = _emoji_glyph(char)
  if glyph is None:
    return False
  rgba = np.asarray(glyph.convert('RGBA'))
  opaque = rgba[:, :, 3] > 127
  white = opaque & (rgba[:, :, :3].min(axis=2) >= NEAR_WHITE)
  return white.sum() <= MAX_WHITE_FRACTION * opaque.sum()


@functools.lru_cache(maxsize=1)
def _usable_emoji() -> tuple[str, ...]:
  return tuple(chr(code) for first, last in EMOJI_BLOCKS for code in range(first, last + 1)
               if code not in EMOJI_COMPONENTS and chr(code) not in EMOJI_WITH_TEXT
               and _is_usable(chr(code)))


def emoji_of(split: str) -> tuple[str, ...]:
  """The emoji that ``split``'s clips show (see the module docstring); train and eval share
  none. Scans the font once per process (about 1.5 s)."""
  if split not in SPLITS:
    raise ValueError(f'split {split!r} is unknown; use one of {SPLITS}')
  return tuple(char for char in _usable_emoji()
               if (_hash('split', char) % 1000 < EVAL_PER_MILLE) == (split == 'eval'))


def render_emoji_frame(char: str, background_rgb, center_xy, size: float) -> np.ndarray:
  """One frame: emoji ``char`` on a plain background, uint8 ``[32, 32, 3]``.

  Drawn ``SUPERSAMPLE`` times larger, then shrunk with ``image.resize`` (anti-aliased), so
  sub-pixel positions and sizes move the emoji smoothly.

  Args:
    char: one emoji code point the emoji font draws (e.g. from ``emoji_of``).
    background_rgb: the background colour, 3 ints in [0, 255].
    center_xy: where the emoji's centre lies, ``(x, y)`` in frame pixels (floats; the frame
      spans 0 to 32), possibly partly outside the frame.
    size: the emoji's longer side in frame pixels (the aspect ratio is kept).

  Raises:
    ValueError: the font has no glyph for ``char``.
    sources.MissingSourceError: the emoji font is not installed (with the apt line).
  """
  glyph = _emoji_glyph(char)
  if glyph is None:
    raise ValueError(f'{EMOJI_FONT} has no glyph for {char!r} (U+{ord(char[0]):04X}); '
                     'pick one from emoji_of(split)')
  scale = size * SUPERSAMPLE / max(glyph.size)
  width, height = max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))
  emoji = glyph.resize((width, height), Image.Resampling.LANCZOS).convert('RGBA')
  canvas = Image.new('RGB', (FRAME_SIZE * SUPERSAMPLE,) * 2, tuple(int(c) for c in background_rgb))
  x, y = (round(c * SUPERSAMPLE) for c in center_xy)
  canvas.paste(emoji, (x - width // 2, y - height // 2), emoji)  # clips at the edges
  return np.round(image_lib.resize(np.asarray(canvas), FRAME_SIZE) * 255).astype(np.uint8)


def render_word_frame(word: str, frame_HWC=None) -> np.ndarray:
  """``frame_HWC`` with ``word`` drawn over it: uint8 ``[32, 32, 3]``.

  The pixels inside ``WORD_BOX`` become a white box; the word, in black DejaVu Sans Bold, is
  stretched to fill it but for ``WORD_MARGIN`` (drawn ``SUPERSAMPLE`` times larger, then
  area-averaged down, so its edges are anti-aliased). The pixels outside the box are kept.

  Args:
    word: the text, e.g. one of ``WORDS``; longer words get narrower letters.
    frame_HWC: uint8 ``[32, 32, 3]`` to draw on (e.g. from ``render_emoji_frame``); None for
      a mid-grey frame.

  Raises:
    ValueError: an empty word or a frame of another shape or dtype.
    sources.MissingSourceError: the DejaVu font is not installed (with the apt line).
  """
  frame = (np.full((FRAME_SIZE, FRAME_SIZE, 3), 128, np.uint8) if frame_HWC is None
           else np.array(frame_HWC))
  if frame.shape != (FRAME_SIZE, FRAME_SIZE, 3) or frame.dtype != np.uint8:
    raise ValueError(f'frame {frame.shape} {frame.dtype} is not uint8 [{FRAME_SIZE}, '
                     f'{FRAME_SIZE}, 3]; render one with render_emoji_frame')
  if not word.strip():
    raise ValueError('the word is empty; pass one of WORDS')
  font = _font(WORD_FONT, WORD_FONT_SIZE)
  left, top, right, bottom = font.getbbox(word)
  ink = Image.new('L', (right - left, bottom - top), 255)
  ImageDraw.Draw(ink).text((-left, -top), word, font=font, fill=0)
  box_left, box_top, box_right, box_bottom = WORD_BOX
  margin_x, margin_y = WORD_MARGIN
  box = Image.new('L', ((box_right - box_left) * SUPERSAMPLE, (box_bottom - box_top) * SUPERSAMPLE),
                  255)
  box.paste(ink.resize((box.width - 2 * margin_x * SUPERSAMPLE,
                        box.height - 2 * margin_y * SUPERSAMPLE), Image.Resampling.LANCZOS),
            (margin_x * SUPERSAMPLE, margin_y * SUPERSAMPLE))
  small = box.resize((box_right - box_left, box_bottom - box_top), Image.Resampling.BOX)
  frame[box_top:box_bottom, box_left:box_right] = np.asarray(small)[:, :, None]
  return frame


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
  """A random colour that is never near-white (saturation >= 0.35, value in [0.35, 0.9])."""
  rgb = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.35, 1), rng.uniform(0.35, 0.9))
  return tuple(round(channel * 255) for channel in rgb)


def _shot_frames(char: str, seconds: int, rng: np.random.Generator) -> list[np.ndarray]:
  """``seconds`` frames of ``char`` drifting in a straight line over a random background."""
  background = _background(rng)
  size = rng.uniform(*EMOJI_SIZE_RANGE)
  angle, speed = rng.uniform(0, 2 * math.pi), rng.uniform(*DRIFT_RANGE)
  travel = speed * (seconds - 1) * np.array([math.cos(angle), math.sin(angle)])
  low, high = size / 2 - OVERHANG, FRAME_SIZE - size / 2 + OVERHANG
  start = rng.uniform(low - np.minimum(travel, 0), high - np.maximum(travel, 0))  # stays in
  return [render_emoji_frame(char, background, start + travel * t / max(seconds - 1, 1), size)
          for t in range(seconds)]


def clip(split: str, index: int) -> dict:
  """Clip ``index`` of ``split``, the same on every call: the example the builder stores.

  Returns:
    ``{'frames': uint8 [S, 32, 32, 3], 'seconds': S, 'word', 'word_second', 'emoji',
    'shot_starts': int32 [num_shots], 'clip_id'}`` (see the module docstring).
  """
  pool = emoji_of(split)
  clip_id = f'{split}/{index:05d}'
  rng = np.random.default_rng(_hash('clip', clip_id))
  seconds = int(rng.integers(SECONDS_RANGE[0], SECONDS_RANGE[1] + 1))
  word = WORDS[rng.integers(len(WORDS))]
  word_second = int(rng.integers(seconds))
  shot_starts = [0]
  while (next_start := shot_starts[-1] + int(rng.integers(
      SHOT_SECONDS_RANGE[0], SHOT_SECONDS_RANGE[1] + 1))) < seconds:
    shot_starts.append(next_start)
  chars = [pool[i] for i in rng.choice(len(pool), len(shot_starts), replace=False)]
  frames = []
  for char, start, end in zip(chars, shot_starts, shot_starts[1:] + [seconds]):
    frames.extend(_shot_frames(char, end - start, rng))
  frames[word_second] = render_word_frame(word, frames[word_second])
  return {'frames': np.stack(frames), 'seconds': seconds, 'word': word,
          'word_second': word_second, 'emoji': ''.join(chars),
          'shot_starts': np.array(shot_starts, np.int32), 'clip_id': clip_id}


class VideoClips(tfds.core.GeneratorBasedBuilder):
  """Short 1 fps clips of drifting emoji with one word frame; see the module docstring."""

  name = NAME
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES: ClassVar[dict[str, str]] = {
      '1.0.0': 'Noto emoji shots with one DejaVu word frame, emoji-disjoint eval.'}
  BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = [
      tfds.core.BuilderConfig(name='full', description='2000 train + 200 eval clips'),
      tfds.core.BuilderConfig(name='small', description='32 train + 16 eval, for tests/CI'),
  ]

  def __init__(self, **kwargs):
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'frames': tfds.features.Tensor(shape=(None, FRAME_SIZE, FRAME_SIZE, 3),
                                           dtype=np.uint8),
            'seconds': tfds.features.Tensor(shape=(), dtype=np.int32),
            'word': tfds.features.Text(),
            'word_second': tfds.features.Tensor(shape=(), dtype=np.int32),
            'emoji': tfds.features.Text(),
            'shot_starts': tfds.features.Tensor(shape=(None,), dtype=np.int32),
            'clip_id': tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    check_installed()
    self.info.metadata['fps'] = 1
    self.info.metadata['num_words'] = len(WORDS)
    return {split: self._generate_examples(split, NUM_EXAMPLES[self.builder_config.name][split])
            for split in SPLITS}

  def _generate_examples(self, split: str, num_examples: int):
    """Yields ``(clip_id, example)`` for ``split``; records its counts in the metadata."""
    stats = {'num_examples': 0, 'seconds': 0, 'num_emoji': len(emoji_of(split)),
             'num_words': 0}
    words = set()
    for index in range(num_examples):
      example = clip(split, index)
      stats['num_examples'] += 1
      stats['seconds'] += example['seconds']
      words.add(example['word'])
      yield example['clip_id'], example
    stats['num_words'] = len(words)
    self.info.metadata[split] = stats


def builder(data_dir: str, subset: str = 'full') -> VideoClips:
  """The builder for ``subset`` (``'full'`` or ``'small'``) in ``data_dir`` (built or not)."""
  if subset not in NUM_EXAMPLES:
    raise ValueError(f"subset {subset!r} is unknown; use 'full' or 'small'")
  return VideoClips(data_dir=data_dir, config=subset)


def summary(clips: VideoClips) -> str:
  """Clips, seconds of video, emoji and words per split, from the build's metadata."""
  lines = []
  for split in SPLITS:
    stats = clips.info.metadata[split]
    lines.append(f'{split:5} {stats["num_examples"]:>6,} clips {stats["seconds"]:>8,} s of video, '
                 f'{stats["num_emoji"]} emoji, {stats["num_words"]} words')
  return '\n'.join(lines)
