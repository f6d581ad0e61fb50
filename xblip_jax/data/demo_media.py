"""Media writers and vocabularies of the synthetic demo data (see `demo.py`).

Every writer draws from the generator it is given and writes one file in a real format:
PNG/JPEG (PIL), MP4 (H.264 through PyAV, one encoder thread so files are reproducible),
FLAC/WAV (soundfile, 16-bit PCM), NPZ (`arr_0`, float32 xyz).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = ("red", "green", "blue", "yellow")
RGB = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230),
       "yellow": (235, 215, 40)}
SHAPES_2D = ("circle", "square", "triangle")
SHAPES_3D = ("sphere", "cube", "cylinder", "cone")
FLAT_FACES = {"sphere": "none", "cube": "six", "cylinder": "two", "cone": "one"}
DIRECTIONS = ("left", "right", "up", "down")
PITCHES = ("high", "low")
PITCH_HZ = {"high": 1500.0, "low": 300.0}
SPEEDS = ("fast", "slow")
PULSE_HZ = {"fast": 8.0, "slow": 2.0}     # beeps per second
SQUARE_SPEED = {"fast": 5, "slow": 1}     # pixels per frame

IMAGE_CAPTIONS = ("a {c} {s}", "a {c} {s} on a dark background", "a picture of a {c} {s}",
                  "one {c} {s} in the image")
IMAGE_QUESTIONS = ("What colour is the shape?", "What shape is in the picture?")
VIDEO_CAPTIONS = ("a {c} square moving {d}", "a {c} square slides {d}",
                  "a small {c} square goes {d}")
VIDEO_QUESTIONS = ("Which direction does the square move?", "What colour is the square?")
AUDIO_CAPTIONS = ("{s} {p} pitched beeps", "a {p} tone beeping at a {s} pace",
                  "a {p} pitched beep repeats at a {s} rhythm", "{s} beeping of a {p} tone",
                  "a series of {s} {p} beeps", "{p} pitched beeps with a {s} rhythm")
AUDIO_QUESTIONS = ("Is the sound high or low pitched?", "Is the beeping fast or slow?")
PC_CAPTIONS = ("a 3d model of a {s}", "a {s}", "a simple {s} shape", "a plain {s} object")
PC_QUESTIONS = ("What shape is this object?", "How many flat faces does it have?")

_ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-"  # no "_": the
# reference splits file names at "_" to recover ids
VIDEO_SIZE, VIDEO_FRAMES, SQUARE = 64, 10, 12
AUDIO_SECONDS = 3.0
NUM_POINTS = 8192


def youtube_id(rng: np.random.Generator) -> str:
  """An 11-character YouTube-like id."""
  return "".join(_ID_CHARS[i] for i in rng.integers(len(_ID_CHARS), size=11))


def object_uid(rng: np.random.Generator) -> str:
  """A 32-hex-digit Objaverse-like uid."""
  return "".join("0123456789abcdef"[i] for i in rng.integers(16, size=32))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int],
                fill: tuple[int, int, int]) -> None:
  x0, y0, x1, y1 = box
  if shape in ("circle", "sphere"):
    draw.ellipse(box, fill=fill)
  elif shape in ("square", "cube"):
    draw.rectangle(box, fill=fill)
  elif shape == "cylinder":
    w = x1 - x0
    draw.rectangle((x0 + w // 4, y0, x1 - w // 4, y1), fill=fill)
  else:  # triangle, cone
    draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def write_shape_image(path: Path, colour: str, shape: str, rng: np.random.Generator) -> None:
  """PNG of one `colour` `shape` on a dark background; 64-224 px a side."""
  w, h = (int(v) for v in rng.integers(64, 225, size=2))
  bg = tuple(int(v) for v in rng.integers(20, 70, size=3))
  img = Image.new("RGB", (w, h), bg)
  side = int(min(w, h) * rng.uniform(0.4, 0.7))
  x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
  _draw_shape(ImageDraw.Draw(img), shape, (x0, y0, x0 + side - 1, y0 + side - 1), RGB[colour])
  path.parent.mkdir(parents=True, exist_ok=True)
  img.save(path)


def write_object_render(path: Path, shape: str, rng: np.random.Generator) -> None:
  """JPEG 'render' of a 3D shape: its grey silhouette on a light background, 128 px."""
  img = Image.new("RGB", (128, 128), (235, 235, 235))
  side = int(rng.integers(64, 100))
  x0, y0 = int(rng.integers(4, 128 - side - 4)), int(rng.integers(4, 128 - side - 4))
  grey = int(rng.integers(60, 120))
  _draw_shape(ImageDraw.Draw(img), shape, (x0, y0, x0 + side, y0 + side), (grey, grey, grey))
  path.parent.mkdir(parents=True, exist_ok=True)
  img.save(path, quality=92)


def write_moving_square(path: Path, colour: str, direction: str, speed: int,
                        rng: np.random.Generator) -> None:
  """MP4 (H.264, 10 fps) of a `colour` square moving `direction` by `speed` px per frame."""
  import av
  travel = speed * (VIDEO_FRAMES - 1)
  lo, hi = 0, VIDEO_SIZE - SQUARE - travel
  start = int(rng.integers(lo, hi + 1))
  across = int(rng.integers(0, VIDEO_SIZE - SQUARE + 1))
  bg = np.array(rng.integers(10, 50, size=3), np.uint8)
  path.parent.mkdir(parents=True, exist_ok=True)
  with av.open(str(path), "w") as container:
    stream = container.add_stream("libx264", rate=10, options={"crf": "18", "threads": "1"})
    stream.width = stream.height = VIDEO_SIZE
    stream.pix_fmt = "yuv420p"
    for t in range(VIDEO_FRAMES):
      along = start + speed * t
      if direction in ("left", "up"):
        along = VIDEO_SIZE - SQUARE - along
      x, y = (along, across) if direction in ("left", "right") else (across, along)
      frame = np.broadcast_to(bg, (VIDEO_SIZE, VIDEO_SIZE, 3)).copy()
      frame[y:y + SQUARE, x:x + SQUARE] = RGB[colour]
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def beeps(pitch: str, speed: str, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
  """Mono float waveform: a `pitch` tone gated on and off `PULSE_HZ[speed]` times a second."""
  t = np.arange(int(AUDIO_SECONDS * sample_rate)) / sample_rate
  freq = PITCH_HZ[pitch] * rng.uniform(0.95, 1.05)
  carrier = np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
  phase = (t * PULSE_HZ[speed] + rng.uniform(0, 1)) % 1.0
  # On for the first half of each period, with 5 ms linear fades (no clicks).
  fade = 0.005 * PULSE_HZ[speed]
  gate = np.clip(np.minimum(phase, 0.5 - phase) / fade, 0.0, 1.0)
  noise = rng.normal(0.0, 0.005, size=t.shape)
  return (rng.uniform(0.3, 0.6) * carrier * gate + noise).astype(np.float32)


def write_beeps(path: Path, pitch: str, speed: str, sample_rate: int,
                rng: np.random.Generator) -> None:
  """FLAC or WAV (by suffix), 16-bit PCM, stereo for FLAC (AudioCaps) and mono for WAV."""
  import soundfile as sf
  wave = beeps(pitch, speed, sample_rate, rng)
  data = np.stack([wave, wave], axis=1) if path.suffix == ".flac" else wave
  path.parent.mkdir(parents=True, exist_ok=True)
  sf.write(str(path), data, sample_rate, subtype="PCM_16")


def surface_points(shape: str, n: int, rng: np.random.Generator) -> np.ndarray:
  """n points on the surface of a unit-size `shape` (z up), float64."""
  if shape == "sphere":
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)
  if shape == "cube":
    p = rng.uniform(-1, 1, size=(n, 3))
    axis = rng.integers(3, size=n)
    p[np.arange(n), axis] = rng.choice([-1.0, 1.0], size=n)
    return p
  theta = rng.uniform(0, 2 * np.pi, size=n)
  if shape == "cylinder":  # side area 2*pi*r*h = 4*pi, each cap pi (r = 1, h = 2)
    side = rng.uniform(size=n) < 4 / 6
    z = np.where(side, rng.uniform(-1, 1, size=n), rng.choice([-1.0, 1.0], size=n))
    r = np.where(side, 1.0, np.sqrt(rng.uniform(size=n)))
    return np.stack([r * np.cos(theta), r * np.sin(theta), z], axis=1)
  # cone: apex at z = 1, base disk of radius 1 at z = -1; lateral area pi*sqrt(5), base pi
  lateral = rng.uniform(size=n) < math.sqrt(5) / (math.sqrt(5) + 1)
  s = np.sqrt(rng.uniform(size=n))  # area-uniform distance from the apex
  r = np.where(lateral, s, np.sqrt(rng.uniform(size=n)))
  z = np.where(lateral, 1.0 - 2.0 * s, -1.0)
  return np.stack([r * np.cos(theta), r * np.sin(theta), z], axis=1)


def write_point_cloud(path: Path, shape: str, rng: np.random.Generator) -> None:
  """`<uid>_8192.npz` with `arr_0` (8192, 3) float32: the shape scaled, turned about z, moved."""
  p = surface_points(shape, NUM_POINTS, rng) * rng.uniform(0.5, 2.0)
  a = rng.uniform(0, 2 * np.pi)
  rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
  p = p @ rot.T + rng.uniform(-1, 1, size=3)
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez(path, arr_0=p.astype(np.float32))
