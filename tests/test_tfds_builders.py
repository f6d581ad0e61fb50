"""TFDS ArrayRecord builders: shards from real-format files read back through the pipeline
give the batches the raw files give; bad media are left out and counted; no TensorFlow."""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
import sys

import numpy as np
import pytest

from xblip_jax.data import demo
from xblip_jax.data import pipeline as P
from xblip_jax.data.example import Example, Examples
from xblip_jax.data.tfds import builders, prepare, records, source

TEXT_LEN = 64
SMALL = P.MediaOptions(image_size=24, n_frms=3, frames_per_clip=16, npoints=48)
FAMILY = {"coco_caption": "image", "coco_vqa": "image", "video_caption": "video",
          "video_qa": "video", "audiocaps": "audio", "audiocaps_qa": "audio", "clotho": "audio",
          "cap3d_caption": "pc", "cap3d_qa": "pc", "discrn_objaverse": "discrn",
          "discrn_audiocaps": "discrn"}


def encode_text(example: Example) -> dict[str, np.ndarray]:
  """Id, instruction and target as fixed-length bytes: enough to compare texts exactly."""
  text = f"{example.id}|{example.text_input}|{example.text_output}".encode()[:TEXT_LEN]
  return {"text": np.frombuffer(text.ljust(TEXT_LEN, b"\0"), np.uint8).copy()}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """Demo datasets in their real formats, and their shards (one dataset per family member)."""
  root = tmp_path_factory.mktemp("raw")
  sizes = demo.DemoSizes(image=(6, 1), video=(4, 1), audiocaps=(4, 1), clotho=(1, 1),
                         pc=(4, 1), discrn=(4, 1))
  manifest = demo.write_demo_data(root, sizes=sizes)
  out = tmp_path_factory.mktemp("shards")
  datasets = {}
  for name in ("image_qa", "video_caption", "audiocaps_qa", "pc_qa", "discrn_image_pc",
               "discrn_video_audio"):
    entry = manifest[name]["train"]
    media = dataclasses.replace(SMALL, **entry.options)
    examples = demo.read_demo(entry)
    directory = builders.prepare(FAMILY[entry.reader], name, {"train": examples}, out,
                                 media=media)
    raw = P.DatasetSpec(name, examples, media=media, **entry.spec)
    shards = source.spec_from_shards(directory, "train", media=media, **entry.spec)
    datasets[name] = (raw, shards, directory)
  return manifest, datasets


def _cfg(**kw):
  return P.PipelineConfig(**{**dict(batch_size=2, seed=3, process_index=0, process_count=1,
                                    num_threads=2, min_records_checked=4), **kw})


def _batches(specs, n, **kw):
  it = iter(P.build_pipeline(specs, encode_text, _cfg(**kw)))
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_shards_keep_every_example_in_reader_order(prepared):
  _, datasets = prepared
  for name, (raw, shards, directory) in datasets.items():
    assert shards.name == name and len(shards.examples) == len(raw.examples)
    for original, read in zip(raw.examples, shards.examples):
      assert isinstance(read, records.ShardExample)
      assert read.replace(media_bytes=()) == records.ShardExample(**vars(original))
      for path, blob in zip(original.media_paths, read.media_bytes):
        with open(path, "rb") as f:
          assert f.read() == blob
    counts = source.preparation_counts(directory)["train"]
    assert counts == {"kept": len(raw.examples), "bad": {}, "reader_skipped": {}}


def test_pipeline_over_shards_gives_the_raw_files_batches(prepared):
  _, datasets = prepared
  raw = [d[0] for d in datasets.values()]
  shards = [d[1] for d in datasets.values()]
  # Train transforms (random crops, frames, FPS start, templates) and the dataset mixing.
  train = _batches(shards, 10)
  assert {k for b in train for k in b} >= {"image", "video", "audio", "pc"}
  _assert_same(_batches(raw, 10), train)
  # Eval transforms, one dataset.
  _assert_same(_batches(raw[:1], 3, train=False), _batches(shards[:1], 3, train=False))


