"""Per-modality loading and preprocessing: shapes, reference rules, and MediaError on bad files."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from xblip_jax.data.example import MediaError
from xblip_jax.data.preprocess import audio_io, image, pointcloud, video

# ---------------------------------------------------------------- image


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "RGBA", "CMYK", "P", "I;16", "1"])
@pytest.mark.parametrize("size", [(224, 224), (50, 300), (300, 50), (17, 9)])
def test_image_any_mode_and_size_gives_224_rgb(tmp_path, mode, size):
  rng = np.random.default_rng(0)
  img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
  img = img.convert(mode) if mode != "I;16" else img.convert("L").convert("I;16")
  if mode == "P":
    img.info["transparency"] = 0
  path = tmp_path / ("x.tiff" if mode in ("I;16", "CMYK") else "x.png")
  img.save(path)
  for train in (False, True):
    out = image.preprocess_image(path, train=train, rng=np.random.default_rng(1))
    assert out.shape == (224, 224, 3) and out.dtype == np.float32
    assert np.isfinite(out).all()


def test_clip_normalisation_by_hand(tmp_path):
  path = tmp_path / "solid.png"
  Image.new("RGB", (300, 200), (255, 128, 0)).save(path)
  expected = np.array([(1.0 - 0.48145466) / 0.26862954,
                       (128 / 255 - 0.4578275) / 0.26130258,
                       (0.0 - 0.40821073) / 0.27577711], np.float32)
  for train in (False, True):
    out = image.preprocess_image(path, train=train, rng=np.random.default_rng(0), size=32)
    assert out.shape == (32, 32, 3)
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), atol=1e-6)


def test_resize_and_crop_follow_torchvision_rules():
  assert image.resize_short_side(Image.new("RGB", (300, 200)), 224).size == (336, 224)
  assert image.resize_short_side(Image.new("RGB", (225, 500)), 224).size == (224, 497)
  # A 3-px-wide bright column at x=110..112 of a 224x224 crop of a 336-wide image stays put.
  arr = np.zeros((224, 336, 3), np.uint8)
  arr[:, 56 + 110:56 + 113] = 255
  out = image.center_crop(Image.fromarray(arr), 224)
  cols = np.nonzero(np.asarray(out)[0, :, 0])[0]
  assert out.size == (224, 224) and cols.tolist() == [110, 111, 112]


def test_random_resized_crop_box_is_seeded_and_in_range():
  boxes = [image.random_resized_crop_box(400, 300, np.random.default_rng(s)) for s in range(50)]
  assert boxes == [image.random_resized_crop_box(400, 300, np.random.default_rng(s))
                   for s in range(50)]
  for left, top, w, h in boxes:
    assert 0 <= left and left + w <= 400 and 0 <= top and top + h <= 300
    assert 0.88 <= w * h / (400 * 300) <= 1.0
    assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02


def test_corrupt_and_missing_images_raise_media_error(tmp_path):
  good = tmp_path / "good.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(good)
  truncated = tmp_path / "truncated.png"
  truncated.write_bytes(good.read_bytes()[:200])
  garbage = tmp_path / "garbage.jpg"
  garbage.write_bytes(b"not an image at all")
  for path in (truncated, garbage, tmp_path / "missing.png"):
    with pytest.raises(MediaError) as info:
      image.preprocess_image(path, train=False, rng=None)
    assert str(path) in str(info.value) and info.value.path == str(path)

# ---------------------------------------------------------------- video


def test_train_frame_indices_headtail():
  for seed in range(20):
    idx = video.train_frame_indices(100, 5, np.random.default_rng(seed))
    assert len(idx) == 5 and idx[4] == idx[3]
    assert 0 <= idx[0] < idx[1] < 50 <= idx[2] < idx[3] < 100
  assert video.train_frame_indices(100, 5, np.random.default_rng(3)) == \
      video.train_frame_indices(100, 5, np.random.default_rng(3))
  idx = video.train_frame_indices(100, 4, np.random.default_rng(0))
  assert len(set(idx)) == 4
  short = video.train_frame_indices(3, 5, np.random.default_rng(0))  # fewer frames than wanted
  assert len(short) == 5 and short[0] == 0 and short[1] in (1, 2) and len(set(short[1:])) == 1
  assert len(video.train_frame_indices(10, 1, np.random.default_rng(0))) == 1


def test_eval_frame_indices_head_tail_uniform():
  assert video.eval_frame_indices(100, 5) == [0, 25, 50, 75, 99]
  assert video.eval_frame_indices(100, 5, reference_quirks=True) == [0, 25, 50, 75, 75]
  assert video.eval_frame_indices(10, 2) == [0, 9]
  assert video.eval_frame_indices(3, 5) == [0, 0, 0, 0, 2]
  assert video.eval_frame_indices(7, 1) == [0]


def _grey_video(path, n=8, size=32):
  import av
  with av.open(str(path), "w") as c:
    s = c.add_stream("libx264", rate=8, options={"crf": "0", "threads": "1"})
    s.width = s.height = size
    s.pix_fmt = "yuv420p"
    for t in range(n):
      frame = np.full((size, size, 3), 20 + 25 * t, np.uint8)
      for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        c.mux(p)
    for p in s.encode():
      c.mux(p)


def test_video_decoding_reads_the_right_frames(tmp_path):
  path = tmp_path / "grey.mp4"
  _grey_video(path)
  assert video.count_frames(path) == 8
  frames = video.read_frames(path, [7, 0, 3, 3, 20], size=16)
  assert frames.shape == (5, 16, 16, 3) and frames.dtype == np.uint8
  levels = frames.reshape(5, -1).mean(axis=1)
  np.testing.assert_allclose(levels, [20 + 25 * t for t in (7, 0, 3, 3, 7)], atol=3)
  ev = video.preprocess_video(path, train=False, rng=None, n_frms=4, size=24)
  assert ev.shape == (4, 24, 24, 3) and ev.dtype == np.float32
  tr = video.preprocess_video(path, train=True, rng=np.random.default_rng(0), n_frms=5, size=24)
  assert tr.shape == (5, 24, 24, 3)
  np.testing.assert_array_equal(tr[3], tr[4])  # headtail: 4 distinct frames, last repeated


def test_corrupt_and_missing_videos_raise_media_error(tmp_path):
  good = tmp_path / "good.mp4"
  _grey_video(good)
  truncated = tmp_path / "truncated.mp4"
  truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
  garbage = tmp_path / "garbage.mp4"
  garbage.write_bytes(b"\x00\x01garbage" * 50)
  for path in (truncated, garbage, tmp_path / "missing.mp4"):
    with pytest.raises(MediaError) as info:
      video.preprocess_video(path, train=False, rng=None, n_frms=2, size=16)
    assert str(path) in str(info.value)

# ---------------------------------------------------------------- point clouds


def test_pc_norm_centres_and_scales_to_unit_sphere():
  pts = np.random.default_rng(0).normal(size=(500, 3)) * [3, 1, 2] + 7
  out = pointcloud.pc_norm(pts.astype(np.float32))
  np.testing.assert_allclose(out.mean(axis=0), 0, atol=1e-5)
  assert abs(np.linalg.norm(out, axis=1).max() - 1.0) < 1e-5
  with pytest.raises(ValueError, match="degenerate"):
    pointcloud.pc_norm(np.ones((10, 3), np.float32))


def test_sampling_more_fewer_and_equal_points():
  rng = np.random.default_rng(0)
  # Two far-apart clusters, one tiny: FPS keeps both (a random subset would rarely).
  pts = np.concatenate([rng.normal(size=(990, 3)) * 0.01, rng.normal(size=(10, 3)) * 0.01 + 5])
  fps = pointcloud.sample_points(pts, 16, np.random.default_rng(1))
  assert fps.shape == (16, 3) and (fps[:, 0] > 2).sum() >= 1 and (fps[:, 0] < 2).sum() >= 1
  np.testing.assert_array_equal(fps, pointcloud.sample_points(pts, 16, np.random.default_rng(1)))
  few = pointcloud.sample_points(pts[:100], 256, np.random.default_rng(2))
  assert few.shape == (256, 3)
  assert {tuple(p) for p in pts[:100]} <= {tuple(p) for p in few}  # every point kept
  same = pointcloud.sample_points(pts[:64], 64, np.random.default_rng(3))
  assert sorted(map(tuple, same)) == sorted(map(tuple, pts[:64]))


def _textbook_fps(points, npoints, rng):
  """The straightforward O(N * npoints) loop the fast version must match pick for pick."""
  xyz = points[:, :3].astype(np.float64)
  chosen, distance = [], np.full(len(xyz), np.inf)
  current = int(rng.integers(len(xyz)))
  for _ in range(npoints):
    chosen.append(current)
    distance = np.minimum(distance, ((xyz - xyz[current]) ** 2).sum(axis=1))
    current = int(np.argmax(distance))
  return points[chosen]


def _clouds():
  rng = np.random.default_rng(5)
  yield "gaussian", rng.normal(size=(3000, 3)).astype(np.float32), 700
  yield "one block", rng.uniform(size=(130, 6)).astype(np.float32), 100
  yield "anisotropic", (rng.normal(size=(5000, 3)) * [10, 1, 0.01]).astype(np.float32), 1200
  surface = rng.normal(size=(2500, 3))
  yield "sphere", (surface / np.linalg.norm(surface, axis=1, keepdims=True)).astype(
      np.float32), 2400
  # Integer grid with duplicates and a flat axis: many exactly equal distances (ties).
  grid = rng.integers(0, 6, size=(4000, 3)).astype(np.float32)
  grid[:, 2] = 0
  yield "ties", np.concatenate([grid, grid[:500]]), 300


@pytest.mark.parametrize("name", [c[0] for c in _clouds()])
def test_fast_fps_picks_what_the_textbook_loop_picks(name):
  points, npoints = next((p, k) for c, p, k in _clouds() if c == name)
  for seed in range(2):
    fast = pointcloud.farthest_point_sample(points, npoints, np.random.default_rng(seed))
    slow = _textbook_fps(points, npoints, np.random.default_rng(seed))
    np.testing.assert_array_equal(fast, slow)


def test_point_cloud_files_npz_npy_ply(tmp_path):
  rng = np.random.default_rng(0)
  xyzrgb = np.concatenate([rng.normal(size=(300, 3)), rng.uniform(size=(300, 3))], axis=1)
  np.savez(tmp_path / "a_8192.npz", arr_0=xyzrgb.astype(np.float32))
  np.save(tmp_path / "b.npy", xyzrgb[:, :3])
  from plyfile import PlyData, PlyElement
  vertex = np.array([tuple(p) for p in xyzrgb[:, :3]], dtype=[("x", "f4"), ("y", "f4"),
                                                                ("z", "f4")])
  PlyData([PlyElement.describe(vertex, "vertex")]).write(str(tmp_path / "c.ply"))
  outs = [pointcloud.preprocess_pc(tmp_path / name, rng=np.random.default_rng(0), npoints=128)
          for name in ("a_8192.npz", "b.npy", "c.ply")]
  for out in outs:
    assert out.shape == (128, 3) and out.dtype == np.float32
    assert np.linalg.norm(out, axis=1).max() <= 1.0 + 1e-5
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-6)
  np.testing.assert_allclose(outs[0], outs[2], atol=1e-6)


def test_bad_point_clouds_raise_media_error_naming_the_file(tmp_path):
  pts = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
  pts[7, 1] = np.nan
  np.savez(tmp_path / "nan.npz", arr_0=pts)
  np.save(tmp_path / "inf.npy", np.where(np.isnan(pts), np.inf, pts))
  np.savez(tmp_path / "nokey.npz", points=pts)
  (tmp_path / "garbage.npz").write_bytes(b"PK\x03\x04 broken")
  np.save(tmp_path / "flat.npy", np.zeros((10,), np.float32))
  np.save(tmp_path / "same.npy", np.ones((10, 3), np.float32))
  cases = {"nan.npz": "NaN", "inf.npy": "inf", "nokey.npz": "arr_0", "garbage.npz": "",
           "flat.npy": "shape", "same.npy": "degenerate", "missing.npz": "not found"}
  for name, words in cases.items():
    with pytest.raises(MediaError) as info:
      pointcloud.preprocess_pc(tmp_path / name, rng=np.random.default_rng(0), npoints=16)
    assert str(tmp_path / name) in str(info.value) and words in str(info.value)

# ---------------------------------------------------------------- audio


def _peak_hz(wave, rate=16000):
  spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
  return np.fft.rfftfreq(len(wave), 1 / rate)[np.argmax(spectrum)]


@pytest.mark.parametrize("rate,ext,channels", [(32000, "flac", 2), (44100, "wav", 1),
                                               (16000, "wav", 2), (48000, "flac", 1)])
def test_decode_and_resample_keeps_the_frequency(tmp_path, rate, ext, channels):
  t = np.arange(int(rate * 1.5)) / rate
  wave = 0.5 * np.sin(2 * np.pi * 1000.0 * t)
  data = np.stack([wave] * channels, axis=1) if channels > 1 else wave
  path = tmp_path / f"sine.{ext}"
  sf.write(path, data, rate, subtype="PCM_16")
  out = audio_io.load_waveform(path)
  assert out.dtype == np.float32 and out.ndim == 1
  assert abs(len(out) - 24000) <= 1
  assert abs(_peak_hz(out) - 1000.0) < 2.0
  assert abs(np.abs(out[2000:-2000]).max() - 0.5) < 0.01  # amplitude kept, channels averaged


def test_mp4_audio_track_and_clips(tmp_path):
  import av
  rate, path = 48000, tmp_path / "clip.mp4"
  wave = (0.4 * np.sin(2 * np.pi * 440.0 * np.arange(rate * 2) / rate)).astype(np.float32)
  with av.open(str(path), "w") as c:
    s = c.add_stream("aac", rate=rate)
    s.layout = "stereo"
    for i in range(0, len(wave), 1024):
      frame = av.AudioFrame.from_ndarray(np.stack([wave[i:i + 1024]] * 2), format="fltp",
                                         layout="stereo")
      frame.sample_rate = rate
      for p in s.encode(frame):
        c.mux(p)
    for p in s.encode():
      c.mux(p)
  out = audio_io.load_waveform(path)
  assert abs(len(out) / 16000 - 2.0) < 0.1 and abs(_peak_hz(out) - 440.0) < 3.0
  clips, clip_mask, padding = audio_io.preprocess_audio(path)
  assert clips.shape == (2, 512, 128) and clips.dtype == np.float32
  assert clip_mask.tolist() == [True, False]  # 2 s = ~200 frames: the second clip is padding
  assert padding.shape == (2, 512) and padding[1].all() and not padding[0, :150].any()


def test_corrupt_and_missing_audio_raise_media_error(tmp_path):
  (tmp_path / "garbage.flac").write_bytes(b"fLaC garbage" * 20)
  (tmp_path / "garbage.wav").write_bytes(b"RIFF....WAVE" + b"\x00" * 10)
  (tmp_path / "garbage.mp4").write_bytes(b"\x00" * 100)
  sf.write(tmp_path / "tiny.wav", np.zeros(100), 16000)
  tone = 0.5 * np.sin(np.arange(32000) / 5.0)
  for ext in ("flac", "wav"):
    sf.write(tmp_path / f"full.{ext}", tone, 16000)
    data = (tmp_path / f"full.{ext}").read_bytes()
    (tmp_path / f"cut.{ext}").write_bytes(data[:len(data) // 2])
  assert audio_io.load_waveform(tmp_path / "full.wav").shape == (32000,)
  for name in ("garbage.flac", "garbage.wav", "garbage.mp4", "tiny.wav", "missing.flac",
               "cut.flac", "cut.wav"):
    with pytest.raises(MediaError) as info:
      audio_io.preprocess_audio(tmp_path / name)
    assert str(tmp_path / name) in str(info.value)
