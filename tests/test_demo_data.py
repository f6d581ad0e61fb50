"""The synthetic demo data: real formats, read back by the real readers, answers in the media."""

from __future__ import annotations

import filecmp
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xblip_jax.data import demo, demo_media, pipeline
from xblip_jax.data.preprocess import audio_io, pointcloud, video

SIZES = demo.DemoSizes(image=(16, 8), video=(8, 4), audiocaps=(8, 4), clotho=(6, 3),
                       pc=(10, 5), discrn=(8, 4))


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("demo")
  return root, demo.write_demo_data(root, seed=0, sizes=SIZES)


def test_all_formats_are_written_and_the_manifest_round_trips(demo_root):
  root, manifest = demo_root
  suffixes = {p.suffix for p in root.rglob("*") if p.is_file()}
  assert {".png", ".jpeg", ".mp4", ".flac", ".wav", ".npz", ".json", ".csv"} <= suffixes
  assert demo.load_manifest(root) == manifest
  assert set(manifest) == {"image_caption", "image_qa", "video_caption", "video_qa",
                           "audiocaps_caption", "audiocaps_qa", "clotho_caption", "pc_caption",
                           "pc_qa", "discrn_image_pc", "discrn_video_audio", "audio_cls",
                           "pc_cls"}
  assert all(set(splits) == {"train", "val"} for splits in manifest.values())
  assert Path(manifest["audiocaps_qa"]["train"].annotation).read_text().startswith(
      "audiocap_id,youtube_id,start_time,caption,question,answer")


def test_readers_read_everything_back_with_disjoint_splits(demo_root):
  _, manifest = demo_root
  family = {"image": "image", "video": "video", "audiocaps": "audiocaps", "clotho": "clotho",
            "pc": "pc", "discrn": "discrn", "audio": "audiocaps"}
  for name, splits in manifest.items():
    size = getattr(SIZES, family[name.split("_")[0]])
    media = {}
    for s, split in enumerate(("train", "val")):
      examples = demo.read_demo(splits[split])
      assert len(examples) == size[s] and examples.num_skipped == 0, name
      media[split] = {p for e in examples for p in e.media_paths}
      assert all(Path(p).is_file() for p in media[split]), name
    assert not media["train"] & media["val"], name


def test_same_seed_same_files(demo_root, tmp_path):
  root, _ = demo_root
  other = tmp_path / "again"
  demo.write_demo_data(other, seed=0, sizes=SIZES)
  files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
  assert files == sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file())
  different = [f for f in files if f.name != "manifest.json"
               and not filecmp.cmp(root / f, other / f, shallow=False)]
  assert different == []


# ---- answers are in the media: small hand-written "oracles" read them back


def _image_answer(path):
  arr = np.asarray(Image.open(path).convert("RGB")).astype(int)
  bright = arr.max(axis=2) > 100
  ys, xs = np.nonzero(bright)
  colour = min(demo_media.RGB, key=lambda c: np.abs(arr[bright].mean(0) - demo_media.RGB[c]).sum())
  fill = bright.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
  shape = "square" if fill > 0.93 else "circle" if fill > 0.65 else "triangle"
  return colour, shape


def _render_shape(path):
  arr = np.asarray(Image.open(path).convert("L")).astype(int)
  dark = arr < 180
  ys, xs = np.nonzero(dark)
  h, w = np.ptp(ys) + 1, np.ptp(xs) + 1
  fill = dark.sum() / (h * w)
  if fill < 0.65:
    return "cone"
  if fill < 0.9:
    return "sphere"
  return "cube" if w / h > 0.75 else "cylinder"


def _pc_shape(path):
  p = pointcloud.pc_norm(pointcloud.load_points(path)).astype(np.float64)
  norms = np.linalg.norm(p, axis=1)
  if norms.std() / norms.mean() < 0.01:
    return "sphere"
  r = np.linalg.norm(p[:, :2], axis=1)
  z = p[:, 2]
  span = z.max() - z.min()
  if (r > 0.95 * r.max()).mean() > 0.5:
    return "cylinder"
  if (z > z.max() - 0.01 * span).mean() < 0.02:
    return "cone"
  return "cube"


def _video_motion(path):
  frames = video.read_frames(path, list(range(demo_media.VIDEO_FRAMES)),
                             size=demo_media.VIDEO_SIZE).astype(int)
  centres = []
  for f in frames:
    ys, xs = np.nonzero(f.max(axis=2) > 100)
    centres.append((xs.mean(), ys.mean()))
  dx, dy = np.subtract(centres[-1], centres[0]) / (len(centres) - 1)
  direction = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else (
      "down" if dy > 0 else "up")
  return direction, max(abs(dx), abs(dy))


