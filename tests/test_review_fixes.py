"""Review fixes: MultiSteps with absent modalities is refused, evaluation sets' tasks are
checked before training, task presets set the evaluation length, inference builds no training
pipeline and takes its parameters in `restore_run`'s order, and an `init_from` that matches
nothing is refused."""

from __future__ import annotations

import dataclasses
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO
from test_real_data_train import _config, data_root  # noqa: F401  pylint: disable=unused-import
from xblip_jax import sharding
from xblip_jax.config_utils import ConfigError
from xblip_jax.data import text as text_lib
from xblip_jax.eval import generation, tasks
from xblip_jax.train import inputs as inputs_lib
from xblip_jax.train import model_init, optim, restore
from xblip_jax.train import trainer as trainer_lib
from xblip_jax.train.trainer import evaluate

sys.path.insert(0, str(REPO / "configs"))
import common as common_config  # noqa: E402  pylint: disable=wrong-import-position


def _bridge_params():
  w = jnp.ones((2, 2))
  return {"qformer": {"image": w, "video": w}, "query_tokens": {"image": w, "video": w}}


@pytest.mark.parametrize("accum", [1, 2])
def test_grad_accum_with_an_absent_modality_is_a_config_error(accum):
  tx = optim.make_optimizer(optim.OptimConfig(init_lr=1e-2, warmup_lr=1e-2, warmup_steps=0,
                                                 grad_accum_steps=accum))
  params = _bridge_params()
  grads = jax_tree_ones(params)
  state = tx.init(params)
  optim.masked_update(tx, grads, state, params, ("image", "video"))  # every bridge: fine
  if accum == 1:
    new, _ = optim.masked_update(tx, grads, state, params, ("image",))
    np.testing.assert_array_equal(new["qformer"]["video"], params["qformer"]["video"])
    assert not np.array_equal(new["qformer"]["image"], params["qformer"]["image"])
  else:
    with pytest.raises(ConfigError, match=r"optim.grad_accum_steps.*train.microbatches"):
      optim.masked_update(tx, grads, state, params, ("image",))


def jax_tree_ones(tree):
  return {k: {m: jnp.full_like(v, 0.5) for m, v in d.items()} for k, d in tree.items()}


def test_task_presets_set_the_evaluation_length():
  c = common_config.get_config(*next(iter(common_config.EXPERIMENTS)))
  assert c.eval.max_new_tokens == 0
  tok = types.SimpleNamespace(generation_bos_id=1, eos_id=2, pad_id=0)
  for name in ("objaverse_qa", "modelnet40_gen", "coco_caption"):
    preset = tasks.TASKS[name].decode
    cfg = generation.for_tokenizer(preset, tok, c.eval.max_new_tokens)
    assert cfg.max_new_tokens == preset.max_new_tokens
  assert generation.for_tokenizer(tasks.TASKS["objaverse_qa"].decode, tok, 30).max_new_tokens == 30


def test_an_eval_set_without_task_fails_when_inputs_are_built(data_root, tmp_path,  # noqa: F811
                                                              monkeypatch):
  monkeypatch.delitem(tasks.TASKS, "coco_caption")
  with pytest.raises(ConfigError, match=r"data.eval_datasets.*coco_caption_val"):
    inputs_lib.build_inputs(_config(data_root), tmp_path)


def test_inference_inputs_read_no_training_annotations(data_root, tmp_path,  # noqa: F811
                                                       monkeypatch):
  read, real_read = [], inputs_lib.registry.read
  monkeypatch.setattr(inputs_lib.registry, "read",
                      lambda found: read.append(found.name) or real_read(found))
  inputs = inputs_lib.build_inputs(_config(data_root), tmp_path, train=False)
  assert read == [] and inputs.iterator is None
  assert [s.name for s in inputs.eval_sets()] == ["coco_caption_val"]
  assert read == ["coco_caption_val"]
  with pytest.raises(RuntimeError, match="train=False"):
    inputs.next_train()
  read.clear()
  inputs = inputs_lib.build_inputs(_config(data_root), tmp_path / "train")
  assert read == ["coco_caption_instruct", "coco_vqa_instruct"]
  order, batch = inputs.next_train()
  assert order == ("image",) and batch["image"].shape[0] == 4


