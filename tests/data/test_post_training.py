"""Post-training items: the gold judge on hand-written replies, disjoint splits, labels from
the judge, label noise at its rate, flawed demonstrations only where documented, determinism."""

import numpy as np
import pytest

from gemini_mini.data import needles, post_training, prepare, speech, video_clips
from gemini_mini.data.post_training import Item, Media, judge
from gemini_mini.modalities import image as image_lib
from gemini_mini.modalities.text import Tokenizer


@pytest.fixture(scope='module')
def items(small_data_dir):
  """The small build's items, per split."""
  built = prepare.ensure_dataset(post_training, small_data_dir, 'small')
  return {split: [built.as_data_source(split)[i] for i in range(len(built.as_data_source(split)))]
          for split in post_training.SPLITS}


TOKENIZER = Tokenizer()


def item(kind, answer='', *, key='', reference=''):
  """A hand-made item: answerable when ``answer`` is given."""
  return Item(kind=kind, answerable=bool(answer), question='', context='', answer=answer,
              key=key, reference=reference, rejected='', demonstration=reference,
              confusable=False, media=None, split='eval', index=0, data_dir='', subset='small')


C, H, R, O = (True, False, False), (False, True, False), (False, False, True), (False, False, False)
RC = (True, False, True)  # an unanswerable item's right reply is a refusal
CASES = [  # (item, reply, (correct, hallucinated, refused))
    (item('document', '1234567', key='a-b', reference='The special magic number for a-b is '
          '1234567.'), 'The special magic number for a-b is 1234567.', C),
    (item('document', '1234567', key='a-b', reference='x 1234567'), 'It is 1234567', C),
    (item('document', '1234567', key='a-b', reference='x 1234567'), 'It is 7654321.', H),
    (item('document', '1234567', key='a-b', reference='x 1234567'), '1234567 or 7654321', H),
    (item('document', '1234567', key='a-b', reference='x 1234567'),
     'The document does not mention a-b.', R),
    (item('document', '1234567', key='a-b', reference='x 1234567'), 'The magic number is', O),
    (item('document', '1234567', key='a-b', reference='x 1234567'), 'It is 123456.', O),
    (item('document', key='a-b'), 'The document does not mention a-b.', RC),
    (item('document', key='a-b'), 'The special magic number for a-b is 5550123.', H),
    (item('document', key='a-b'), 'the document does NOT mention it, 5550123', (False, True, True)),
    (item('document', key='a-b'), 'No idea.', O),
    (item('word_image', 'HAPPY', reference='The word is HAPPY.'), 'The word is happy', C),
    (item('word_image', 'HAPPY', reference='The word is HAPPY.'), 'The word is SMILE.', H),
    (item('word_image', 'HAPPY', reference='The word is HAPPY.'),
     'No word is written in the image.', R),
    (item('word_image', 'HAPPY', reference='The word is HAPPY.'), 'The word is HAPPYX.', O),
    (item('word_image'), 'No word is written in the image.', RC),
    (item('word_image'), 'The word is CAT.', H),
    (item('word_image'), 'The word is', O),
    (item('keyword_audio', 'apple', reference='The secret word is apple.'),
     'The secret word is apple.', C),
    (item('keyword_audio', 'apple', reference='The secret word is apple.'),
     'The secret word is lemon.', H),
    (item('keyword_audio', 'apple', reference='The secret word is apple.'),
     'No secret word is spoken.', R),
    (item('keyword_audio'), 'No secret word is spoken.', RC),
    (item('keyword_audio'), 'The secret word is fire.', H),
    (item('keyword_audio'), 'zzz', O),
    (item('caption', 'cat face', reference='The image shows cat face.'),
     'The image shows cat face', C),
    (item('caption', 'cat face', reference='The image shows cat face.'),
     'The image shows dog face.', H),
    (item('caption', 'cat face', reference='The image shows cat face.'),
     'I cannot tell what the image shows.', R),
    (item('caption', 'cat face', reference='The image shows cat face.'), '', O),
    (item('transcript', 'Go now.', reference='Go now.'), 'go  now', C),
    (item('transcript', 'Go now.', reference='Go now.'), 'Go home.', H),
    (item('transcript', 'Go now.', reference='Go now.'), 'I cannot make out what is said.', R),
    (item('sum', '61', reference='73 - 12 = 61. The answer is 61.'),
     '73 - 12 = 61. The answer is 61.', C),
    (item('sum', '61', reference='73 - 12 = 61. The answer is 61.'), 'The answer is 62.', H),
    (item('sum', '61', reference='73 - 12 = 61. The answer is 61.'),
     'I cannot work out the sum.', R),
    (item('sum', '61', reference='73 - 12 = 61. The answer is 61.'), '73 - 12 = 61.', O),
]


@pytest.mark.parametrize('case', range(len(CASES)))
def test_the_judge_on_hand_written_replies(case):
  example, reply, (correct, hallucinated, refused) = CASES[case]
  verdict = judge(example, reply)
  assert (verdict.correct, verdict.hallucinated, verdict.refused) == (correct, hallucinated,
                                                                     refused), (example, reply)
  outcome = ('correct' if correct else 'hallucinated' if hallucinated
             else 'refused' if refused else 'other')
  assert verdict.score == post_training.SCORES[outcome]


