"""Waveform -> BEATs log-mel fbank, in NumPy, as LAVIS' `BeatsAudioProcessor` computes it.

LAVIS calls `torchaudio.compliance.kaldi.fbank(waveform * 2**15, num_mel_bins=128,
sample_frequency=16000, frame_length=25, frame_shift=10)` and keeps every other Kaldi default:
no dither, Povey window, pre-emphasis 0.97, per-frame DC removal, 400-sample frames zero-padded
to a 512-point FFT, frames only where they fit (`snip_edges`), power spectrum, mel bins between
20 Hz and Nyquist, and the log floored at float32 epsilon.

With 128 bins on a 512-point FFT, mel bin 3 covers no FFT bin. Kaldi and kaldi-native-fbank refuse
that configuration; torchaudio does not, and the bin comes out as the constant log(eps) = -15.9424.
So the filterbank is built here, in float32 like torchaudio, and no library is asked for it.

The 2**15 scaling (float audio in [-1, 1] to the int16 range) is not part of `kaldi_fbank`: the
reference applies it to the waveform before calling fbank, and so does `beats_features` here.
"""

from __future__ import annotations

import math

import numpy as np
from jaxtyping import Bool, Float

FBANK_MEAN = 15.41663
FBANK_STD = 6.55582
WAVEFORM_SCALE = 2.0**15  # float waveform -> int16 range, as BeatsAudioProcessor does
_EPS = np.float32(np.finfo(np.float32).eps)
_F32 = np.float32


def _mel(freq):
  return 1127.0 * np.log(1.0 + freq / 700.0)


def mel_filterbank(num_bins: int, fft_size: int, sample_rate: float, low_freq: float = 20.0,
                   high_freq: float = 0.0) -> Float[np.ndarray, "bins fft_bins"]:
  """Kaldi triangular mel filters, shape (num_bins, fft_size // 2 + 1), computed in float32.

  The band edges are equally spaced on Kaldi's mel scale (1127 ln(1 + f/700)) over
  [low_freq, high_freq] (high_freq <= 0 counts down from Nyquist); each filter rises from its
  left edge to its centre and falls to its right edge. The Nyquist column is zero. Nothing here
  rejects filters that catch no FFT bin: they stay all-zero, as in torchaudio.
  """
  nyquist = 0.5 * sample_rate
  if high_freq <= 0.0:
    high_freq += nyquist
  if not (0.0 <= low_freq < nyquist and 0.0 < high_freq <= nyquist and low_freq < high_freq):
    raise ValueError(f"bad mel range [{low_freq}, {high_freq}] for Nyquist {nyquist}")
  # Scalars in float64 (Python floats), tensors in float32: the precision torchaudio works in.
  mel_low, mel_high = _mel(float(low_freq)), _mel(float(high_freq))
  delta = (mel_high - mel_low) / (num_bins + 1)
  idx = np.arange(num_bins, dtype=_F32)[:, None]
  left = _F32(mel_low) + idx * _F32(delta)
  centre = _F32(mel_low) + (idx + _F32(1.0)) * _F32(delta)
  right = _F32(mel_low) + (idx + _F32(2.0)) * _F32(delta)
  half = fft_size // 2
  fft_mel = (_F32(1127.0) * np.log(_F32(1.0) + (_F32(sample_rate / fft_size)
                                                 * np.arange(half, dtype=_F32)) / _F32(700.0)))
  fft_mel = fft_mel.astype(_F32)[None, :]
  up = (fft_mel - left) / (centre - left)
  down = (right - fft_mel) / (right - centre)
  banks = np.maximum(_F32(0.0), np.minimum(up, down)).astype(_F32)
  return np.pad(banks, ((0, 0), (0, 1)))


def povey_window(size: int) -> Float[np.ndarray, "size"]:
  """Symmetric Hann window raised to 0.85 (goes to zero at both ends), float32."""
  n = np.arange(size, dtype=_F32)
  hann = _F32(0.5) - _F32(0.5) * np.cos(_F32(2.0 * math.pi / (size - 1)) * n)
  return np.power(hann.astype(_F32), _F32(0.85)).astype(_F32)


