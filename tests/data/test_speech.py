"""The speech builder: expected counts, train/eval disjoint in voices and sentences, keyword
utterances of every word by voices of their split, 16 kHz int16 audio of a plausible
length, audio features, clear errors and counted skips."""

import numpy as np
import pytest

from gemini_mini.data import prepare, sources, speech, video_clips
from gemini_mini.modalities import audio as audio_lib


def _read(builder):
  return {split: [{key: value.decode() if isinstance(value, bytes) else value
                   for key, value in builder.as_data_source(split)[i].items()}
                  for i in range(builder.info.splits[split].num_examples)]
          for split in speech.SPLITS + speech.KEYWORD_SPLITS}


@pytest.fixture(scope='module')
def small(tmp_path_factory):
  """The small config, built once for this module: ``(examples by split, metadata)``."""
  builder = prepare.ensure_dataset(speech, str(tmp_path_factory.mktemp('speech')), 'small')
  return _read(builder), builder.info.metadata


def test_counts_match_the_config(small):
  examples, metadata = small
  assert metadata['sample_rate'] == speech.SAMPLE_RATE
  chosen = {split: [sentence_id for sentence_id, _ in sentences]
            for split, sentences in speech.select('small').items()}
  chosen.update({split: [sentence_id for (sentence_id, _), _ in speech.keywords('small', split)]
                 for split in speech.KEYWORD_SPLITS})
  for split in speech.SPLITS + speech.KEYWORD_SPLITS:
    expected = speech.NUM_EXAMPLES['small'][split]
    assert metadata[split]['requested'] == expected
    assert metadata[split]['skipped'] == 0 and metadata[split]['skipped_ids'] == []
    assert metadata[split]['num_examples'] == len(examples[split]) == expected
    assert sorted(example['sentence_id'] for example in examples[split]) == sorted(chosen[split])
    seconds = sum(len(example['audio']) for example in examples[split]) / speech.SAMPLE_RATE
    assert metadata[split]['audio_seconds'] == pytest.approx(seconds, abs=0.1)


def test_splits_are_disjoint_in_voices_and_sentences(small):
  examples, metadata = small
  assert not set(speech.voices('train')) & set(speech.voices('eval'))
  heard = {split: {example['voice'] for example in examples[split]} for split in speech.SPLITS}
  texts = {split: {example['transcript'].lower() for example in examples[split]}
           for split in speech.SPLITS}
  ids = {split: {example['sentence_id'] for example in examples[split]} for split in speech.SPLITS}
  assert not heard['train'] & heard['eval']
  assert not texts['train'] & texts['eval'] and not ids['train'] & ids['eval']
  for split in speech.SPLITS:
    assert heard[split] <= set(speech.voices(split)) and len(heard[split]) > 5
    assert sorted(heard[split]) == metadata[split]['voices']
    assert all(speech.split_of(text) == split for text in texts[split])
    assert len(ids[split]) == len(examples[split])  # one example per sentence
  assert any(voice.startswith('en-029+') for voice in heard['eval'])  # the held-out accent


def test_keyword_splits_say_known_words_in_voices_of_their_split(small):
  examples, _ = small
  heard = {}
  for split in speech.KEYWORD_SPLITS:
    voice_split = split.removeprefix('keywords_')
    heard[split] = {example['voice'] for example in examples[split]}
    assert heard[split] <= set(speech.voices(voice_split)) and len(heard[split]) > 5
    for example in examples[split]:
      word = speech.keyword_of(example['transcript'])
      assert example['transcript'] == speech.KEYWORD_TEXT.format(word=word)
      assert word.upper() in video_clips.WORDS
      assert example['sentence_id'] == f'keyword/{word.upper()}/{example["voice"]}'
      assert 1.0 <= len(example['audio']) / speech.SAMPLE_RATE <= 3.0, example['sentence_id']
      assert np.abs(example['audio'].astype(np.int32)).max() > 1000
  assert not heard['keywords_train'] & heard['keywords_eval']


