"""video_segments: one frame a second, each after its time stamp, inside video brackets."""

import numpy as np
import pytest

from gemini_mini.modalities import text as text_lib
from gemini_mini.modalities import video as video_lib

TOKENIZER = text_lib.Tokenizer()
IDS = TOKENIZER.special_ids  # by name, independent of time_stamp_id


def numbered_frames(count, size=8):
  """Frame k (< 64) is a flat grey of level 4 k, so a patch tells which frame it came from."""
  return np.repeat((np.arange(count) % 64 * 4).astype(np.uint8), size * size * 3).reshape(
      count, size, size, 3)


def frame_of(segment):
  levels = np.unique(np.round((segment.data + 1) * 127.5))
  assert len(levels) == 1
  return int(levels[0]) // 4


@pytest.mark.parametrize('count, fps, frames', [
    (7, 2.0, [0, 2, 4, 6]),     # 3.5 s: seconds 0..3
    (2, 0.5, [0, 0, 1, 1]),     # a frame every 2 s: each shown for two seconds
    (60, 29.97, [0, 29, 59]),   # 2.002 s: seconds 0..2
    (1, 30.0, [0]),
])
def test_segment_order_time_stamps_and_frames(count, fps, frames):
  segments = video_lib.video_segments(numbered_frames(count), fps, TOKENIZER)
  assert [s.kind for s in segments] == ['text'] + ['text', 'image'] * len(frames) + ['text']
  assert segments[0].data.tolist() == [IDS['<begin_video>']]
  assert segments[-1].data.tolist() == [IDS['<end_video>']]
  for second, frame in enumerate(frames):
    stamp, image = segments[1 + 2 * second], segments[2 + 2 * second]
    assert stamp.data.tolist() == [IDS[f'<t={second}s>']]
    assert image.data.shape == (16, 192)
    assert frame_of(image) == frame


def test_too_long_and_bad_inputs_rejected():
  with pytest.raises(ValueError, match='time stamps stop at 255 s; cut it'):
    video_lib.video_segments(numbered_frames(257, size=1), 1.0, TOKENIZER)
  assert len(video_lib.video_segments(numbered_frames(256, size=1), 1.0, TOKENIZER)) == 514
  with pytest.raises(ValueError, match=r'\(8, 8, 3\) is not \[T, H, W, C\]'):
    video_lib.video_segments(numbered_frames(1)[0], 1.0, TOKENIZER)
  with pytest.raises(ValueError, match='fps_in must be a positive'):
    video_lib.video_segments(numbered_frames(3), 0.0, TOKENIZER)