def kaldi_fbank(waveform: Float[np.ndarray, "samples"], sample_rate: int = 16000,
                num_mel_bins: int = 128, frame_length_ms: float = 25.0,
                frame_shift_ms: float = 10.0) -> Float[np.ndarray, "frames bins"]:
  """Kaldi log-mel filterbank energies with torchaudio's `kaldi.fbank` defaults.

  Args:
    waveform: mono samples, already in the scale the caller wants (BEATs: int16 range, see
      `beats_features`); not rescaled here.
    sample_rate: samples per second.
    num_mel_bins: number of triangular mel filters (BEATs: 128; empty filters allowed).
    frame_length_ms: analysis window length.
    frame_shift_ms: hop between frames.

  Returns:
    float32 array (num_frames, num_mel_bins), num_frames = 1 + (samples - window) // shift.

  Raises:
    ValueError: for a waveform shorter than one window (torchaudio asserts; LAVIS' processor
      then falls back to an all-zero clip tensor) or one with more than one channel.
  """
  x = np.asarray(waveform, dtype=_F32)
  if x.ndim == 2 and x.shape[0] == 1:  # torchaudio's (1, samples) layout
    x = x[0]
  if x.ndim != 1:
    raise ValueError(f"expected mono samples, got shape {x.shape} (average channels first)")
  shift = int(sample_rate * frame_shift_ms * 0.001)
  size = int(sample_rate * frame_length_ms * 0.001)
  fft_size = 2 ** (size - 1).bit_length()
  if not 2 <= size <= len(x):
    raise ValueError(f"waveform of {len(x)} samples is shorter than one {size}-sample window")
  num_frames = 1 + (len(x) - size) // shift
  frames = np.lib.stride_tricks.sliding_window_view(x, size)[::shift][:num_frames].astype(_F32)
  frames = frames - frames.mean(axis=1, keepdims=True, dtype=_F32)  # remove DC per frame
  # Pre-emphasis with the first sample repeated as its own predecessor.
  previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
  frames = frames - _F32(0.97) * previous
  frames = frames * povey_window(size)[None, :]
  frames = np.pad(frames, ((0, 0), (0, fft_size - size)))
  spectrum = np.abs(np.fft.rfft(frames, axis=1).astype(np.complex64)).astype(_F32) ** 2
  banks = mel_filterbank(num_mel_bins, fft_size, float(sample_rate))
  energies = (spectrum @ banks.T).astype(_F32)
  return np.log(np.maximum(energies, _EPS)).astype(_F32)


def beats_normalize(fbank: Float[np.ndarray, "... F"]) -> Float[np.ndarray, "... F"]:
  """BEATs' fixed AudioSet statistics: (fbank - 15.41663) / (2 * 6.55582)."""
  return ((np.asarray(fbank, _F32) - _F32(FBANK_MEAN)) / _F32(2 * FBANK_STD)).astype(_F32)


def beats_features(waveform: Float[np.ndarray, "samples"],
                   sample_rate: int = 16000) -> Float[np.ndarray, "frames 128"]:
  """`BeatsAudioProcessor`'s fbank: float waveform x 2**15 -> 128-bin log-mel -> normalised."""
  scaled = np.asarray(waveform, _F32) * _F32(WAVEFORM_SCALE)
  return beats_normalize(kaldi_fbank(scaled, sample_rate=sample_rate, num_mel_bins=128))


def split_clips(fbank: Float[np.ndarray, "T F"], frames_per_clip: int = 512,
                num_clips: int = 2) -> tuple[Float[np.ndarray, "C L F"], Bool[np.ndarray, "C L"]]:
  """Training-mode clip framing: zero-pad or crop to `num_clips * frames_per_clip` rows, split.

  Padding adds zeros to the (already normalised) fbank, as the reference does.

  Returns:
    clips (num_clips, frames_per_clip, F) and a frame mask (num_clips, frames_per_clip) that is
    True on padded rows (the convention of BEATs' `padding_mask`).
  """
  fbank = np.asarray(fbank, _F32)
  total = frames_per_clip * num_clips
  kept = min(fbank.shape[0], total)
  clips = np.zeros((total, fbank.shape[1]), _F32)
  clips[:kept] = fbank[:kept]
  mask = np.arange(total) >= kept
  return (clips.reshape(num_clips, frames_per_clip, -1),
          mask.reshape(num_clips, frames_per_clip))


def split_clips_eval(fbank: Float[np.ndarray, "T F"], frames_per_clip: int = 512
                     ) -> tuple[Float[np.ndarray, "C L F"], Bool[np.ndarray, "C L"]]:
  """Eval-mode (`is_eval: True`) framing exactly as LAVIS: pads `T % frames_per_clip` zero rows
  (not the remainder to a full clip) and keeps `floor(len / frames_per_clip)` clips, so a tail
  can be dropped and the clip count varies."""
  fbank = np.asarray(fbank, _F32)
  pad = fbank.shape[0] % frames_per_clip
  padded = np.concatenate([fbank, np.zeros((pad, fbank.shape[1]), _F32)], axis=0)
  mask = np.arange(padded.shape[0]) >= fbank.shape[0]
  n = padded.shape[0] // frames_per_clip
  used = n * frames_per_clip
  return (padded[:used].reshape(n, frames_per_clip, -1),
          mask[:used].reshape(n, frames_per_clip))
