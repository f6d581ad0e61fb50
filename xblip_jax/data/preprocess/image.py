"""Image loading and the reference's CLIP-style preprocessing, with PIL and NumPy.

Eval (`clip_image_eval`): resize the short side to 224 (bicubic) -> centre crop 224 ->
CLIP mean/std. Train (`clip_image_train`): random resized crop (scale 0.9-1.0, aspect 3/4-4/3,
bicubic) to 224 -> CLIP mean/std; no flip. Any PIL mode (L, LA, RGBA, CMYK, P, I;16, ...) is
converted to RGB first. Output: float32 (H, W, 3), channels last.
"""

from __future__ import annotations

import math
import os

import numpy as np
from jaxtyping import Float
from PIL import Image, UnidentifiedImageError

from xblip_jax.data.example import MediaError

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
IMAGE_SIZE = 224
TRAIN_SCALE = (0.9, 1.0)
TRAIN_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def to_rgb(image: Image.Image) -> Image.Image:
  """RGB version of any PIL image. Alpha is dropped, as PIL's `convert("RGB")` (the
  reference's conversion) does; 16/32-bit grey is scaled to 8 bits instead of clipped."""
  if image.mode == "RGB":
    return image
  if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits
    arr = np.asarray(image, dtype=np.float64)
    peak = 65535.0 if image.mode.startswith("I;16") else max(float(arr.max()), 1.0)
    arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "L").convert("RGB")
  if image.mode == "P" and "transparency" in image.info:
    image = image.convert("RGBA")
  return image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
  """Decodes an image file fully (truncated files fail here, not later) and makes it RGB."""
  try:
    with Image.open(path) as img:
      img.load()
      return to_rgb(img)
  except FileNotFoundError:
    raise MediaError(path, "file not found") from None
  except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
    raise MediaError(path, f"cannot decode image ({e})") from None


def normalize(pixels: np.ndarray) -> Float[np.ndarray, "H W 3"]:
  """uint8 RGB (H, W, 3) -> float32 (x / 255 - mean) / std per channel."""
  x = pixels.astype(np.float32) / np.float32(255.0)
  return ((x - CLIP_MEAN) / CLIP_STD).astype(np.float32)


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
  """Short side to `size`, long side `int(size * long / short)` (torchvision's rule), bicubic."""
  w, h = image.size
  if w <= h:
    new_w, new_h = size, int(size * h / w)
  else:
    new_w, new_h = int(size * w / h), size
  if (new_w, new_h) == (w, h):
    return image
  return image.resize((new_w, new_h), Image.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
  """Central `size` x `size` crop (offsets rounded as torchvision does); pads with black when
  the image is smaller."""
  w, h = image.size
  if w < size or h < size:
    canvas = Image.new("RGB", (max(w, size), max(h, size)))
    canvas.paste(image, ((max(w, size) - w) // 2, (max(h, size) - h) // 2))
    image, (w, h) = canvas, canvas.size
  top = int(round((h - size) / 2.0))
  left = int(round((w - size) / 2.0))
  return image.crop((left, top, left + size, top + size))


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: tuple[float, float] = TRAIN_SCALE,
                            ratio: tuple[float, float] = TRAIN_RATIO) -> tuple[int, int, int, int]:
  """(left, top, crop_w, crop_h) drawn like torchvision's `RandomResizedCrop.get_params`.

  Ten tries of an area fraction in `scale` and a log-uniform aspect ratio in `ratio`; if none
  fits, the largest centred crop whose aspect ratio lies within `ratio`.
  """
  area = width * height
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, w, h
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    w, h = int(round(height * ratio[1])), height
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def image_eval(image: Image.Image, size: int = IMAGE_SIZE) -> Float[np.ndarray, "S S 3"]:
  """Eval transform: short side -> `size` bicubic, centre crop, CLIP normalisation."""
  image = center_crop(resize_short_side(to_rgb(image), size), size)
  return normalize(np.asarray(image, dtype=np.uint8))


def image_train(image: Image.Image, rng: np.random.Generator, size: int = IMAGE_SIZE,
                scale: tuple[float, float] = TRAIN_SCALE) -> Float[np.ndarray, "S S 3"]:
  """Train transform: random resized crop to `size` (bicubic), CLIP normalisation, no flip."""
  image = to_rgb(image)
  left, top, w, h = random_resized_crop_box(image.width, image.height, rng, scale)
  crop = image.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
  return normalize(np.asarray(crop, dtype=np.uint8))


def preprocess_image(path: str | os.PathLike, *, train: bool, rng: np.random.Generator | None,
                     size: int = IMAGE_SIZE) -> Float[np.ndarray, "S S 3"]:
  """Loads `path` and applies the train (needs `rng`) or eval transform."""
  image = load_image(path)
  if train:
    if rng is None:
      raise ValueError("the train transform needs an rng")
    return image_train(image, rng, size)
  return image_eval(image, size)