def _audio_answer(path):
  wave = audio_io.load_waveform(path)
  spectrum = np.abs(np.fft.rfft(wave))
  peak = np.fft.rfftfreq(len(wave), 1 / 16000)[np.argmax(spectrum)]
  env = np.convolve(np.abs(wave), np.ones(160) / 160, mode="same") > 0.1
  onsets = np.count_nonzero(env[1:] & ~env[:-1]) / (len(wave) / 16000)
  return ("high" if peak > 800 else "low"), ("fast" if onsets > 4 else "slow")


def test_image_and_render_answers_are_in_the_pixels(demo_root):
  _, manifest = demo_root
  for split in ("train", "val"):
    for ex in demo.read_demo(manifest["image_qa"][split]):
      colour, shape = _image_answer(ex.media)
      assert ex.text_output[0] == (colour if "colour" in ex.text_input else shape), ex.media


def test_video_answers_are_in_the_motion(demo_root):
  _, manifest = demo_root
  for ex in demo.read_demo(manifest["video_caption"]["train"]):
    direction, speed = _video_motion(ex.media)
    assert ex.text_output.endswith(direction) and abs(speed - 3) < 0.5, ex.media


def test_audio_answers_are_in_the_sound(demo_root):
  _, manifest = demo_root
  for ex in demo.read_demo(manifest["audiocaps_qa"]["train"]):
    pitch, speed = _audio_answer(ex.media)
    assert ex.text_output == (pitch if "pitch" in ex.text_input else speed), ex.media
  for ex in demo.read_demo(manifest["clotho_caption"]["val"]):
    pitch, speed = _audio_answer(ex.media)
    assert all(pitch in c and speed in c for c in ex.text_output)


def test_point_cloud_answers_are_in_the_geometry(demo_root):
  _, manifest = demo_root
  for ex in demo.read_demo(manifest["pc_qa"]["train"]) + demo.read_demo(manifest["pc_qa"]["val"]):
    shape = _pc_shape(ex.media)
    expected = shape if "shape" in ex.text_input else demo_media.FLAT_FACES[shape]
    assert ex.text_output == expected, ex.media


def test_discrn_labels_point_at_the_right_entity(demo_root):
  _, manifest = demo_root
  examples = demo.read_demo(manifest["discrn_image_pc"]["train"])
  assert [e.label for e in examples] == [1, 0] * (len(examples) // 2)
  for ex in examples:
    shapes = (_render_shape(ex.media_paths[0]), _pc_shape(ex.media_paths[1]))
    target = ex.text_input.split()[-1].rstrip("?")
    assert ex.text_input.startswith("which of the two options is a")
    assert shapes[ex.label] == target and shapes[1 - ex.label] != target, ex
  for ex in demo.read_demo(manifest["discrn_video_audio"]["val"]):
    speeds = ("fast" if _video_motion(ex.media_paths[0])[1] > 3 else "slow",
              _audio_answer(ex.media_paths[1])[1])
    wanted = "fast" if "faster" in ex.text_input else "slow"
    assert speeds[ex.label] == wanted and speeds[1 - ex.label] != wanted, ex


def test_demo_specs_feed_the_pipeline(demo_root):
  _, manifest = demo_root
  media = pipeline.MediaOptions(image_size=32, npoints=64)
  specs = demo.demo_specs(manifest, "train", media=media)
  assert [s.name for s in specs] == sorted(manifest)
  by_name = {s.name: s for s in specs}
  assert by_name["video_qa"].media.video_hflip_prob == 0.0
  assert by_name["discrn_video_audio"].media.n_frms == 2
  assert by_name["audiocaps_qa"].binary_qa

  def encode(ex):
    return {"n_words": np.array(len(ex.text_input.split()), np.int32)}

  cfg = pipeline.PipelineConfig(batch_size=2, process_index=0, process_count=1, num_threads=2)
  it = iter(pipeline.build_pipeline(specs, encode, cfg))
  shapes = {"image": (2, 32, 32, 3), "video": (2, 5, 32, 32, 3), "audio": (2, 2, 512, 128),
            "pc": (2, 64, 3)}
  for _ in range(6):
    batch = next(it)
    media_keys = set(batch) & set(shapes)
    assert media_keys and batch["n_words"].shape == (2,)
    for key in media_keys:
      assert batch[key].shape[0] == 2 and batch[key].shape[-1] == shapes[key][-1]
  texts = demo.demo_texts(manifest)
  assert "first" in texts and any("square" in t for t in texts)