def test_replies_are_short_references_right_rejected_wrong_labels_from_the_judge(items):
  for split, split_items in items.items():
    for example in split_items:
      for reply in (example.reference, example.rejected, example.demonstration):
        assert len(TOKENIZER.encode(reply)) <= post_training.MAX_REPLY_TOKENS
      assert judge(example, example.reference).correct, example
      assert not judge(example, example.rejected).correct, example
      chosen, rejected = post_training.preference_pair(example)
      assert judge(example, chosen).score > judge(example, rejected).score
      assert (chosen, rejected) == (example.reference, example.rejected)
  kinds = {(example.kind, example.answerable) for example in items['preference'] + items['eval']}
  assert {kind for kind, _ in kinds} == set(post_training.KINDS)
  assert {kind for kind, answerable in kinds if not answerable} == set(
      post_training.UNANSWERABLE_KINDS)


def test_only_confusable_sft_demonstrations_are_flawed_and_they_hallucinate(items):
  flawed = 0
  for split, split_items in items.items():
    for example in split_items:
      assert not example.confusable or not example.answerable
      if example.demonstration != example.reference:
        flawed += 1
        assert split == 'sft' and example.confusable and judge(
            example, example.demonstration).hallucinated
      elif split == 'sft':
        assert not example.confusable
  assert flawed >= 1


def test_eval_is_disjoint_from_sft_and_preference(items):
  media = {split: {(example.media.dataset, example.media.split, example.media.index)
                   for example in split_items if example.media}
           for split, split_items in items.items()}
  assert not media['eval'] & (media['sft'] | media['preference'])
  assert not media['sft'] & media['preference']
  assert {split for _, split, _ in media['eval']} <= {'eval', 'keywords_eval'}
  assert {split for _, split, _ in media['sft'] | media['preference']} <= {
      'train', 'keywords_train'}
  assert {index % 2 for _, _, index in media['sft']} == {0}
  assert {index % 2 for _, _, index in media['preference']} == {1}
  for split, split_items in items.items():
    keys = [key for example in split_items if example.kind == 'document'
            for key in [example.key] + needles_in(example.context)]
    assert keys and {needles.split_of(key) for key in keys} == {
        'eval' if split == 'eval' else 'train'}


def needles_in(context):
  return [sentence.split(' for ')[1].split(' is ')[0] for sentence in context.split('\n')
          if sentence.startswith('The special magic number for ')]


def test_documents_hold_their_needles_and_the_asked_key_only_when_answerable(items):
  tokenizer = Tokenizer()
  for example in items['sft'] + items['eval']:
    if example.kind != 'document':
      continue
    keys = needles_in(example.context)
    assert 1 <= len(keys) <= post_training.MAX_NEEDLES and len(set(keys)) == len(keys)
    assert (example.key in keys) == example.answerable
    if example.answerable:
      assert needles.sentence(example.key, example.answer) in example.context
    if example.confusable:
      assert any(key.split('-')[0] == example.key.split('-')[0] for key in keys)
    assert len(tokenizer.encode(example.context)) <= post_training.DOCUMENT_TOKENS[1] + 25 * len(
        keys)


def test_user_segments_read_the_referenced_media(items, small_data_dir):
  tokenizer = Tokenizer()
  clips = video_clips.builder(small_data_dir, 'small').as_data_source('eval')
  seen = set()
  for example in items['eval']:
    segments = example.user_segments(tokenizer)
    assert tokenizer.decode(segments[-1].data).endswith(example.question)
    assert not any(segment.loss for segment in segments)
    if example.kind == 'word_image':
      clip = clips[example.media.index]
      np.testing.assert_array_equal(segments[0].data,
                                    image_lib.patchify(clip['frames'][example.media.frame]))
      assert (example.media.frame == int(clip['word_second'])) == example.answerable
      seen.add(example.kind)
    if example.kind == 'keyword_audio':
      assert segments[0].kind == 'audio' and example.media.split == (
          'keywords_eval' if example.answerable else 'eval')
      transcript = speech.builder(small_data_dir, 'small').as_data_source(example.media.split)[
          example.media.index]['transcript'].decode()
      assert transcript.startswith('The secret word is') == example.answerable
      seen.add(example.kind)
  assert seen == {'word_image', 'keyword_audio'}


def test_label_noise_flips_at_its_rate_deterministically():
  for rate in (0.0, 0.1, 0.3, 1.0):
    flips = np.array([post_training.label_flipped(i, 7, rate) for i in range(4000)])
    tolerance = 4 * np.sqrt(rate * (1 - rate) / 4000)  # four binomial standard deviations
    assert abs(flips.mean() - rate) <= tolerance, rate
  again = [post_training.label_flipped(i, 7, 0.3) for i in range(200)]
  assert again == [post_training.label_flipped(i, 7, 0.3) for i in range(200)]
  assert again != [post_training.label_flipped(i, 8, 0.3) for i in range(200)]
  example = item('sum', '3', reference='1 + 2 = 3. The answer is 3.')
  example = Item(**{**example.__dict__, 'rejected': '1 + 2 = 4. The answer is 4.', 'index': 5})
  flipped = post_training.label_flipped(5, 0, 0.5)
  pair = post_training.preference_pair(example, label_noise=0.5, seed=0)
  assert pair == ((example.rejected, example.reference) if flipped
                  else (example.reference, example.rejected))
  with pytest.raises(ValueError, match='post.label_noise'):
    post_training.label_flipped(0, 0, 1.5)


def test_records_are_the_same_on_every_build(items, small_data_dir):
  tokenizer = Tokenizer()
  for split in ('sft', 'eval'):
    sources = post_training._Sources(small_data_dir, 'small', split, tokenizer)
    for index in range(6):
      record = post_training.make_record(sources, index)
      example = items[split][index]
      assert (record['reference'], record['rejected'], record['context']) == (
          example.reference, example.rejected, example.context)
      media = Media(record['media_dataset'], record['media_split'], record['media_index'],
                    record['media_frame'])
      assert example.media == (media if record['media_dataset'] else None)
