"""`data.demo=False` end to end: two image datasets in the reference's on-disk formats (a COCO
caption JSON and a VQA JSON with small JPEGs) found through the registry under `data.root`,
mixed with the configured ratio, tokenised with a given tokenizer folder, trained for a few
steps with the demo's tiny towers, and evaluated on a registry eval split."""

from __future__ import annotations

import json
import math
import sys

import grain
import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from xblip_jax.config_utils import ConfigError
from xblip_jax.data import templates
from xblip_jax.data.demo_tokenizer import train_demo_tokenizer
from xblip_jax.data.pipeline import RandomMixIterDataset
from xblip_jax.eval import tasks
from xblip_jax.train import inputs as inputs_lib
from xblip_jax.train.trainer import train_and_evaluate

sys.path.insert(0, str(REPO / "configs"))
import demo as demo_config  # noqa: E402  pylint: disable=wrong-import-position

# Caption images are dark and VQA images bright, so a batch tells which dataset it came from.
DARK, BRIGHT = (15, 20, 25), (240, 235, 230)
RATIOS = (3.0, 1.0)


def _write(path, obj):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("lavis_cache")
  images = root / "coco" / "images"
  caps, vqa, texts = [], [], []
  for k in range(6):
    for kind, colour in (("cap", DARK), ("vqa", BRIGHT)):
      path = images / "train2014" / f"{kind}_{k}.jpg"
      path.parent.mkdir(parents=True, exist_ok=True)
      Image.new("RGB", (64, 48), colour).save(path, quality=90)
    caps.append({"image": f"train2014/cap_{k}.jpg", "caption": f"A dark square number {k}.",
                 "image_id": k})
    vqa.append({"image": f"train2014/vqa_{k}.jpg", "question": "Is the picture bright?",
                "answer": ["yes", "yes", "very"], "question_id": k})
  caps.append({"image": "train2014/cap_0.jpg"})                  # no caption: skipped
  vqa.append({"image": "train2014/gone.jpg", "question": "?", "answer": ["x"]})  # no file
  _write(root / "coco/annotations/coco_karpathy_train.json", caps)
  _write(root / "coco/annotations/vqa_train.json", vqa[:4])
  _write(root / "coco/annotations/vqa_val.json", vqa[4:])
  _write(root / "coco/annotations/coco_karpathy_val.json",
         [{"image": "train2014/cap_1.jpg", "caption": ["a dark square", "dark"], "image_id": 1}])
  texts = [c.get("caption", "") for c in caps] + ["is the picture bright", "yes", "very"]
  texts += [t.replace("{}", "").lower() for per in templates.TEMPLATES.values()
            for pool in per.values() for t in pool] + list(inputs_lib.CUES.values())
  train_demo_tokenizer(texts, root / "vicuna" / "tokenizer.model", vocab_size=320)
  return root


def _config(root, steps=2, batch=4):
  c = demo_config.get_config()  # its tiny towers; the data section is replaced
  c.data.demo = False
  c.data.root = str(root)
  c.data.llm_tokenizer = str(root / "vicuna")
  c.data.modalities = ("image",)
  c.data.train_datasets = ("coco_caption_instruct", "coco_vqa_instruct")
  c.data.train_ratios = RATIOS
  c.data.paths = {"coco_vqa_instruct": {"require_media": True}}
  c.data.eval_datasets = ("coco_caption_val",)
  c.data.batch_size = c.data.eval_batch_size = batch
  c.data.max_bad_fraction = 0.0
  c.model.encoders = {"image": dict(c.model.encoders.image)}
  c.model.llm_init = "random"
  c.train.num_steps = steps
  c.train.log_every = 1
  c.train.checkpoint_every = steps
  c.eval.num_examples = 0
  c.eval.max_new_tokens = 1
  c.eval.num_beams = 1  # greedy: one decoding program to compile
  return c


