"""log-mel against a slow direct-DFT reference; tones, stacking, wav reading, bad inputs."""

import math
import wave

import numpy as np
import pytest

from gemini_mini.modalities import audio as audio_lib

RNG = np.random.default_rng(0)


def slow_mel_filters():
  """Filter m: a triangle in Hz over the HTK-mel-spaced edges m, m + 1, m + 2, peak 1."""
  top = 2595 * math.log10(1 + 8000 / 700)
  edges = [700 * (10 ** (top * i / 81 / 2595) - 1) for i in range(82)]
  filters = np.zeros((80, 257))
  for m in range(80):
    low, centre, high = edges[m], edges[m + 1], edges[m + 2]
    for k in range(257):
      f = k * 16000 / 512
      if low <= f <= centre:
        filters[m, k] = (f - low) / (centre - low)
      elif centre < f <= high:
        filters[m, k] = (high - f) / (high - centre)
  return filters, edges


def slow_log_mel(x):
  """Frame a starts at sample 160 a (zeros past the end); direct DFT sum of each frame."""
  filters, _ = slow_mel_filters()
  n = np.arange(400)
  hann = 0.5 - 0.5 * np.cos(2 * np.pi * n / 400)
  k = np.arange(257)
  out = []
  for a in range(math.ceil(len(x) / 160)):
    frame = np.zeros(400)
    chunk = x[160 * a:160 * a + 400]
    frame[:len(chunk)] = chunk
    # X[k] = sum_n frame[n] hann[n] exp(-2 pi i k n / 512): the 512-point DFT of the frame.
    spectrum = (frame * hann * np.exp(-2j * np.pi * np.outer(k, n) / 512)).sum(axis=1)
    mel = filters @ np.abs(spectrum) ** 2
    out.append((np.log10(np.maximum(mel, 1e-10)) + 4) / 4)
  return np.array(out)


def test_filters_match_the_formula_and_none_is_empty():
  filters, _ = slow_mel_filters()
  np.testing.assert_allclose(audio_lib.mel_filters(), filters, atol=1e-12)
  assert (filters.sum(axis=1) > 0).all()


@pytest.mark.parametrize('num_samples', [400, 1234, 4000])
def test_log_mel_matches_direct_dft(num_samples):
  x = RNG.normal(scale=0.1, size=num_samples)
  x[:800] *= 1e-6  # quiet frames: mel powers near the 1e-10 floor
  mel = audio_lib.log_mel(x.astype(np.float32))
  assert mel.shape == (math.ceil(num_samples / 160), 80) and mel.dtype == np.float32
  # float32 output of values in about [-1.5, 2] against a float64 reference.
  np.testing.assert_allclose(mel, slow_log_mel(x.astype(np.float32)), atol=1e-5)


@pytest.mark.parametrize('mel_bin', [12, 30, 50, 75])
def test_pure_tone_lands_in_its_bin(mel_bin):
  _, edges = slow_mel_filters()
  t = np.arange(16000) / 16000
  tone = 0.5 * np.sin(2 * np.pi * edges[mel_bin + 1] * t)  # at the filter's centre
  mel = audio_lib.log_mel(tone)
  assert mel.shape == (100, 80)
  np.testing.assert_array_equal(mel[:97].argmax(axis=1), mel_bin)  # frames within the tone


def test_silence_is_the_floor():
  np.testing.assert_array_equal(audio_lib.log_mel(np.zeros(480)), audio_lib.SILENCE)
  assert audio_lib.SILENCE == -1.5


def test_stack_frames_shapes_and_padding():
  mel = np.arange(10 * 80, dtype=np.float32).reshape(10, 80)
  stacked = audio_lib.stack_frames(mel)
  assert stacked.shape == (3, 320) and stacked.dtype == np.float32
  for item in range(2):
    np.testing.assert_array_equal(stacked[item], np.concatenate(mel[4 * item:4 * item + 4]))
  np.testing.assert_array_equal(stacked[2, :160], np.concatenate(mel[8:10]))
  np.testing.assert_array_equal(stacked[2, 160:], -1.5)
  assert audio_lib.stack_frames(mel[:8]).shape == (2, 320)
  assert audio_lib.stack_frames(audio_lib.log_mel(np.zeros(16000))).shape == (25, 320)  # 40 ms


def write_wav(path, samples, *, rate=16000, channels=1, width=2):
  with wave.open(str(path), 'wb') as writer:
    writer.setnchannels(channels)
    writer.setsampwidth(width)
    writer.setframerate(rate)
    writer.writeframes(samples.tobytes())


def test_read_wav_round_trip(tmp_path):
  samples = RNG.integers(-32768, 32768, 1000).astype('<i2')
  write_wav(tmp_path / 'a.wav', samples, rate=22050)
  waveform, rate = audio_lib.read_wav(tmp_path / 'a.wav')
  assert rate == 22050 and waveform.dtype == np.float32
  np.testing.assert_array_equal(waveform, samples / 32768)


def test_read_wav_rejects_bad_files(tmp_path):
  write_wav(tmp_path / 'stereo.wav', np.zeros(20, '<i2'), channels=2)
  write_wav(tmp_path / 'eight.wav', np.zeros(20, np.uint8), width=1)
  (tmp_path / 'junk.wav').write_bytes(b'not a wav file at all')
  write_wav(tmp_path / 'cut.wav', np.zeros(1000, '<i2'))
  (tmp_path / 'cut.wav').write_bytes((tmp_path / 'cut.wav').read_bytes()[:500])
  for name, match in (('stereo', '2 channel'), ('eight', '8-bit'), ('junk', 'not a readable'),
                      ('cut', 'truncated')):
    with pytest.raises(ValueError, match=f'{name}.wav: .*{match}'):
      audio_lib.read_wav(tmp_path / f'{name}.wav')


@pytest.mark.parametrize('waveform, rate, match', [
    (np.zeros(100), 44100, 'expects 16000 Hz audio, got 44100'),
    (np.zeros((100, 2)), 16000, r'\(100, 2\) is not \[N\]'),
    (np.zeros(100, np.int16), 16000, 'dtype int16 is not float'),
    (np.zeros(0), 16000, 'empty'),
    (np.full(10, np.nan), 16000, 'NaN'),
])
def test_bad_waveforms_rejected(waveform, rate, match):
  with pytest.raises(ValueError, match=match):
    audio_lib.log_mel(waveform, rate)
