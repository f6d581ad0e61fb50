"""Video frame sampling, decoding (PyAV) and the reference's per-frame preprocessing.

Frame choice, as the reference:
- train ("headtail", decord `load_video`): `n // 2` sorted random frames from the first half
  and `n // 2` from the second half, so an odd `n_frms` (5) yields 4 distinct frames and the
  last one is repeated;
- eval ("head_tail_frame_sampling", OpenCV): frames 0, k, 2k, ..., (n-2)k and the last frame,
  k = total // (n - 1). The reference asks for frame index `total` (one past the end), the read
  fails and the previous frame is repeated; here the last frame is read
  (`reference_quirks=True` reproduces the repeat).
Frames are resized to `size` x `size` (aspect ratio not kept, as both reference loaders do).
Train then applies one random resized crop (scale 0.9-1.0) and one horizontal flip decision to
all frames; eval nothing more. Both normalise with CLIP mean/std. The reference's eval frames
are BGR (OpenCV without conversion): `reference_quirks=True` reproduces that too. Its
train-time RandAugment (2 ops, magnitude 5) is not implemented.
Output: float32 (T, H, W, 3).
"""

from __future__ import annotations

import os

import numpy as np
from jaxtyping import Float, UInt8
from PIL import Image

from xblip_jax.data.example import MediaError
from xblip_jax.data.preprocess.image import normalize, random_resized_crop_box

N_FRAMES = 5
FRAME_SIZE = 224


def train_frame_indices(total: int, n_frms: int, rng: np.random.Generator) -> list[int]:
  """Headtail sampling; the result has `n_frms` entries (the last one repeated as padding)."""
  if total <= 0:
    raise ValueError("video has no frames")
  n = min(n_frms, total)
  half, k = total // 2, n // 2
  if k == 0:  # one frame wanted or available (the reference would sample none)
    indices = [int(rng.integers(total))]
  else:
    head = np.sort(rng.choice(half, size=k, replace=False))
    tail = half + np.sort(rng.choice(total - half, size=k, replace=False))
    indices = [int(i) for i in np.concatenate([head, tail])]
  return indices + [indices[-1]] * (n_frms - len(indices))


def eval_frame_indices(total: int, n_frms: int, reference_quirks: bool = False) -> list[int]:
  """Head, evenly spaced middle and tail frames; `n_frms` entries."""
  if total <= 0:
    raise ValueError("video has no frames")
  if n_frms == 1:
    return [0]
  step = total // (n_frms - 1)
  indices = [step * i for i in range(n_frms - 1)]
  last = indices[-1] if reference_quirks else total - 1
  return indices + [last]


def _open(path):
  import av  # lazily: only video and mp4-audio need FFmpeg
  try:
    return av.open(str(path))
  except FileNotFoundError:
    raise MediaError(path, "file not found") from None
  except (av.FFmpegError, OSError, ValueError) as e:
    raise MediaError(path, f"cannot open video ({e})") from None


def count_frames(path: str | os.PathLike) -> int:
  """Frames in the first video stream: the container's count, else by decoding."""
  import av
  with _open(path) as container:
    if not container.streams.video:
      raise MediaError(path, "no video stream")
    stream = container.streams.video[0]
    if stream.frames > 0:
      return int(stream.frames)
    try:
      return sum(1 for _ in container.decode(stream))
    except (av.FFmpegError, ValueError) as e:
      raise MediaError(path, f"cannot decode video ({e})") from None


def read_frames(path: str | os.PathLike, indices: list[int], size: int = FRAME_SIZE,
                interpolation: str = "BICUBIC") -> UInt8[np.ndarray, "T S S 3"]:
  """Decodes the frames at `indices` (any order, repeats allowed), resized to `size`.

  Indices past the frames that actually decode (a truncated file, or an over-stated frame
  count) fall back to the last decoded frame, as the reference's loaders pad.
  """
  import av
  wanted = set(indices)
  last_wanted = max(indices)
  frames: dict[int, np.ndarray] = {}
  last_index, last_frame = -1, None
  with _open(path) as container:
    if not container.streams.video:
      raise MediaError(path, "no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    try:
      for i, frame in enumerate(container.decode(stream)):
        last_index, last_frame = i, frame
        if i in wanted:
          frames[i] = frame.to_ndarray(width=size, height=size, format="rgb24",
                                       interpolation=interpolation)
        if i >= last_wanted:
          break
    except (av.FFmpegError, ValueError) as e:
      if last_frame is None:
        raise MediaError(path, f"cannot decode video ({e})") from None
  if last_frame is None:
    raise MediaError(path, "no decodable frames")
  if last_index not in frames:
    frames[last_index] = last_frame.to_ndarray(width=size, height=size, format="rgb24",
                                               interpolation=interpolation)
  return np.stack([frames[min(i, last_index)] for i in indices])


def video_train(frames: UInt8[np.ndarray, "T H W 3"], rng: np.random.Generator,
                hflip_prob: float = 0.5) -> Float[np.ndarray, "T H W 3"]:
  """One random resized crop (back to the frame size) and one flip for all frames; CLIP norm."""
  t, h, w, _ = frames.shape
  left, top, cw, ch = random_resized_crop_box(w, h, rng)
  flip = rng.uniform() < hflip_prob
  out = []
  for frame in frames:
    img = Image.fromarray(frame).crop((left, top, left + cw, top + ch))
    img = img.resize((w, h), Image.BICUBIC)
    if flip:
      img = img.transpose(Image.FLIP_LEFT_RIGHT)
    out.append(np.asarray(img, dtype=np.uint8))
  return normalize(np.stack(out))


def preprocess_video(path: str | os.PathLike, *, train: bool, rng: np.random.Generator | None,
                     n_frms: int = N_FRAMES, size: int = FRAME_SIZE, hflip_prob: float = 0.5,
                     reference_quirks: bool = False) -> Float[np.ndarray, "T S S 3"]:
  """Samples `n_frms` frames of `path` and preprocesses them (train needs `rng`).

  Args:
    path: video file (anything FFmpeg decodes).
    train: training (random headtail frames, crop, flip) or eval (fixed frames).
    rng: randomness of the train transform.
    n_frms: frames per clip (the reference trains with 5; DisCRn uses 2).
    size: frame side.
    hflip_prob: flip probability in training (reference 0.5; 0 for direction-sensitive tasks).
    reference_quirks: eval only: repeat the second-to-last frame and return BGR frames, as the
      reference's OpenCV loader does.
  """
  total = count_frames(path)
  if total <= 0:
    raise MediaError(path, "no frames")
  if train:
    if rng is None:
      raise ValueError("the train transform needs an rng")
    return video_train(read_frames(path, train_frame_indices(total, n_frms, rng), size), rng,
                       hflip_prob)
  frames = read_frames(path, eval_frame_indices(total, n_frms, reference_quirks), size,
                       interpolation="BILINEAR")
  if reference_quirks:
    frames = frames[..., ::-1]
  return normalize(frames)
