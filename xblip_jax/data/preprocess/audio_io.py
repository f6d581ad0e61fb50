"""Audio decoding (FLAC/WAV/... with soundfile, MP4 and other containers with PyAV), downmix,
resampling to 16 kHz, and BEATs' fbank clips.

As the reference (`BeatsAudioProcessor`): channels are averaged, the waveform is resampled to
16 kHz, scaled by 2**15, turned into a 128-bin Kaldi fbank, normalised, then zero-padded or cut
to 2 clips x 512 frames (10.24 s). Resampling is polyphase (`scipy.signal.resample_poly`, Kaiser
window), where the reference uses torchaudio's windowed-sinc `Resample`: the two agree well
inside the pass band but not bit for bit. The fbank itself is `preprocess/audio_fbank.py`.
"""

from __future__ import annotations

import math
import os

import numpy as np
from jaxtyping import Bool, Float

from xblip_jax.data.example import MediaError

SAMPLE_RATE = 16000
FRAMES_PER_CLIP = 512
NUM_CLIPS = 2
MIN_SAMPLES = 400  # one 25 ms fbank window at 16 kHz
# Extensions soundfile (libsndfile) decodes; anything else goes through FFmpeg.
SOUNDFILE_EXTS = (".flac", ".wav", ".ogg", ".aiff", ".aif", ".au", ".mp3")


def _check_riff_length(path) -> None:
  """A cut WAV decodes silently (libsndfile trusts the bytes present): compare the RIFF size."""
  with open(path, "rb") as f:
    head = f.read(12)
  if len(head) == 12 and head[:4] == b"RIFF" and head[8:12] == b"WAVE":
    declared = int.from_bytes(head[4:8], "little") + 8
    actual = os.path.getsize(path)
    if actual < declared:
      raise MediaError(path, f"truncated WAV ({actual} of {declared} bytes)")


def _decode_soundfile(path) -> tuple[np.ndarray, int]:
  import soundfile as sf
  _check_riff_length(path)
  try:
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
  except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
    raise MediaError(path, f"cannot decode audio ({e})") from None
  return data.T, int(rate)  # (channels, samples)


def _decode_av(path) -> tuple[np.ndarray, int]:
  import av
  try:
    with av.open(str(path)) as container:
      if not container.streams.audio:
        raise MediaError(path, "no audio stream")
      stream = container.streams.audio[0]
      to_float = av.AudioResampler(format="fltp")  # planar float, native rate and layout
      chunks, rate = [], stream.rate
      for frame in container.decode(stream):
        for out in to_float.resample(frame):
          chunks.append(out.to_ndarray())
          rate = out.sample_rate
      for out in to_float.resample(None):
        chunks.append(out.to_ndarray())
  except MediaError:
    raise
  except (av.FFmpegError, OSError, ValueError) as e:
    raise MediaError(path, f"cannot decode audio ({e})") from None
  if not chunks:
    raise MediaError(path, "no audio samples")
  return np.concatenate(chunks, axis=1).astype(np.float32), int(rate)


def resample(waveform: Float[np.ndarray, "N"], orig_rate: int,
             new_rate: int = SAMPLE_RATE) -> Float[np.ndarray, "M"]:
  """Polyphase resampling by the reduced ratio new_rate / orig_rate."""
  if orig_rate == new_rate:
    return waveform.astype(np.float32)
  from scipy.signal import resample_poly
  g = math.gcd(orig_rate, new_rate)
  return resample_poly(waveform, new_rate // g, orig_rate // g).astype(np.float32)


def load_waveform(path: str | os.PathLike,
                  sample_rate: int = SAMPLE_RATE) -> Float[np.ndarray, "samples"]:
  """Mono float32 waveform in [-1, 1] at `sample_rate` (channels averaged)."""
  if not os.path.exists(path):
    raise MediaError(path, "file not found")
  ext = os.path.splitext(str(path))[1].lower()
  channels, rate = (_decode_soundfile(path) if ext in SOUNDFILE_EXTS else _decode_av(path))
  if channels.size == 0:
    raise MediaError(path, "no audio samples")
  mono = channels.mean(axis=0)
  if not np.isfinite(mono).all():
    raise MediaError(path, "audio holds NaN or inf")
  return resample(mono, rate, sample_rate)


def audio_clips(waveform: Float[np.ndarray, "samples"], *, num_clips: int = NUM_CLIPS,
                frames_per_clip: int = FRAMES_PER_CLIP
                ) -> tuple[Float[np.ndarray, "C L 128"], Bool[np.ndarray, "C"],
                           Bool[np.ndarray, "C L"]]:
  """16 kHz waveform -> normalised fbank clips, as the reference's training mode.

  Returns:
    clips (num_clips, frames_per_clip, 128) float32; clip_mask (num_clips,) True where a clip
    holds at least one real frame; padding (num_clips, frames_per_clip) True on padded frames
    (BEATs' `padding_mask` convention; the reference does not pass it to BEATs).
  """
  from xblip_jax.data.preprocess.audio_fbank import beats_features, split_clips
  fbank = beats_features(waveform, sample_rate=SAMPLE_RATE)
  clips, padding = split_clips(fbank, frames_per_clip=frames_per_clip, num_clips=num_clips)
  return clips, ~padding.all(axis=1), padding


def preprocess_audio(path: str | os.PathLike, *, num_clips: int = NUM_CLIPS,
                     frames_per_clip: int = FRAMES_PER_CLIP
                     ) -> tuple[Float[np.ndarray, "C L 128"], Bool[np.ndarray, "C"],
                                Bool[np.ndarray, "C L"]]:
  """Decodes `path` and returns `audio_clips` of it; too-short audio is a `MediaError`."""
  waveform = load_waveform(path)
  if waveform.shape[0] < MIN_SAMPLES:
    raise MediaError(path, f"audio shorter than one fbank window ({waveform.shape[0]} samples)")
  return audio_clips(waveform, num_clips=num_clips, frames_per_clip=frames_per_clip)
