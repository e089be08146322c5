"""Images -> patches for ``Batch.patches``: resize, scale to [-1, 1], cut into square patches.

``patchify(image_HWC)`` returns ``patches_PI``: ``P = (image_size / patch_size)^2`` patches in
row-major order (patch ``r * n + c`` is row ``r``, column ``c`` of the ``n x n`` grid), each
flattened in (row, column, channel) order, so ``I = patch_size^2 * 3`` (192 for the default
8 x 8 RGB patch, ``model.patch_dim``). With the defaults (32 x 32 images, 8 x 8 patches) an
image is 16 patches. Pixel values are scaled linearly from [0, 1] to [-1, 1]: no per-image
or per-dataset standardisation, so a value means the same brightness everywhere.
"""

import einops
import numpy as np
from PIL import Image

IMAGE_SIZE = 32
PATCH_SIZE = 8
PATCHES_PER_IMAGE = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 16 with the defaults


def to_rgb(image_HWC) -> np.ndarray:
  """Any supported image as float32 RGB in [0, 1], shape ``[H, W, 3]``.

  Args:
    image_HWC: ``[H, W]`` or ``[H, W, 1]`` grayscale, ``[H, W, 3]`` RGB or ``[H, W, 4]`` RGBA;
      uint8 in [0, 255] or float in [0, 1]. RGBA is composited over a white background
      (transparent stamps and emoji are drawn on white).

  Raises:
    ValueError: naming the shape, dtype or value range that is not supported.
  """
  image = np.asarray(image_HWC)
  shape = image.shape
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
    raise ValueError(f'image shape {shape} is not [H, W], [H, W, 1], [H, W, 3] or '
                     '[H, W, 4]; pass one image (not a batch) with channels last')
  if image.shape[0] == 0 or image.shape[1] == 0:
    raise ValueError(f'image shape {shape} is empty; pass an image of at least 1 x 1')
  if image.dtype == np.uint8:
    image = image.astype(np.float32) / 255
  elif np.issubdtype(image.dtype, np.floating):
    image = image.astype(np.float32)
    if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
      raise ValueError(f'float image values must lie in [0, 1], got [{np.nanmin(image):.4g}, '
                       f'{np.nanmax(image):.4g}]; pass uint8 pixels or divide by 255')
  else:
    raise ValueError(f'image dtype {image.dtype} is not supported; pass uint8 in [0, 255] or '
                     'float in [0, 1]')
  if image.shape[2] == 1:
    return np.repeat(image, 3, axis=2)
  if image.shape[2] == 4:
    rgb, alpha = image[:, :, :3], image[:, :, 3:]
    return rgb * alpha + (1 - alpha)
  return image


def resize(image_HWC, image_size: int = IMAGE_SIZE) -> np.ndarray:
  """``to_rgb(image)`` resized to ``[image_size, image_size, 3]`` float32 in [0, 1].

  Bicubic resampling (Pillow, on float channels, so no rounding to 8 bits); when shrinking,
  the filter widens with the scale factor, which low-passes the image (anti-aliasing).
  The aspect ratio is not kept: the image is stretched to a square.
  """
  rgb = to_rgb(image_HWC)
  channels = [np.asarray(Image.fromarray(np.ascontiguousarray(rgb[:, :, c])).resize(
      (image_size, image_size), Image.Resampling.BICUBIC)) for c in range(3)]
  return np.clip(np.stack(channels, axis=2), 0, 1)  # bicubic overshoots at sharp edges


def _check_sizes(image_size: int, patch_size: int) -> None:
  if patch_size <= 0 or image_size <= 0 or image_size % patch_size:
    raise ValueError(f'patch_size {patch_size} must be positive and divide image_size '
                     f'{image_size}; e.g. image_size 32 with patch_size 8')


def patchify(image_HWC, image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE
             ) -> np.ndarray:
  """One image -> ``patches_PI`` float32 in [-1, 1].

  Args:
    image_HWC: see ``to_rgb`` for the accepted shapes and dtypes.
    image_size: side of the square the image is resized to.
    patch_size: side of a square patch; must divide ``image_size``.

  Returns:
    ``[P, I]`` with ``P = (image_size // patch_size)^2`` in row-major patch order and
    ``I = patch_size * patch_size * 3`` in (row, column, channel) order.
  """
  _check_sizes(image_size, patch_size)
  image = resize(image_HWC, image_size) * 2 - 1
  return einops.rearrange(image, '(r p) (c q) k -> (r c) (p q k)', p=patch_size, q=patch_size)


def unpatchify(patches_PI, image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE
               ) -> np.ndarray:
  """The inverse of ``patchify`` after its resize: ``[image_size, image_size, 3]`` float32
  in [0, 1], for tests and pictures."""
  _check_sizes(image_size, patch_size)
  n = image_size // patch_size
  patches = np.asarray(patches_PI, np.float32)
  if patches.shape != (n * n, patch_size * patch_size * 3):
    raise ValueError(f'patches shape {patches.shape} does not make a {image_size} x '
                     f'{image_size} image of {patch_size} x {patch_size} patches; expected '
                     f'{(n * n, patch_size * patch_size * 3)}')
  image = einops.rearrange(patches, '(r c) (p q k) -> (r p) (c q) k', r=n, p=patch_size,
                           q=patch_size)
  return (image + 1) / 2
