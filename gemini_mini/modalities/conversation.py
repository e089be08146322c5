"""The conversation format of post-training: one user turn, then one model turn.

    <bos><user>{user segments: text, image, audio}<end_of_turn><model>{reply}<end_of_turn>

The data (``data.post_training``, the ``demonstrations`` task), generation (``infer.generate``
is given ``prompt(...)`` and stops at ``stop_ids``) and evaluation build conversations here
only, so the three can never disagree on the layout. Only the reply is scored: every
prompt segment is made with ``loss=False`` (an image's or clip's brackets too), so after
``interleave.flatten`` and packing the loss mask covers the reply's tokens and its closing
``<end_of_turn>``, predicted from ``<model>`` on, and nothing of the user turn, which is
context the model is given, not text it should learn to write.
"""

import dataclasses
from typing import Sequence

import numpy as np

from gemini_mini.modalities.segments import Segment
from gemini_mini.modalities.text import Tokenizer


def user_text(string: str, tokenizer: Tokenizer) -> Segment:
  """``string`` as an unscored text segment of a user turn."""
  return Segment.text(tokenizer.encode(string), loss=False)


def prompt(user: Sequence[Segment], tokenizer: Tokenizer) -> list[Segment]:
  """``<bos><user>`` ``user`` ``<end_of_turn><model>``: everything before the reply, no
  position scored (``user``'s segments are copied with ``loss=False``)."""
  if not user:
    raise ValueError('a user turn needs at least one segment; pass user_text(question, '
                     'tokenizer) and any images or audio')
  return ([Segment.text([tokenizer.bos_id, tokenizer.user_id], loss=False)]
          + [dataclasses.replace(segment, loss=False) for segment in user]
          + [Segment.text([tokenizer.end_of_turn_id, tokenizer.model_id], loss=False)])


def reply(text: str, tokenizer: Tokenizer) -> Segment:
  """The model's turn: ``text``'s ids, then ``<end_of_turn>``, all scored."""
  return Segment.text(np.append(tokenizer.encode(text), tokenizer.end_of_turn_id))


def conversation(user: Sequence[Segment], reply_text: str, tokenizer: Tokenizer) -> list[Segment]:
  """``prompt(user) + [reply(reply_text)]``: one training example."""
  return prompt(user, tokenizer) + [reply(reply_text, tokenizer)]


def stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
  """The ids that end a generated reply: ``(<end_of_turn>,)``."""
  return (tokenizer.end_of_turn_id,)
