"""The demo's classification sets: ESC-50 and ModelNet40 layouts read back by the real
readers, classes that the media carry (pitch and rhythm; 3D shape)."""

from __future__ import annotations

import numpy as np
import soundfile as sf

from xblip_jax.data import demo, demo_classification, demo_media
from xblip_jax.eval import tasks


def test_sets_are_read_back_with_their_classes_in_the_media(tmp_path, monkeypatch):
  monkeypatch.setenv("XBLIP_CACHE_DIR", str(tmp_path / "cache"))
  manifest = {}
  for s, (split, n) in enumerate((("train", 6), ("val", 12))):
    rng = np.random.default_rng([0, s])
    demo_classification.esc50_split(tmp_path, split, n, rng, manifest)
    demo_classification.modelnet40_split(tmp_path, split, n, rng, manifest)
  for name in (demo_classification.AUDIO_SET, demo_classification.PC_SET):
    assert tasks.for_eval_set(name).metric == "class_rank"
    seen = {split: demo.read_demo(manifest[name][split]) for split in ("train", "val")}
    assert [len(seen["train"]), len(seen["val"])] == [6, 12], name
    assert not {e.media for e in seen["train"]} & {e.media for e in seen["val"]}, name
  audio = demo.read_demo(manifest["audio_cls"]["val"])
  assert audio[0].meta["classnames"] == ("fast high beeps", "fast low beeps", "slow high beeps",
                                         "slow low beeps")
  for ex in audio:  # the dominant frequency says the pitch
    wave, rate = sf.read(ex.media)
    peak = np.argmax(np.abs(np.fft.rfft(wave))) * rate / len(wave)
    pitch = "high" if abs(peak - demo_media.PITCH_HZ["high"]) < 100 else "low"
    assert pitch in ex.label.split() and ex.label.endswith("beeps")
  shapes = demo.read_demo(manifest["pc_cls"]["val"])
  assert shapes[0].meta["classnames"] == demo_media.SHAPES_3D
  assert {e.label for e in shapes} <= set(demo_media.SHAPES_3D)
  for ex in shapes:  # only a sphere has all its points at one distance from the centre
    xyz = np.load(ex.media)
    radius = np.linalg.norm(xyz - xyz.mean(axis=0), axis=1)
    assert (radius.std() / radius.mean() < 0.02) == (ex.label == "sphere"), ex.label