def test_mixture_follows_the_configured_ratio(data_root, tmp_path):
  inputs = inputs_lib.build_inputs(_config(data_root, batch=2), tmp_path)
  assert inputs.read_skipped == {"coco_caption_instruct": {"missing field 'caption'": 1},
                                 "coco_vqa_instruct": {"missing media file": 1}}
  mix = inputs.pipeline
  assert isinstance(mix, RandomMixIterDataset)
  expected = RATIOS[0] / sum(RATIOS)
  # Many draws of the mixer itself, each source labelled (no decoding).
  labelled = [grain.MapDataset.range(1).repeat().map(lambda _, i=i: i).to_iter_dataset()
              for i in range(2)]
  probe = iter(RandomMixIterDataset(labelled, np.diff(mix.cdf, prepend=0.0), seed=mix.seed))
  n = 20_000
  share = sum(next(probe) == 0 for _ in range(n)) / n
  assert abs(share - expected) < 4 * math.sqrt(expected * (1 - expected) / n)
  # Real batches: the image brightness says which dataset each one came from.
  n = 80
  dark = 0
  for _ in range(n):
    order, batch = inputs.next_train()
    assert order == ("image",) and batch["image"].shape[0] == 2
    means = batch["image"].mean(axis=(1, 2, 3))
    assert (means < 0).all() or (means > 0).all()  # one dataset per batch
    dark += int(means[0] < 0)
  assert abs(dark / n - expected) < 4 * math.sqrt(expected * (1 - expected) / n)
  # Without ratios: sqrt(size) weights (6 usable records each -> equal).
  c = _config(data_root)
  c.data.train_ratios = ()
  assert np.allclose(inputs_lib.build_inputs(c, tmp_path / "b").pipeline.cdf, [0.5, 1.0])


def test_real_data_trains_and_evaluates(data_root, tmp_path):
  summary = train_and_evaluate(_config(data_root), tmp_path / "run")
  losses = [row["loss"] for row in summary["history"]]
  assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
  assert {row["modality"] for row in summary["history"]} == {"image"}
  assert summary["data"]["read_skipped"]["coco_vqa_instruct"] == {"missing media file": 1}
  result = summary["eval"]["coco_caption_val"]
  assert math.isfinite(result["loss"])
  preds = json.loads((tmp_path / "run" / "eval" / "coco_caption_val.json").read_text())["predictions"]
  # Scored as the reference's COCO captioning: its prompt, all references of the image.
  assert [p["instruction"] for p in preds] == [tasks.TASKS["coco_caption"].prompt]
  assert preds[0]["answers"] == ["a dark square", "dark"]


def test_config_errors_name_the_field(data_root, tmp_path):
  c = _config(data_root)
  c.data.llm_tokenizer = str(tmp_path / "nowhere")
  with pytest.raises(ConfigError, match="data.llm_tokenizer"):
    inputs_lib.build_inputs(c, tmp_path)
  c = _config(data_root)
  c.data.train_datasets = ("coco_caption_instruct", "cc3m")
  with pytest.raises(ConfigError, match=r"data.train_datasets.*'cc3m'.*known datasets"):
    inputs_lib.build_inputs(c, tmp_path)
  c = _config(data_root)
  c.data.train_ratios = (1.0,)
  with pytest.raises(ConfigError, match="data.train_ratios"):
    inputs_lib.build_inputs(c, tmp_path)
  c = _config(data_root)
  c.data.root = ""
  with pytest.raises(ConfigError, match="data.root"):
    inputs_lib.build_inputs(c, tmp_path)


def test_training_set_from_prepared_shards(data_root, tmp_path):
  from xblip_jax.data.tfds import prepare  # pylint: disable=import-outside-toplevel
  made = prepare.main(["--dataset", "coco_vqa_instruct", "--root", str(data_root),
                       "--output", str(tmp_path / "prepared"), "--no-decode-check",
                       "--max-bad-fraction", "0.5"])  # the fixture's one missing image
  c = _config(data_root, batch=2)
  c.data.train_ratios = (1.0, 3.0)
  c.data.paths = {"coco_vqa_instruct": {"shards": made["directory"], "annotation": "absent.json"}}
  inputs = inputs_lib.build_inputs(c, tmp_path / "run")
  assert len(inputs.pipeline.cdf) == 2
  bright = 0
  for _ in range(20):
    _, batch = inputs.next_train()
    bright += int(batch["image"].mean() > 0)
  assert bright > 0  # VQA batches come from the shards (the annotation path is not read)
  c.data.paths = {"coco_vqa_instruct": {"shards": str(tmp_path / "nothing")}}
  with pytest.raises(ConfigError, match="data.paths.coco_vqa_instruct.shards"):
    inputs_lib.build_inputs(c, tmp_path / "run2")
