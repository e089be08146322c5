"""``Segment``: one run of a single modality inside an example, before interleaving.

An example is a list of segments in reading order, e.g. a caption task is
``[Segment.text(bos + 'A photo of'), Segment.image(patches_PI), Segment.text('a cat' + eos)]``.
Segments carry content only: the interleaver (``interleave.flatten``) writes every image as
``<begin_image>`` + one ``<image>`` placeholder per patch + ``<end_image>`` and every audio
clip as ``<begin_audio>`` + one ``<audio>`` placeholder per frame + ``<end_audio>``, so
brackets are never forgotten or doubled. Other special tokens (bos, eos, ``<begin_video>``,
time stamps) are ordinary text segments holding their ids.
"""

import dataclasses
from typing import Literal

import numpy as np

Kind = Literal['text', 'image', 'audio']


@dataclasses.dataclass(frozen=True, eq=False)
class Segment:
  """One modality run. Use the constructors ``text``, ``image`` and ``audio``.

  Attributes:
    kind: 'text', 'image' or 'audio'.
    data: text: token ids ``[L] int32``; image: patches ``[P, I] float32`` (``patchify``);
      audio: stacked log-mel frames ``[A, I] float32`` (``stack_frames``). Never empty.
    loss: whether training predicts these positions: a text segment's tokens, an image's or
      clip's brackets (its placeholders never are). False for context that cannot or should
      not be predicted (the first copy of a ``repeat`` span; a conversation's user turn,
      ``modalities.conversation``), so it adds nothing to the gradient.
  """

  kind: Kind
  data: np.ndarray
  loss: bool = True

  def __post_init__(self):
    data = self.data
    if self.kind == 'text':
      if data.ndim != 1 or not np.issubdtype(data.dtype, np.integer):
        raise ValueError(f'a text segment needs token ids of shape [L] and an integer dtype, '
                         f'got shape {data.shape} {data.dtype}; pass tokenizer.encode(...) ids')
    elif self.kind in ('image', 'audio'):
      if data.ndim != 2 or not np.issubdtype(data.dtype, np.floating):
        what = 'patches [P, I]' if self.kind == 'image' else 'frames [A, I]'
        raise ValueError(f'an {self.kind} segment needs float {what}, got shape {data.shape} '
                         f'{data.dtype}; build it with '
                         f'{"image.patchify" if self.kind == "image" else "audio.stack_frames"}')
    else:
      raise ValueError(f"segment kind {self.kind!r} is not 'text', 'image' or 'audio'")
    if len(data) == 0:
      raise ValueError(f'an empty {self.kind} segment; drop it from the example')

  @classmethod
  def text(cls, ids, *, loss: bool = True) -> 'Segment':
    """Token ids ``[L]`` (special ids included as they are); ``loss=False`` keeps them out
    of the training loss."""
    return cls('text', np.asarray(ids, np.int32), loss)

  @classmethod
  def image(cls, patches_PI, *, loss: bool = True) -> 'Segment':
    """One image as patches ``[P, I]`` in row-major patch order; ``loss=False`` keeps its
    brackets out of the training loss."""
    return cls('image', np.asarray(patches_PI, np.float32), loss)

  @classmethod
  def audio(cls, frames_AI, *, loss: bool = True) -> 'Segment':
    """One audio clip as stacked log-mel frames ``[A, I]`` in time order; ``loss=False``
    keeps its brackets out of the training loss."""
    return cls('audio', np.asarray(frames_AI, np.float32), loss)

  def __repr__(self):
    unscored = '' if self.loss else ', loss=False'
    return f'Segment.{self.kind}({"x".join(map(str, self.data.shape))}{unscored})'
