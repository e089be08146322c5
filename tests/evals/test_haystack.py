"""Haystack: each modality's needle sits at its depth, exactly once, with eval keys, emoji
and voices; scoring on hand-made generations; teacher-forced answer hits against one
unpadded forward per item; the suite end to end on the tiny checkpoint."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemini_mini import config as config_lib
from gemini_mini.data import needles, speech, video_clips
from gemini_mini.evals import common, haystack
from gemini_mini.infer.generate import Generation
from gemini_mini.infer.load import Loaded, load
from gemini_mini.modalities import audio as audio_lib
from gemini_mini.modalities import image as image_lib
from gemini_mini.modalities import interleave
from gemini_mini.modalities.text import Tokenizer

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
NEEDLE = re.compile(r'\nThe special magic number for ([\w-]+) is (\d+)\.\n')


@pytest.fixture(scope='module')
def tokenizer():
  return Tokenizer()


@pytest.fixture(scope='module')
def eval_data(small_data_dir, tokenizer):
  return haystack.load_haystacks(small_data_dir, 'small', tokenizer)


def test_text_needle_sits_at_its_depth_once_with_an_eval_key(eval_data, tokenizer):
  prose_ids = eval_data.prose_ids
  for seed in range(3):
    items = haystack.text_items(prose_ids, 300, DEPTHS, np.random.default_rng(seed), tokenizer)
    assert [item.record['depth'] for item in items] == list(DEPTHS)
    passages = set()
    for item in items:
      ids = item.prompt[0].data
      assert len(item.prompt) == 1 and len(ids) == 300 and ids[0] == tokenizer.bos_id
      text = tokenizer.decode(ids)
      found = NEEDLE.findall(text)
      key, value = item.record['key'], item.record['value']
      assert found == [(key, value)] and item.reference == value
      assert needles.split_of(key) == 'eval'
      assert text.endswith(needles.question(key))
      needle = needles.needle_ids(key, value, tokenizer)
      starts = [i for i in range(len(ids) - len(needle) + 1)
                if np.array_equal(ids[i:i + len(needle)], needle)]
      assert starts == [item.record['needle_position']]
      prose = len(ids) - len(needle) - len(tokenizer.encode(needles.question(key))) - 1
      assert abs((starts[0] - 1) / prose - item.record['depth']) <= len(needle) / prose
      passages.add(tuple(np.delete(ids, range(starts[0], starts[0] + len(needle)))[:40]))
    assert len(passages) == 1  # one passage for all depths of a trial


def test_video_word_frame_is_at_its_second_among_eval_emoji(eval_data, tokenizer):
  clips = eval_data.clips
  eval_emoji = set(video_clips.emoji_of('eval'))
  for seconds in (4, 9):
    items = haystack.video_items(clips, seconds, DEPTHS, np.random.default_rng(seconds),
                                 tokenizer)
    for item in items:
      second, word = item.record['second'], item.record['word']
      assert second == round(item.record['depth'] * (seconds - 1)) and word == item.reference
      assert set(item.record['emoji']) <= eval_emoji
      flat = interleave.flatten(item.prompt, tokenizer)
      frames = flat.patches.reshape(seconds, image_lib.PATCHES_PER_IMAGE, -1)
      left, top, right, bottom = video_clips.WORD_BOX
      # The word's box replaces whatever the frame showed there: only its second has it.
      box = video_clips.render_word_frame(word)[top:bottom, left:right] / 255
      shown = [np.allclose(image_lib.unpatchify(patches)[top:bottom, left:right], box,
                           atol=1e-3) for patches in frames]
      assert np.flatnonzero(shown).tolist() == [second]
      assert tokenizer.decode(item.answer.data) == ' ' + word
      assert tokenizer.time_stamp_id(second) in item.answer.data


def test_audio_keyword_is_at_its_time_in_eval_voices(eval_data, tokenizer):
  sentences, keywords = eval_data.sentences, eval_data.keywords
  eval_voices = set(speech.voices('eval'))
  for seconds in (4, 10):
    items = haystack.audio_items(sentences, keywords, seconds, DEPTHS,
                                 np.random.default_rng(seconds), tokenizer)
    for item in items:
      record = item.record
      assert record['voice'] in eval_voices and record['word'] == item.reference
      assert record['seconds'] == pytest.approx(seconds, abs=0.04)
      keyword = next(samples for word, samples, voice in keywords
                     if (word, voice) == (record['word'], record['voice']))
      keyword_s = len(keyword) / speech.SAMPLE_RATE
      assert abs(record['keyword_start_s'] / (seconds - keyword_s) - record['depth']) <= (
          keyword_s / seconds)
      frames_AD = interleave.flatten(item.prompt, tokenizer).audio
      start = int(round(record['keyword_start_s'] / haystack.SECONDS_PER_FRAME))
      alone_AD = audio_lib.stack_frames(audio_lib.log_mel(keyword / 32768))
      np.testing.assert_allclose(frames_AD[start:start + len(alone_AD) - 1], alone_AD[:-1],
                                 atol=1e-5)


def test_scoring_on_hand_made_generations(tokenizer):
  def generation(text, *extra):
    return Generation(tokens=np.array([*tokenizer.encode(text), *extra], np.int32), text=text)

  cases = [(' 4182390', '4182390', True), ('4182390.', '4182390', True),
           (' 4182390 and more', '4182390', True), (' 418239', '4182390', False),
           (' 41823901', '4182390', False), ('', '4182390', False),
           (' the 4182390', '4182390', False), (' Apple', 'APPLE', True),
           (' apples', 'apple', False)]
  for text, reference, correct in cases:
    item = haystack.Item([], None, reference, {'depth': 0.5})
    assert haystack._score('text', item, generation(text), tokenizer)['correct'] == correct, text
  item = haystack.Item([], None, 'APPLE', {'depth': 0.5, 'second': 3})
  right = haystack._score('video', item, generation(' APPLE', tokenizer.time_stamp_id(3)),
                          tokenizer)
  late = haystack._score('video', item, generation(' APPLE', tokenizer.time_stamp_id(4)),
                         tokenizer)
  wrong = haystack._score('video', item, generation(' PEAR'), tokenizer)
  assert (right['correct'], right['time_stamp'], right['time_stamp_correct']) == (True, 3, True)
  assert (late['correct'], late['time_stamp'], late['time_stamp_correct']) == (True, 4, False)
  assert (wrong['correct'], wrong['time_stamp'], wrong['time_stamp_correct']) == (
      False, None, False)


def test_piece_accuracy_on_hand_made_hits():
  figures = haystack.piece_accuracy([[True, False, True], [True, True], []])
  assert figures['answer_piece_accuracy'] == pytest.approx(4 / 5)
  assert figures['answer_piece_accuracy_by_index'] == [1.0, 0.5, 1.0]
  assert haystack.piece_accuracy([]) == {'answer_piece_accuracy': None,
                                         'answer_piece_accuracy_by_index': []}


def test_answer_hits_match_one_unpadded_forward_per_item(tiny_run_dir, eval_data, tokenizer):
  """Items of every modality and of different lengths share padded rows in ``answer_hits``;
  the reference runs each item alone, unpadded, and reads the answer piece by piece."""
  loaded = load(tiny_run_dir, ['eval.batch_size=4'])
  rng = np.random.default_rng(3)
  items = (haystack.text_items(eval_data.prose_ids, 100, [0.5], rng, tokenizer)
           + haystack.text_items(eval_data.prose_ids, 160, [0.0, 1.0], rng, tokenizer)
           + haystack.video_items(eval_data.clips, 4, [0.5], rng, tokenizer)
           + haystack.audio_items(eval_data.sentences, eval_data.keywords, 2, [0.5], rng,
                                  tokenizer))
  hits = common.answer_hits(loaded, [(item.prompt, item.answer) for item in items], tokenizer)
  model = loaded.config.model
  for item, item_hits in zip(items, hits):
    flat = interleave.flatten([*item.prompt, item.answer], tokenizer)
    batch = interleave.pack_rows([[flat]], seq_len=len(flat.tokens),
                                 num_patches=max(1, len(flat.patches)),
                                 num_audio_frames=max(1, len(flat.audio)),
                                 patch_dim=model.patch_dim, audio_dim=model.audio_dim)
    logits_TV = np.asarray(loaded.decoder(jax_batch(batch))[0][0])
    prompt_length = len(flat.tokens) - len(item.answer.data)
    expected = [int(np.argmax(logits_TV[prompt_length + i - 1])) == int(piece)
                for i, piece in enumerate(item.answer.data)]
    assert item_hits.tolist() == expected
  # Not vacuous: answers of the model's own greedy pieces (KV-cache decoding) are hit
  # everywhere, which an answer read one position off would not be.
  generations = common.generate_all(loaded, [item.prompt for item in items], tokenizer,
                                    max_new_tokens=4, stop_ids=())
  own = [(item.prompt, type(item.answer).text(generation.tokens))
         for item, generation in zip(items, generations)]
  assert all(item_hits.all() for item_hits in common.answer_hits(loaded, own, tokenizer))


def jax_batch(batch):
  return jax.tree.map(jnp.asarray, batch)


def test_a_model_that_gives_the_answers_scores_every_cell_1(small_data_dir, tmp_path,
                                                          monkeypatch):
  """Items, generations and scores stay aligned: answers as training writes them score 1."""
  monkeypatch.setattr(haystack, 'generate', lambda loaded, items, tokenizer: [
      Generation(tokens=item.answer.data, text=tokenizer.decode(item.answer.data))
      for item in items])
  monkeypatch.setattr(common, 'answer_hits', lambda loaded, examples, tokenizer: [
      np.ones(len(answer.data), bool) for _, answer in examples])
  config = config_lib.load('configs/test.yaml', [
      f'data.dir={small_data_dir}', 'eval.context_lengths=[128,256]', 'eval.trials=2',
      'eval.video_seconds=[4,8]', 'eval.audio_seconds=[3]'])
  figures = haystack.run(Loaded(None, config, 0), tmp_path)
  for modality in haystack.MODALITIES:
    assert figures[modality]['recall'] == 1.0
    assert all(recall == 1.0 for cell in figures[modality]['cells'].values()
               for recall in cell.values())
  assert figures['video']['time_stamp_accuracy'] == 1.0
  assert figures['text']['answer_piece_accuracy'] == 1.0
  assert figures['video']['within_training_row'] == {'4': True, '8': False}  # 128 patches


def test_suite_end_to_end_on_the_tiny_checkpoint(tiny_run_dir, tmp_path, capsys, tokenizer):
  loaded = load(tiny_run_dir, ['eval.context_lengths=[128,1024]', 'eval.trials=1',
                               'eval.video_seconds=[4,300]', 'eval.audio_seconds=[2]',
                               'eval.depths=[0.0,0.5,1.0]'])
  figures = haystack.run(loaded, tmp_path)
  out = capsys.readouterr().out
  assert 'text at 1024 positions skipped (null)' in out and 'model.max_length=512' in out
  assert 'video at 300 seconds skipped (null)' in out
  result = json.loads((tmp_path / 'haystack.json').read_text())
  assert result['figures'] == figures and result['checkpoint_step'] == 2
  for modality, lengths in (('text', ['128', '1024']), ('video', ['4', '300']),
                            ('audio', ['2'])):
    assert (tmp_path / f'haystack_{modality}.png').stat().st_size > 0
    cells = figures[modality]['cells']
    assert list(cells) == lengths and 0 <= figures[modality]['recall'] <= 1
    assert set(cells[lengths[0]]) == {'0.0', '0.5', '1.0'}
    assert figures[modality]['within_training_row'][lengths[0]] is True
  assert figures['text']['cells']['1024'] is None and figures['video']['cells']['300'] is None
  assert 0 <= figures['video']['time_stamp_accuracy'] <= 1
  items = result['items']
  assert len(items) == 3 * 3
  for item in items:
    reference = item.get('value') or item['word']
    assert item['correct'] == (haystack.answer_word(item['generation'])
                               == reference.lower())
  for item in items:
    assert len(item['answer_hits']) == len(tokenizer.encode(' ' + (
        item.get('value') or item['word']))) + ('second' in item) + 1  # <t=Ns>, <eos>
  for modality in haystack.MODALITIES:
    by_index = figures[modality]['answer_piece_accuracy_by_index']
    assert 0 <= figures[modality]['answer_piece_accuracy'] <= 1 and len(by_index) >= 2
  assert all(needles.split_of(item['key']) == 'eval' for item in items if 'key' in item)
  assert all(item['voice'] in speech.voices('eval') for item in items if 'voice' in item)