def test_inference_source_order(tmp_path):
  cfg = lambda **kw: types.SimpleNamespace(get=lambda k, d=None: kw.get(k, d), **kw)
  (tmp_path / "other" / "checkpoints").mkdir(parents=True)
  # config.resume comes before init_from, as in checkpoint.restore_run.
  with pytest.raises(FileNotFoundError, match="config.resume"):
    restore.source_of(cfg(resume=str(tmp_path / "other"), init_from=str(tmp_path / "p")),
                      tmp_path / "run")
  assert restore.source_of(cfg(init_from=str(tmp_path / "p")), tmp_path / "run") == (
      "init_from", str(tmp_path / "p"), None)
  with pytest.raises(FileNotFoundError, match="no trained parameters"):
    restore.source_of(cfg(), tmp_path / "run")


def test_init_from_matching_nothing_is_refused(data_root, tmp_path, monkeypatch):  # noqa: F811
  def abstract_model(config, modalities, vocab, mesh, weights):  # shapes only: no 15 s compile
    del weights
    graphdef, params, rest, param_sh, _ = model_init.abstract_state(config, modalities, vocab, mesh)
    return types.SimpleNamespace(graphdef=graphdef, params=params, rest=rest,
                                 param_shardings=param_sh)

  monkeypatch.setattr(restore.model_init, "create_sharded", abstract_model)
  unrelated = tmp_path / "unrelated"
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save(unrelated, {"vision_model": {"w": np.zeros((3, 3), np.float32)}})
  c = _config(data_root)
  c.init_from = str(unrelated)
  with pytest.raises(ValueError, match=r"matches none of the trainable parameters.*qformer"):
    restore.load_for_inference(c, tmp_path / "run")


def test_task_prefix_and_qformer_prompt_reach_real_data_eval(data_root, tmp_path,  # noqa: F811
                                                             monkeypatch):
  prefix, qtext = "You are given one input. ", "a fixed q-former text"
  monkeypatch.setitem(tasks.TASKS, "coco_caption", dataclasses.replace(
      tasks.TASKS["coco_caption"], prefix=prefix, qformer_prompt=qtext))
  inputs = inputs_lib.build_inputs(_config(data_root), tmp_path, train=False)
  (eval_set,) = inputs.eval_sets()
  _, batch, refs = eval_set.batches[0]
  want = text_lib.qformer_text(inputs.qformer_tokenizer, qtext, inputs.text_cfg.qformer_max_len)
  np.testing.assert_array_equal(batch["qformer_ids"][0], want["qformer_ids"])
  # The LLM prompt stays the task's prompt; the prefix goes into the prompt ids, before cues.
  assert refs[0]["instruction"] == tasks.TASKS["coco_caption"].prompt
  ids = inputs.eval_prompt_ids(eval_set)
  assert ids.prefix == tuple(inputs.llm_tokenizer.encode(prefix, add_bos=True))
  assert ids.cues == inputs.prompt_ids.cues and not inputs.prompt_ids.prefix
  built = []

  def generate_for(prompt):
    built.append(prompt)
    return lambda params, rest, batch, order, cfg: np.full(
        (batch["prompt_ids"].shape[0], 2), inputs.llm_tokenizer.eos_id)

  mesh = sharding.make_mesh({"fsdp": -1})
  with pytest.raises(ValueError, match="prefix"):
    evaluate(inputs, mesh, None, None, None, generate_for(inputs.prompt_ids))
  built.clear()
  monkeypatch.setattr(trainer_lib.scoring, "score_set", lambda task, preds: {})  # not tested here
  evaluate(inputs, mesh, None, None, None, None, generate_for=generate_for,
           workdir=tmp_path / "ev")
  assert built == [ids]
