"""16 kHz audio -> stacked log-mel frames for ``Batch.audio``.

``log_mel`` cuts the waveform into 25 ms Hann windows every 10 ms (frame ``a`` covers samples
``[160 a, 160 a + 400)``, the tail zero-padded, so ``A = ceil(N / 160)``: 100 frames a second),
takes the power spectrum (512-point FFT) and sums it under 80 triangular mel filters on the
HTK mel scale (``mel = 2595 log10(1 + f / 700)``, filters evenly spaced in mel from 0 Hz to
8 kHz, each a triangle in Hz with peak 1). The features are
``(log10(max(power, 1e-10)) + 4) / 4``: a fixed affine map (the one Whisper uses, without its
per-clip clamp) that puts speech at about unit scale; digital silence is -1.5 (``SILENCE``).

``stack_frames`` concatenates 4 consecutive 10 ms frames into one 40 ms item of
``4 * 80 = 320`` values (``model.audio_dim``), padding the tail with silence.
"""

import math
import pathlib
import wave

import numpy as np

SAMPLE_RATE = 16_000
WINDOW = 400     # samples: 25 ms
HOP = 160        # samples: 10 ms
FFT_SIZE = 512
NUM_MELS = 80
STACK = 4        # 10 ms frames per item: 40 ms
LOG_FLOOR = 1e-10
SILENCE = (math.log10(LOG_FLOOR) + 4) / 4  # the feature value of zero power: -1.5


def hz_to_mel(hz):
  """HTK mel scale."""
  return 2595 * np.log10(1 + np.asarray(hz, np.float64) / 700)


def mel_to_hz(mel):
  return 700 * (10 ** (np.asarray(mel, np.float64) / 2595) - 1)


def mel_filters(num_mels: int = NUM_MELS, fft_size: int = FFT_SIZE,
                sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """Triangular filters ``filters_MK`` float64, ``K = fft_size // 2 + 1`` FFT bins.

  Filter ``m`` rises linearly in Hz from edge ``m`` to 1 at edge ``m + 1`` and falls to 0 at
  edge ``m + 2``, where the ``num_mels + 2`` edges are evenly spaced in mel over
  [0, sample_rate / 2].
  """
  edges_hz = mel_to_hz(np.linspace(0, hz_to_mel(sample_rate / 2), num_mels + 2))
  lower, centre, upper = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
  bins_hz = np.arange(fft_size // 2 + 1) * sample_rate / fft_size
  rising = (bins_hz - lower) / (centre - lower)
  falling = (upper - bins_hz) / (upper - centre)
  return np.maximum(0, np.minimum(rising, falling))


_FILTERS_MK = mel_filters()
_HANN_W = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WINDOW) / WINDOW)  # periodic Hann


def log_mel(waveform_N, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """A mono waveform -> log-mel features ``mel_AM`` float32, ``A = ceil(N / 160)``, M = 80.

  Args:
    waveform_N: float samples in about [-1, 1] (``read_wav`` gives these), shape ``[N]``.
    sample_rate: must be 16000; it is an argument so that other rates fail loudly.

  Raises:
    ValueError: for another sample rate, a shape other than ``[N]``, an integer dtype,
      no samples, or non-finite samples.
  """
  if sample_rate != SAMPLE_RATE:
    raise ValueError(f'log_mel expects {SAMPLE_RATE} Hz audio, got {sample_rate} Hz; resample '
                     'it first, e.g. `sox in.wav -r 16000 -c 1 -b 16 out.wav`')
  waveform = np.asarray(waveform_N)
  if waveform.ndim != 1:
    raise ValueError(f'waveform shape {waveform.shape} is not [N]; pass one mono channel '
                     '(e.g. waveform.mean(axis=1) for [N, channels])')
  if not np.issubdtype(waveform.dtype, np.floating):
    raise ValueError(f'waveform dtype {waveform.dtype} is not float; scale int16 samples to '
                     '[-1, 1] with samples / 32768')
  if not len(waveform) or not np.isfinite(waveform).all():
    raise ValueError('waveform is empty or holds NaN/inf; pass at least one finite sample')
  num_frames = -(-len(waveform) // HOP)
  padded = np.zeros((num_frames - 1) * HOP + WINDOW)
  padded[:len(waveform)] = waveform
  frames_AW = np.lib.stride_tricks.sliding_window_view(padded, WINDOW)[::HOP]
  power_AK = np.abs(np.fft.rfft(frames_AW * _HANN_W, n=FFT_SIZE)) ** 2
  mel_AM = np.einsum('AK,MK->AM', power_AK, _FILTERS_MK)
  return ((np.log10(np.maximum(mel_AM, LOG_FLOOR)) + 4) / 4).astype(np.float32)


def stack_frames(mel_AM, stack: int = STACK, pad_value: float = SILENCE) -> np.ndarray:
  """Groups ``stack`` consecutive frames: ``[A, M] -> [ceil(A / stack), stack * M]`` float32.

  Item ``a`` is frames ``stack * a, ..., stack * a + stack - 1`` concatenated in time order;
  a short last group is completed with frames of ``pad_value`` (silence by default).
  """
  mel = np.asarray(mel_AM, np.float32)
  if mel.ndim != 2 or stack <= 0:
    raise ValueError(f'stack_frames needs mel_AM of shape [A, M] and stack > 0, got shape '
                     f'{mel.shape} and stack {stack}; pass log_mel(...) output')
  missing = -len(mel) % stack
  mel = np.concatenate([mel, np.full((missing, mel.shape[1]), pad_value, np.float32)])
  return mel.reshape(len(mel) // stack, stack * mel.shape[1])


def read_wav(path) -> tuple[np.ndarray, int]:
  """A 16-bit PCM mono wav file -> ``(waveform_N float32 in [-1, 1), sample_rate)``.

  Raises:
    ValueError: naming the file when it is not a wav, is truncated, or is not 16-bit mono
      PCM (convert with ``sox in.wav -r 16000 -c 1 -b 16 out.wav``).
  """
  path = pathlib.Path(path)
  fix = 'convert it with `sox in.wav -r 16000 -c 1 -b 16 out.wav`'
  try:
    with wave.open(str(path), 'rb') as reader:
      channels, width, rate = reader.getnchannels(), reader.getsampwidth(), reader.getframerate()
      count = reader.getnframes()
      data = reader.readframes(count)
  except (wave.Error, EOFError) as error:
    raise ValueError(f'{path}: not a readable PCM wav file ({error}); {fix}') from error
  if channels != 1 or width != 2:
    raise ValueError(f'{path}: {channels} channel(s) of {8 * width}-bit samples, expected '
                     f'mono 16-bit; {fix}')
  if len(data) != 2 * count:
    raise ValueError(f'{path}: truncated, the header promises {count} samples but the file '
                     f'holds {len(data) // 2}; re-create the file')
  return np.frombuffer(data, '<i2').astype(np.float32) / 32768, rate
