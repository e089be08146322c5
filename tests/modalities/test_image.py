"""patchify: row-major patch order, [-1, 1] scaling, resizing against independent references."""

import numpy as np
import pytest
from PIL import Image

from gemini_mini.modalities import image as image_lib

RNG = np.random.default_rng(0)


def test_patch_order_against_explicit_loops():
  x = RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)  # already 32 x 32: no resampling
  patches = image_lib.patchify(x)
  assert patches.shape == (16, 192) and patches.dtype == np.float32
  expected = np.zeros((16, 192), np.float32)
  for r in range(4):
    for c in range(4):
      for i in range(8):
        for j in range(8):
          for k in range(3):
            expected[r * 4 + c, (i * 8 + j) * 3 + k] = x[r * 8 + i, c * 8 + j, k] / 127.5 - 1
  np.testing.assert_allclose(patches, expected, atol=1e-6)
  assert patches.min() >= -1 and patches.max() <= 1


def test_round_trip_equals_pillow_resize():
  # Mid-range noise, so that bicubic overshoot is never clipped between Pillow's two passes.
  x = RNG.integers(64, 192, (50, 40, 3), dtype=np.uint8)
  reference = np.asarray(Image.fromarray(x, 'RGB').resize((32, 32), Image.Resampling.BICUBIC))
  # Pillow's 8-bit path rounds to whole levels after each pass; patchify resamples floats.
  np.testing.assert_allclose(image_lib.unpatchify(image_lib.patchify(x)), reference / 255,
                             atol=1.5 / 255)


def test_other_sizes_round_trip():
  x = RNG.random((16, 16, 3)).astype(np.float32)
  patches = image_lib.patchify(x, image_size=16, patch_size=4)
  assert patches.shape == (16, 48)
  np.testing.assert_allclose(image_lib.unpatchify(patches, 16, 4), x, atol=1e-6)


def test_downscaling_a_smooth_image_samples_it():
  def f(u, v):  # a smooth picture on the unit square, one period across
    return 0.5 + 0.3 * np.sin(2 * np.pi * u) * np.cos(2 * np.pi * v)
  centres = lambda n: (np.arange(n) + 0.5) / n  # pixel centres
  big = f(*np.meshgrid(centres(256), centres(128), indexing='ij'))  # 256 rows, 128 columns
  small = image_lib.unpatchify(image_lib.patchify(np.repeat(big[:, :, None], 3, axis=2)))
  expected = f(*np.meshgrid(centres(32), centres(32), indexing='ij'))
  np.testing.assert_allclose(small, np.repeat(expected[:, :, None], 3, axis=2), atol=0.01)


def test_grayscale_rgba_and_float_inputs():
  gray = RNG.integers(0, 256, (20, 24), dtype=np.uint8)
  rgb = np.repeat(gray[:, :, None], 3, axis=2)
  np.testing.assert_array_equal(image_lib.patchify(gray), image_lib.patchify(rgb))
  np.testing.assert_array_equal(image_lib.patchify(gray[:, :, None]), image_lib.patchify(rgb))
  np.testing.assert_allclose(image_lib.patchify(rgb.astype(np.float64) / 255),
                             image_lib.patchify(rgb), atol=1e-6)
  opaque = np.concatenate([rgb, np.full((20, 24, 1), 255, np.uint8)], axis=2)
  np.testing.assert_allclose(image_lib.patchify(opaque), image_lib.patchify(rgb), atol=1e-6)
  black = np.zeros((8, 8, 4), np.float32)
  black[:, :, 3] = 0.5  # half-transparent black over white: mid grey
  np.testing.assert_allclose(image_lib.to_rgb(black), 0.5)
  black[:, :, 3] = 0  # fully transparent: white, the top of the range
  np.testing.assert_allclose(image_lib.patchify(black), 1, atol=1e-6)


@pytest.mark.parametrize('bad, match', [
    (np.zeros((2, 32, 32, 3), np.uint8), r'\(2, 32, 32, 3\) is not'),
    (np.zeros((32, 32, 2), np.uint8), r'\(32, 32, 2\) is not'),
    (np.zeros((0, 5, 3), np.uint8), 'empty'),
    (np.full((4, 4, 3), 2.0), r'must lie in \[0, 1\]'),
    (np.zeros((4, 4, 3), np.int16), 'dtype int16'),
])
def test_bad_images_rejected(bad, match):
  with pytest.raises(ValueError, match=match):
    image_lib.patchify(bad)


def test_bad_sizes_rejected():
  with pytest.raises(ValueError, match='must be positive and divide image_size'):
    image_lib.patchify(np.zeros((8, 8, 3), np.uint8), image_size=30, patch_size=8)
  with pytest.raises(ValueError, match=r'expected \(16, 192\)'):
    image_lib.unpatchify(np.zeros((15, 192)))
