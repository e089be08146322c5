"""Video -> segments: one frame a second, each after its time stamp, inside video brackets.

A video of ``S`` seconds becomes, in order::

  text [<begin_video>]
  text [<t=0s>]  image (frame shown at 0 s)
  text [<t=1s>]  image (frame shown at 1 s)
  ...
  text [<t={S-1}s>]  image
  text [<end_video>]

and the interleaver brackets each image as ``<begin_image>`` + P ``<image>`` + ``<end_image>``,
so with 32 x 32 images of 8 x 8 patches a second of video costs 1 + 1 + 16 + 1 = 19 positions.
"""

import math

import numpy as np

from gemini_mini.modalities import image as image_lib
from gemini_mini.modalities import text as text_lib
from gemini_mini.modalities.segments import Segment

MAX_SECONDS = text_lib.MAX_TIME_STAMP + 1  # one time stamp token per second
# Positions a second costs with the default image: time stamp, image brackets, its patches.
POSITIONS_PER_SECOND = 3 + image_lib.PATCHES_PER_IMAGE


def sample_times(num_frames: int, fps_in: float) -> list[int]:
  """Index of the frame on screen at each whole second ``0, 1, ..., ceil(T / fps_in) - 1``.

  Frame ``k`` is shown during ``[k / fps_in, (k + 1) / fps_in)``, so second ``s`` takes frame
  ``floor(s * fps_in)``.
  """
  seconds = math.ceil(num_frames / fps_in)
  return [min(math.floor(s * fps_in), num_frames - 1) for s in range(seconds)]


def video_segments(frames_THWC, fps_in: float, tokenizer, *,
                   image_size: int = image_lib.IMAGE_SIZE,
                   patch_size: int = image_lib.PATCH_SIZE) -> list[Segment]:
  """A clip ``[T, H, W, C]`` at ``fps_in`` frames per second -> segments at 1 fps.

  Args:
    frames_THWC: the frames, each as ``image.patchify`` accepts (C = 1, 3 or 4; uint8 or
      float in [0, 1]).
    fps_in: frames per second of the clip, > 0.
    tokenizer: gives ``begin_video_id``, ``end_video_id`` and ``time_stamp_id(second)``
      (a ``text.Tokenizer``).
    image_size, patch_size: passed to ``image.patchify``.

  Returns:
    ``[text(begin_video), text(t=0s), image, text(t=1s), image, ..., text(end_video)]``:
    ``ceil(T / fps_in)`` frames, one per second (see ``sample_times``).

  Raises:
    ValueError: frames not ``[T, H, W, C]`` with T >= 1, a non-positive fps, or a clip
      longer than ``MAX_SECONDS`` seconds (there are no later time stamp tokens).
  """
  frames = np.asarray(frames_THWC)
  if frames.ndim != 4 or len(frames) == 0:
    raise ValueError(f'video frames shape {frames.shape} is not [T, H, W, C] with T >= 1; '
                     'stack the frames on a leading axis (grayscale as [T, H, W, 1])')
  if not (math.isfinite(fps_in) and fps_in > 0):
    raise ValueError(f'fps_in must be a positive number of frames per second, got {fps_in}')
  indices = sample_times(len(frames), fps_in)
  if len(indices) > MAX_SECONDS:
    raise ValueError(f'the video lasts {len(frames) / fps_in:.1f} s but time stamps stop at '
                     f'{MAX_SECONDS - 1} s; cut it into clips of at most {MAX_SECONDS} s')
  segments = [Segment.text([tokenizer.begin_video_id])]
  for second, index in enumerate(indices):
    segments.append(Segment.text([tokenizer.time_stamp_id(second)]))
    segments.append(Segment.image(image_lib.patchify(frames[index], image_size, patch_size)))
  segments.append(Segment.text([tokenizer.end_video_id]))
  return segments