def test_corrupt_and_missing_media_are_left_out_and_counted(prepared, tmp_path):
  manifest, _ = prepared
  good = demo.read_demo(manifest["image_caption"]["train"])
  broken = tmp_path / "broken.jpg"
  with open(good[0].media_paths[0], "rb") as f:
    broken.write_bytes(f.read()[:40])  # truncated image
  shutil.copy(good[1].media_paths[0], tmp_path / "fine.png")
  items = [good[2], good[0].replace(media=str(broken), id="broken"),
           good[1].replace(media=str(tmp_path / "gone.png"), id="gone"), good[3]]
  examples = Examples(items, skipped={"missing field 'caption'": 2})
  directory = builders.prepare("image", "with_bad", {"train": examples}, tmp_path / "out",
                               media=SMALL, max_bad_fraction=0.5)
  counts = source.preparation_counts(directory)["train"]
  assert counts["kept"] == 2
  assert counts["bad"] == {"cannot decode image": 1, "file not found": 1}
  assert counts["reader_skipped"] == {"missing field 'caption'": 2}
  assert [e.id for e in source.shard_examples(directory)] == [good[2].id, good[3].id]
  with pytest.raises(P.TooManyBadRecordsError, match="2 of 4"):
    builders.prepare("image", "too_bad", {"train": examples}, tmp_path / "out", media=SMALL,
                     max_bad_fraction=0.25)
  with pytest.raises(ValueError, match="modalities"):
    builders.prepare("audio", "wrong_family", {"train": good[:1]}, tmp_path / "out")


def test_record_round_trip_keeps_tuples_and_bytes():
  ex = Example("7", ("image", "pc"), ("a/x.png", "b/y_8192.npz"), "discrn", text_input="q?",
               text_output="first", answers=("first", "a"), label=0, dataset="d",
               meta={"sample_ids": ("x", "y"), "start_seconds": None,
                     "captions_pred": {"pc": ("c", None)}, "list": [1, 2.5]})
  blobs = (b"\x89PNG\x00", b"PK\x03\x04\xff")
  record = records.to_record(ex, blobs)
  back = records.from_record({"annotation": record["annotation"].encode(),
                              "media": record["media"]})
  assert back.replace(media_bytes=()) == records.ShardExample(**vars(ex))
  assert back.media_bytes == blobs


def test_cli_writes_a_tfds_dataset_and_no_tensorflow(prepared, tmp_path, capsys):
  manifest, datasets = prepared
  entry = manifest["discrn_image_pc"]["train"]
  result = prepare.main([
      "--family", "discrn", "--format", entry.reader, "--input", f"train={entry.annotation}",
      "--media-root", f"image={entry.media_root['image']}",
      "--media-root", f"pc={entry.media_root['pc']}", "--output", str(tmp_path),
      "--name", "cli_discrn"])
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
  assert result["counts"]["train"]["kept"] == len(datasets["discrn_image_pc"][0].examples)
  shards = source.shard_examples(result["directory"])
  assert [e.id for e in shards] == [e.id for e in datasets["discrn_image_pc"][0].examples]
  # A dataset of the experiment configs, located under data.root as training locates it.
  pc = manifest["pc_caption"]["train"]
  root = tmp_path / "lavis"
  (root / "objaverse" / "annotations").mkdir(parents=True)
  shutil.copy(pc.annotation, root / "objaverse" / "annotations" / "train.csv")
  (root / "objaverse" / "pc").symlink_to(pc.media_root)
  located = prepare.main(["--dataset", "objaverse_mm_caption_instruct", "--root", str(root),
                          "--output", str(tmp_path / "registry")])
  assert "xblip_pc" in located["directory"]
  assert [e.id for e in source.shard_examples(located["directory"])] == [
      e.id for e in demo.read_demo(pc)]
  # Worker processes get the source pickled.
  assert pickle.loads(pickle.dumps(shards))[1].id == shards[1].id
  assert "tensorflow" not in sys.modules
