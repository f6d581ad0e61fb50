"""Readers of the remaining training sets (OCR-VQA, LLaVA, WavCaps, AudioSet, WebVid) and the
dataset registry, on small files written here: each file holds a good record, a record with a
missing field and a record whose media file is absent."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from xblip_jax.config_utils import ConfigError
from xblip_jax.data import registry, templates
from xblip_jax.data.formats import audioset, coco, llava, ocrvqa, wavcaps, webvid


def _json(path, obj):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj))
  return path


def _touch(*paths):
  for p in paths:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")


def test_ocr_vqa_one_example_per_pair_and_missing_images_counted(tmp_path):
  ann = _json(tmp_path / "ocrvqa.json", {
      "111": {"questions": ["Who wrote this book?", "Is this a novel?"],
              "answers": ["Jane Doe", "Yes"], "title": "t"},
      "222": {"questions": ["What is the title?"], "answers": ["x"]},   # image absent
      "333": {"questions": ["a", "b"], "answers": ["only one"]},        # lists differ
      "444": {"answers": ["y"]},                                       # no questions
  })
  _touch(tmp_path / "img" / "111.jpg", tmp_path / "img" / "333.jpg", tmp_path / "img" / "444.jpg")
  ex = ocrvqa.read_ocr_vqa(ann, tmp_path / "img")
  assert [e.text_input for e in ex] == ["Who wrote this book?", "Is this a novel?"]
  assert [e.text_output for e in ex] == ["Jane Doe", "Yes"] and ex[1].answers == ("Yes",)
  assert ex[0].media == os.path.join(tmp_path / "img", "111.jpg") and ex[0].task == "qa"
  assert ex.skipped == {"missing media file": 1, "bad fields 'questions'/'answers'": 2}
  assert len(ocrvqa.read_ocr_vqa(ann, tmp_path / "img", require_media=False)) == 3


def test_llava_first_turn_blip_caption_cleaned(tmp_path):
  long_answer = " ".join(f"w{k}" for k in range(60)) + "."
  ann = _json(tmp_path / "llava.json", [
      {"id": "a", "image": "000000033471.jpg", "conversations": [
          {"from": "human", "value": "<image>\nWhat are the colors of the bus?"},
          {"from": "gpt", "value": "The bus is White and Red."},
          {"from": "human", "value": "second turn, unused"},
          {"from": "gpt", "value": "unused"}]},
      {"id": "b", "image": "b.jpg", "conversations": [
          {"from": "human", "value": "Describe it (briefly)!<image>"},
          {"from": "gpt", "value": long_answer}]},
      {"id": "c", "image": "c.jpg", "conversations": [{"from": "human", "value": "q"}]},
      {"id": "d", "conversations": []},
  ])
  ex = llava.read_llava_dialogue(ann, "/coco/train2017")
  assert len(ex) == 2
  assert ex.skipped == {"bad field 'conversations'": 1, "missing field 'image'": 1}
  assert ex[0].text_input == "what are the colors of the bus?"
  assert ex[0].text_output == "the bus is white and red"
  assert ex[1].text_input == "describe it briefly"
  assert ex[1].text_output.split() == [f"w{k}" for k in range(50)]  # cut to 50 words
  assert ex[0].media == os.path.join("/coco/train2017", "000000033471.jpg")
  # The examples are final: the registry turns the templates off for this dataset.
  assert registry.ENTRIES["llava150k_dialogue_instruct"].spec == {"instruct": False}


def test_wavcaps_source_folders_and_merged_list(tmp_path):
  audio = tmp_path / "audio"
  fsd = _json(tmp_path / "json_files" / "FreeSound" / "fsd_final.json", {
      "num_captions_per_audio": 1,
      "data": [{"id": "180913.wav", "caption": "Water drips.", "audio": "x", "duration": 3.0},
               {"id": "2.wav", "caption": "", "duration": 1.0},
               {"id": "3.wav", "caption": "Absent file.", "duration": 1.0}]})
  _touch(audio / "FreeSound_flac" / "180913.flac", audio / "FreeSound_flac" / "2.flac")
  ex = wavcaps.read_wavcaps(fsd, audio, require_media=True)
  assert [e.text_output for e in ex] == ["Water drips."]
  assert ex[0].media == os.path.join(audio, "FreeSound_flac", "180913.flac")
  assert ex[0].task == "caption" and ex[0].modality == "audio"
  assert ex.skipped == {"missing field 'caption'": 1, "missing media file": 1}
  multi = _json(tmp_path / "json_files" / "SoundBible" / "sb.json", {
      "num_captions_per_audio": 2, "data": [{"id": "7", "caption_1": "one", "caption_2": "two"}]})
  assert [e.text_output for e in wavcaps.read_wavcaps(multi, audio)] == ["one", "two"]
  merged = _json(tmp_path / "json_data.json", [
      {"id": "9", "caption": "a bell", "audio_path": "BBC_Sound_Effects_flac/9.flac"},
      {"id": "10", "caption": "no path"}])
  ex = wavcaps.read_wavcaps(merged, audio)
  assert ex[0].media == os.path.join(audio, "BBC_Sound_Effects_flac", "9.flac")
  assert ex.skipped == {"missing field 'audio_path'": 1}
  with pytest.raises(ValueError, match="WavCaps source"):
    wavcaps.source_folder("/data/other/x.json")


def test_audioset_segments_labels_and_files(tmp_path):
  seg = tmp_path / "balanced_train_segments.csv"
  seg.write_text(
      "# Segments csv created Sun Mar  5 10:54:31 2017\n"
      "# num_ytids=3, num_segs=3, num_unique_labels=3, num_positive_labels=4\n"
      "# YTID, start_seconds, end_seconds, positive_labels\n"
      '--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088"\n'
      'a_b_c123456, 0.000, 10.000, "/m/05zppz"\n'          # id with "_" (kept here)
      'zzzzzzzzzzz, 0.000, 10.000, "/m/unknown"\n'         # unknown label
      'yyyyyyyyyyy, 5.000, 15.000, "/m/09x0r"\n')          # audio file absent
  labels = tmp_path / "class_labels_indices.csv"
  with labels.open("w", newline="") as f:
    w = csv.writer(f)
    w.writerows([("index", "mid", "display_name"), (0, "/m/09x0r", "Speech"),
                 (1, "/t/dd00088", "Gush"), (2, "/m/05zppz", "Male speech, man speaking")])
  audio = tmp_path / "audio"
  _touch(audio / "--PJHxphWEs_30.0-40.0.wav", audio / "a_b_c123456_0.0-10.0.wav",
         audio / "zzzzzzzzzzz_0.0-10.0.wav")
  ex = audioset.read_audioset(seg, labels, audio)
  assert [e.text_output for e in ex] == [("Speech", "Gush"), ("Male speech, man speaking",)]
  assert ex[1].media == os.path.join(audio, "a_b_c123456_0.0-10.0.wav")
  assert ex.skipped == {"unknown label mid": 1, "missing media file": 1}
  assert ex[0].task == "classification"
  out = templates.instruct(ex[1], np.random.default_rng(0))
  assert out.text_output.endswith("a male speech, man speaking")
  assert out.text_input.lower() == out.text_input


def test_webvid_caption(tmp_path):
  ann = _json(tmp_path / "train.json", [
      {"videoid": 1066674, "name": "Aerial shot of a winter forest.", "page_dir": "p"},
      {"videoid": 7}])
  ex = webvid.read_webvid(ann, "/vid")
  assert len(ex) == 1 and ex.skipped == {"missing field 'name'": 1}
  assert ex[0].media == os.path.join("/vid", "1066674.mp4") and ex[0].modality == "video"
  assert ex[0].text_output == "Aerial shot of a winter forest."
  (tmp_path / "webvid.csv").write_text("videoid,contentUrl,duration,page_dir,name\n"
                                       "5,u,PT00H00M10S,d,A cat.\n")
  assert webvid.read_webvid(tmp_path / "webvid.csv", "/vid")[0].text_output == "A cat."


def test_caption_and_vqa_layouts_of_the_image_sets(tmp_path):
  """CC12M/SBU/VG/CapFilt captions and VG/OK/A-OK VQA through the COCO readers."""
  caps = _json(tmp_path / "cap.json", [
      {"image": "VG_100K/1.jpg", "caption": "a man on a horse"},
      {"image": str(tmp_path / "abs" / "2.jpg"), "caption": "absolute path (CapFilt)"}])
  ex = coco.read_coco_caption(caps, "/vg")
  assert ex[0].media == os.path.join("/vg", "VG_100K/1.jpg")
  assert ex[1].media == str(tmp_path / "abs" / "2.jpg")
  vqa = _json(tmp_path / "vqa.json", [
      {"image": "VG_100K/1.jpg", "question": "What color?", "answer": "brown",
       "dataset": "vg", "question_id": 1},
      {"image": "val2014/x.jpg", "question": "Which?", "question_id": 2,
       "direct_answers": ["cat", "cat", "dog"], "choices": ["cat", "dog"],
       "correct_choice_idx": 0}])
  ex = coco.read_coco_vqa(vqa, "/img")
  assert ex[0].text_output == ("brown",) and ex[0].answers == ("brown",)
  assert ex[1].text_output == ("cat", "dog")


def _image_root(tmp_path):
  root = tmp_path / "data"
  _json(root / "coco/annotations/coco_karpathy_train.json",
        [{"image": "a.jpg", "caption": "a cat"}, {"image": "b.jpg"}])
  _json(root / "coco/annotations/vqa_train.json",
        [{"image": "a.jpg", "question": "q?", "answer": ["x"], "question_id": 1}])
  _json(root / "coco/annotations/vqa_val.json",
        [{"image": "b.jpg", "question": "r?", "answer": ["y"], "question_id": 2}])
  return root


def test_registry_default_layout_overrides_and_errors(tmp_path):
  root = _image_root(tmp_path)
  found = registry.resolve("coco_caption_instruct", root)
  assert found.media == os.path.join(root, "coco/images") and not found.require_media
  ex = registry.read(found)
  assert len(ex) == 1 and ex.skipped == {"missing field 'caption'": 1}
  assert ex[0].dataset == "coco_caption_instruct"
  both = registry.read(registry.resolve("coco_vqa_instruct", root))  # train + val files
  assert [e.text_input for e in both] == ["q?", "r?"]

  moved = _json(tmp_path / "elsewhere" / "caps.json", [{"image": "c.jpg", "caption": "c"}])
  found = registry.resolve("coco_caption_instruct", root,
                           {"annotation": str(moved), "media": "imgs", "require_media": True})
  assert found.annotations == (str(moved),) and found.media == os.path.join(root, "imgs")
  ex = registry.read(found)
  assert len(ex) == 0 and ex.skipped == {"missing media file": 1}

  with pytest.raises(ConfigError, match=r"data.eval_datasets.*'coco_captoin'.*coco_vqa_instruct"):
    registry.resolve("coco_captoin", root, where="data.eval_datasets")
  with pytest.raises(ConfigError, match=r"data.paths.ok_vqa_instruct.annotation"):
    registry.resolve("ok_vqa_instruct", root)
  with pytest.raises(ConfigError, match=r"data.paths.coco_vqa_instruct.media_root"):
    registry.resolve("coco_vqa_instruct", root, {"media_root": "x"})


def test_registry_covers_every_released_training_set():
  import sys
  from conftest import REPO
  sys.path.insert(0, str(REPO / "configs"))
  import common  # pylint: disable=import-outside-toplevel
  for (size, modality), (_, _, _, datasets) in common.EXPERIMENTS.items():
    for name, _ in datasets:
      entry = registry.lookup(name, "data.train_datasets")
      assert entry.modalities == (modality,), (size, name)
      assert entry.family in registry.READERS and entry.split == "train"


def test_registry_eval_tasks_exist_with_the_same_modalities():
  from xblip_jax.eval import tasks  # pylint: disable=import-outside-toplevel
  assert registry.known_names("test") and registry.known_names("val")
  for name in registry.known_names():
    entry = registry.ENTRIES[name]
    if entry.split != "train":
      assert entry.eval_task, name  # every evaluation split is scored by a task
    if entry.eval_task:
      assert tasks.TASKS[entry.eval_task].modalities == entry.modalities, name
