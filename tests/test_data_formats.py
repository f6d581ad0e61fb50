"""Readers of the reference annotation formats, on small files written here."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from xblip_jax.data import templates
from xblip_jax.data.example import Example, Examples
from xblip_jax.data.formats import audiocaps, clotho, coco, discrn, msrvtt, objaverse, read_records


def _json(path, obj):
  path.write_text(json.dumps(obj))
  return path


def _csv(path, header, rows):
  with path.open("w", newline="") as f:
    w = csv.writer(f)
    if header:
      w.writerow(header)
    w.writerows(rows)
  return path


def test_read_records_json_dict_like_lavis(tmp_path):
  p = _json(tmp_path / "a.json", {"u1": {"caption": "x"}, "u2": "plain"})
  assert read_records(p) == [{"sample_id": "u1", "caption": "x"},
                             {"sample_id": "u2", "data": "plain"}]
  (tmp_path / "b.jsonl").write_text('{"a": 1}\n\n{"a": 2}\n')
  assert read_records(tmp_path / "b.jsonl") == [{"a": 1}, {"a": 2}]


def test_coco_caption_and_vqa(tmp_path):
  caps = _json(tmp_path / "cap.json", [
      {"image": "val2014/a.jpg", "caption": "A dog.", "image_id": "coco_1"},
      {"image": "val2014/b.jpg", "caption": ["one", "two"], "image_id": "coco_2"},
      {"image": "val2014/c.jpg"},                       # no caption
      {"caption": "no image"},                          # no image
      {"image": "val2014/d.jpg", "caption": "   "},     # empty caption
  ])
  ex = coco.read_coco_caption(caps, "/img")
  assert isinstance(ex, Examples) and len(ex) == 2
  assert ex.skipped == {"missing field 'caption'": 2, "missing field 'image'": 1}
  assert ex.num_skipped == 3
  assert ex[0].media == os.path.join("/img", "val2014/a.jpg") and ex[0].text_output == "A dog."
  assert ex[1].text_output == ("one", "two") and ex[1].meta["image_id"] == "coco_2"
  assert ex[0].modality == "image" and ex[0].task == "caption"

  vqa = _json(tmp_path / "vqa.json", [
      {"image": "a.jpg", "question": "What?", "answer": ["yes", "yes", "no"], "question_id": 7},
      {"image": "b.jpg", "question": "Who?", "direct_answers": ["me"], "question_id": 8},
      {"image": "c.jpg", "answer": ["x"]},
  ])
  ex = vqa_ex = coco.read_coco_vqa(vqa, "/img")
  assert len(ex) == 2 and ex.skipped == {"missing field 'question'": 1}
  assert vqa_ex[0].id == "7" and vqa_ex[0].text_input == "What?"
  assert vqa_ex[0].text_output == ("yes", "no") and vqa_ex[0].answers == ("yes", "yes", "no")
  assert vqa_ex[1].answers == ("me",)


def test_msrvtt_caption_and_qa(tmp_path):
  caps = _json(tmp_path / "cap_train.json", [
      {"video": "video1.mp4", "caption": "a man sings", "image_id": "video1"},
      {"video": "video2.mp4"},
  ])
  ex = msrvtt.read_video_caption(caps, "/vid")
  assert len(ex) == 1 and ex.skipped == {"missing field 'caption'": 1}
  assert ex[0].media == os.path.join("/vid", "video1.mp4") and ex[0].modality == "video"
  qa = _json(tmp_path / "qa_train.json", [
      {"video": "video1.mp4", "question": "what is he doing", "answer": "sing",
       "question_id": 3},
      {"video": "video1.mp4", "question": "who", "answer": None},
  ])
  ex = msrvtt.read_video_qa(qa, "/vid")
  assert len(ex) == 1 and ex.skipped == {"missing field 'answer'": 1}
  assert ex[0].id == "3" and ex[0].text_output == ("sing",) and ex[0].task == "qa"


def test_audiocaps_caption_qa_and_file_names(tmp_path):
  header = ("audiocap_id", "youtube_id", "start_time", "caption")
  p = _csv(tmp_path / "train.csv", header, [
      (91139, "r1nicOVtvkQ", 130, "A woman talks"),
      (58146, "UDGBjjwyaqE", 20.0, "Water flows"),
      (11, "UDGBjjwyaqE", 20, "Water runs"),
      (12, "", 20, "no id"),
      (13, "abc", "", "no start"),
      (14, "abc", "x", "bad start"),
  ])
  ex = audiocaps.read_audiocaps(p, "/au")
  assert len(ex) == 3
  assert ex.skipped == {"missing field 'youtube_id'": 1, "missing field 'start_time'": 1,
                        "bad field 'start_time'": 1}
  assert ex[0].media == os.path.join("/au", "r1nicOVtvkQ_130.flac")
  assert ex[1].media == os.path.join("/au", "UDGBjjwyaqE_20.flac")
  assert ex[0].id == "91139" and ex[0].meta["caption"] == "A woman talks"
  grouped = audiocaps.read_audiocaps(p, "/au", one_per_clip=True)
  assert len(grouped) == 2 and grouped[1].text_output == ("Water flows", "Water runs")
  assert len(audiocaps.read_audiocaps(p, "/au", exclude_ids={"r1nicOVtvkQ"})) == 2

  qa = _csv(tmp_path / "qa.csv", (*header, "question", "answer"), [
      (1, "r1nicOVtvkQ", 130, "A woman talks", "Who talks?", "a woman"),
      (2, "r1nicOVtvkQ", 130, "A woman talks", "", "x"),
  ])
  ex = audiocaps.read_audiocaps_qa(qa, "/au")
  assert len(ex) == 1 and ex.skipped == {"missing field 'question'": 1}
  assert ex[0].text_input == "Who talks?" and ex[0].text_output == "a woman"


def test_audiocaps_require_media(tmp_path):
  (tmp_path / "abc_10.flac").write_bytes(b"")
  p = _csv(tmp_path / "t.csv", ("audiocap_id", "youtube_id", "start_time", "caption"),
           [(1, "abc", 10, "x"), (2, "def", 10, "y")])
  ex = audiocaps.read_audiocaps(p, tmp_path, require_media=True)
  assert [e.id for e in ex] == ["1"] and ex.skipped == {"missing media file": 1}


def test_clotho_and_clotho_aqa(tmp_path):
  header = ("file_name", *clotho.CAPTION_KEYS)
  p = _csv(tmp_path / "clotho_captions_evaluation.csv", header, [
      ("a.wav", "c1", "c2", "c3", "c4", "c5"),
      ("b.wav", "c1", "c2", "", "c4", "c5"),
  ])
  ex = clotho.read_clotho(p, "/clotho/evaluation")
  assert len(ex) == 1 and ex.skipped == {"missing field 'caption_3'": 1}
  assert ex[0].text_output == ("c1", "c2", "c3", "c4", "c5")
  assert ex[0].media == os.path.join("/clotho/evaluation", "a.wav")
  aqa = _csv(tmp_path / "aqa.csv", ("file_name", "QuestionText", "answer"), [
      ("a.wav", "is it loud", "yes"), ("a.wav", "is it loud", "yes"), ("a.wav", "is it loud", "no"),
      ("b.wav", "what", "dog"), ("b.wav", "what", "dog"),
  ])
  ex = clotho.read_clotho_aqa(aqa, "/c")
  assert len(ex) == 1 and ex[0].answers == ("yes", "yes", "no")
  assert ex.skipped == {"incomplete answer group": 1}


def test_cap3d_caption_with_and_without_header_and_qa(tmp_path):
  p = _csv(tmp_path / "cap.csv", ("sample_id", "data"), [("u1", "a chair"), ("u2", "")])
  ex = objaverse.read_cap3d_caption(p, "/pc")
  assert len(ex) == 1 and ex.skipped == {"missing field 'caption'": 1}
  assert ex[0].media == os.path.join("/pc", "u1", "u1_8192.npz") and ex[0].text_output == "a chair"
  raw = _csv(tmp_path / "Cap3D_automated.csv", None, [("u3", "a red car"), ("u4",)])
  ex = objaverse.read_cap3d_caption(raw, "/pc")
  assert [e.id for e in ex] == ["u3"] and ex.num_skipped == 1
  npy = objaverse.read_cap3d_caption(p, "/pc", pattern="{uid}.npy")
  assert npy[0].media == os.path.join("/pc", "u1.npy")

  qa = _csv(tmp_path / "qa.csv", ("sample_id", "caption", "question", "answer", "extractive"), [
      ("u1", "a chair", "what is it", "a chair", "True"),
      ("u2", "a model plane", "what is it", "a model plane", "True"),
      ("u3", "x", "", "y", "True"),
  ])
  ex = objaverse.read_cap3d_qa(qa, "/pc", remove_model_answer=True)
  assert [e.meta["sample_id"] for e in ex] == ["u1"]
  assert ex.skipped == {"answer mentions 'model'": 1, "missing field 'question'": 1}
  assert ex[0].meta["caption"] == "a chair"


def _discrn_records(n):
  return [{"sample_ids": [f"a{k}", f"b{k}"], "question": "which entity is louder",
           "label": k % 2, "properties": [["pa"], ["pb"]], "captions": [f"ca{k}", f"cb{k}"],
           "captions_pred_video": [f"va{k}", f"vb{k}"], "captions_pred_audio": [f"xa{k}", f"xb{k}"],
           "start_seconds": [10, 20.0]} for k in range(n)]


def test_discrn_audiocaps_balancing_swaps_media(tmp_path):
  starts = {"start_seconds": [0, 0]}
  records = _discrn_records(4) + [{"sample_ids": ["x"], "question": "q", "label": 0, **starts},
                                  {"sample_ids": ["x", "y"], "label": 0, **starts},
                                  {"sample_ids": ["x", "y"], "question": "q", "label": 3,
                                   **starts},
                                  {"sample_ids": ["x", "y"], "question": "q", "label": 0}]
  p = _json(tmp_path / "audiocaps.json", records)
  roots = {"video": "/v", "audio": "/a"}
  ex = discrn.read_discrn(p, "audiocaps", roots)
  assert len(ex) == 4
  assert ex.skipped == {"bad field 'sample_ids'": 1, "missing field 'question'": 1,
                        "bad field 'label'": 1, "missing field 'start_seconds'": 1}
  assert [e.label for e in ex] == [1, 0, 1, 0]
  assert all(e.modality == ("video", "audio") and e.task == "discrn" for e in ex)
  assert ex[0].text_input == "which of the two options is louder?"
  # Record 0 had label 0 at an even position: swapped, media included.
  assert ex[0].media == (os.path.join("/v", "b0_20.mp4"), os.path.join("/a", "a0_10.flac"))
  assert ex[0].meta["captions"] == ("cb0", "ca0")
  assert ex[0].meta["baseline_captions"] == ("vb0", "xa0")
  assert ex[0].text_output == "second" and "audio" in ex[0].answers and "sound" in ex[0].answers
  # Record 1 (label 1, odd position) is swapped as well; records keep their own ids.
  assert ex[1].media == (os.path.join("/v", "b1_20.mp4"), os.path.join("/a", "a1_10.flac"))
  assert ex[1].answers[0] == "video" and "first" in ex[1].answers
  # The reference's balancing leaves the media in place.
  ref = discrn.read_discrn(p, "audiocaps", roots, swap_media=False)
  assert ref[0].media == (os.path.join("/v", "a0_10.mp4"), os.path.join("/a", "b0_20.flac"))
  assert ref[0].label == 1
  raw = discrn.read_discrn(p, "audiocaps", roots, balance_labels=False)
  assert [e.label for e in raw] == [0, 1, 0, 1]


def test_discrn_objaverse_paths_and_require_media(tmp_path):
  p = _json(tmp_path / "objaverse.json", [
      {"sample_ids": ["u1", "u2"], "question": "which object is a cone", "label": 1},
      {"sample_ids": ["u1", "u3"], "question": "which image is red", "label": 1},
  ])
  img, pc = tmp_path / "img", tmp_path / "pc"
  for uid in ("u1", "u2"):
    view = img / "compressed_imgs_view2" / "Cap3D_imgs_view2"
    view.mkdir(parents=True, exist_ok=True)
    (view / f"{uid}_2.jpeg").write_bytes(b"")
    (pc / uid).mkdir(parents=True)
    (pc / uid / f"{uid}_8192.npz").write_bytes(b"")
  ex = discrn.read_discrn(p, "objaverse", {"image": str(img), "pc": str(pc)},
                          require_media=True)
  assert len(ex) == 1 and ex.skipped == {"missing media file": 1}
  assert ex[0].media == (str(img / "compressed_imgs_view2/Cap3D_imgs_view2/u1_2.jpeg"),
                         str(pc / "u2" / "u2_8192.npz"))
  assert ex[0].label == 1 and "3d model" in ex[0].answers
  with pytest.raises(ValueError, match="unknown DisCRn source"):
    discrn.read_discrn(p, "shapenet", {})


def test_example_validates_modality_and_media():
  with pytest.raises(ValueError, match="modalities but"):
    Example("1", ("image", "pc"), "a.png", "discrn")
  with pytest.raises(ValueError, match="unknown modality"):
    Example("1", "depth", "a.png", "caption")


def test_template_pools_match_the_reference():
  sizes = {m: {t: len(v) for t, v in d.items()} for m, d in templates.TEMPLATES.items()}
  assert sizes == {"image": {"caption": 53, "qa": 47, "classification": 20},
                   "video": {"caption": 13, "qa": 21, "classification": 20},
                   "audio": {"caption": 24, "qa": 26, "classification": 13},
                   "pc": {"caption": 45, "qa": 52, "classification": 13}}
  assert ("Use a few words to illustrate what is happening in the photo.Write a description "
          "for the photo.") in templates.TEMPLATES["image"]["caption"]
  assert all("{}" in t for d in templates.TEMPLATES.values() for t in d["qa"])


def test_text_normalisation():
  assert templates.pre_caption('A man (riding) a HORSE!!  on the "beach".') == \
      "a man riding a horse on the beach"
  assert templates.pre_caption(" ".join(["w"] * 60)) == " ".join(["w"] * 50)
  assert templates.blip_question("What is THIS thing?.  ") == "what is this thing?"
  assert templates.discrn_question("which audio is louder") == "which of the two options is louder?"
  assert templates.discrn_question("which image shows a bird?") == \
      "which of the two options shows a bird?"
  # The reference's replacements are case-sensitive (and so are these).
  assert templates.discrn_question("Which entity is red") == "which entity is red?"


def test_instruct_is_seeded_and_follows_the_reference():
  qa = Example("1", "audio", "a.flac", "qa", text_input="What makes the Noise?",
               text_output="A Dog", meta={"caption": "a dog barks"})
  runs = [[templates.instruct(qa, np.random.default_rng(s)) for s in range(20)] for _ in range(2)]
  assert runs[0] == runs[1]
  for e in runs[0]:
    assert e.text_input == e.text_input.lower().strip() and "??" not in e.text_input
    assert "what makes the noise" in e.text_input and e.text_output == "A Dog"
  cap = Example("2", "pc", "p.npz", "caption", text_output=("A Chair.", "A Table!"))
  outs = {templates.instruct(cap, np.random.default_rng(s)).text_output for s in range(30)}
  assert outs == {"a chair", "a table"}
  pool = ["a dog barks", "rain falls", "a car passes"]
  binary = [templates.instruct(qa, np.random.default_rng(s), binary_captions=pool)
            for s in range(400)]
  yes_no = [e for e in binary if e.text_output in ("yes", "no")]
  assert 0.17 < len(yes_no) / len(binary) < 0.38  # 3/11 of the questions
  assert all(("a dog barks" in e.text_input) == (e.text_output == "yes") for e in yes_no)
  cls = Example("3", "audio", "a.wav", "classification", text_output="owl")
  out = templates.instruct(cls, np.random.default_rng(0))
  assert out.text_output.endswith("an owl") and out.text_input in [
      t.lower() for t in templates.TEMPLATES["audio"]["classification"]]