def test_full_keyword_splits_hold_every_word_in_several_voices():
  for split, count in speech.KEYWORD_VOICES.items():
    full = speech.keywords('full', split)
    assert len(full) == speech.NUM_EXAMPLES['full'][split] == count * len(video_clips.WORDS)
    by_word = {}
    for (sentence_id, text), (voice, _, _) in full:
      by_word.setdefault(speech.keyword_of(text), set()).add(voice)
    assert sorted(by_word) == sorted(word.lower() for word in video_clips.WORDS)
    assert all(len(voices) == count for voices in by_word.values())
    assert len({sentence_id for (sentence_id, _), _ in full}) == len(full)
    assert speech.keywords('small', split) == full[:speech.NUM_EXAMPLES['small'][split]]
  for bad in ('The secret word is.', 'the secret word is apple.', 'Eat the steak.'):
    with pytest.raises(ValueError, match='not a keyword utterance'):
      speech.keyword_of(bad)


def test_audio_is_16khz_int16_of_a_plausible_length(small):
  examples, _ = small
  for example in examples['train'] + examples['eval']:
    samples, words = example['audio'], example['transcript'].split()
    assert samples.dtype == np.int16 and samples.ndim == 1
    assert speech.MIN_WORDS <= len(words) <= speech.MAX_WORDS
    assert 0.15 <= len(samples) / speech.SAMPLE_RATE / len(words) <= 1.5, example['sentence_id']
    assert np.abs(samples.astype(np.int32)).max() > 1000  # speech, not silence
    assert speech.SPEED_RANGE[0] <= example['speed'] <= speech.SPEED_RANGE[1]
    assert speech.PITCH_RANGE[0] <= example['pitch'] <= speech.PITCH_RANGE[1]
    assert speech.reading_of(example['transcript'], speech.split_of(example['transcript'])) == (
        example['voice'], example['speed'], example['pitch'])


def test_examples_become_audio_features(small):
  examples, _ = small
  samples = examples['eval'][0]['audio']
  features_AD = audio_lib.stack_frames(audio_lib.log_mel(samples / 32768))
  assert features_AD.shape == (-(-len(samples) // (audio_lib.HOP * audio_lib.STACK)), 320)
  assert features_AD.dtype == np.float32 and np.isfinite(features_AD).all()
  assert features_AD.std() > 0.1


def test_sentences_are_real_and_speakable():
  assert speech.is_speakable('Eat the steak.')
  for rejected in ('Too short.', 'Not ended', 'Quoted "words" here.', 'It costs 5 dollars.',
                   '-- Mark Twain, said so.', 'lower case start here.'):
    assert not speech.is_speakable(rejected), rejected
  small = speech.select('small')
  full = speech.select('full')
  for split in speech.SPLITS:  # small's sentences are the first of full's
    assert small[split] == full[split][:len(small[split])]


def test_missing_tool_names_the_apt_line(monkeypatch, tmp_path, capsys):
  monkeypatch.setenv('PATH', str(tmp_path))  # no espeak-ng, no sox
  with pytest.raises(sources.MissingSourceError, match='apt-get install -y espeak-ng sox$'):
    speech.check_installed()
  monkeypatch.setattr(speech.os, 'geteuid', lambda: 1000)  # never apt-get from a test
  assert prepare.main(['--subset', 'small', '--data-dir', str(tmp_path / 'data')]) == 1
  assert capsys.readouterr().err.strip().endswith('sudo apt-get install -y espeak-ng sox')


def test_failed_synthesis_is_a_counted_skip(monkeypatch, tmp_path):
  with pytest.raises(speech.SynthesisError, match='nosuchvoice'):
    speech.synthesize('Hello there world.', 'nosuchvoice', 175, 50)
  failing_id, failing_text = speech.select('small')['eval'][0]

  def fake_synthesize(text, voice, speed, pitch):
    del voice, speed, pitch
    if text == failing_text:
      raise speech.SynthesisError(f'espeak-ng failed on {text!r}')
    return np.ones(1600 * len(text.split()), np.int16)

  monkeypatch.setattr(speech, 'synthesize', fake_synthesize)
  builder = prepare.ensure_dataset(speech, str(tmp_path), 'small')
  stats = builder.info.metadata['eval']
  assert stats['skipped'] == 1 and stats['skipped_ids'] == [failing_id]
  assert stats['num_examples'] == builder.info.splits['eval'].num_examples == stats['requested'] - 1
  assert builder.info.metadata['train']['skipped'] == 0
