"""Conversion through the LAVIS goldens: files written with LAVIS names from the golden params,
converted by the CLI into Orbax components, restored into our models, compared with the
reference outputs, and exported back bit-exactly."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from flax import nnx

from conftest import GOLDEN_DIR
from xblip_jax.convert import cli, orbax_io
from xblip_jax.convert.mapping import CheckpointKeyError
from xblip_jax.golden import load_case
from xblip_jax.models.encoders.beats import Beats, BeatsConfig
from xblip_jax.models.encoders.eva_vit import EvaViT, EvaViTConfig, interpolate_pos_embed
from xblip_jax.models.encoders.pointbert import PointBert, PointBertConfig
from xblip_jax.models.layers import Precision
from xblip_jax.models.llm.llama import LlamaConfig
from xblip_jax.models.qformer import QFormerConfig
from xblip_jax.models.xblip import XBlipConfig, XInstructBlip, trainable

ATOL = RTOL = 1e-5


def _case(name):
  path = GOLDEN_DIR / f"{name}_a.npz"
  if not path.exists():
    pytest.skip(f"{path} not found")
  return load_case(path)


def _t(x):
  return torch.from_numpy(np.ascontiguousarray(x))


def _run(*argv):
  lines = []
  cli.run([str(a) for a in argv], log=lines.append)
  return "\n".join(lines)


def _abstract(build):
  return nnx.eval_shape(build)


# ------------------------------------------------------------- X-InstructBLIP per-modality


def _audio_file(tmp_path, drop=(), extra=None, rename=None):
  """A LAVIS-named audio checkpoint (`{"model": sd}`) from the qformer/llm/beats goldens."""
  q, llm, beats = _case("qformer"), _case("llm_assembly"), _case("beats")
  sd = {f"audio_Qformer.{k}": v for k, v in q.params.items() if k.startswith("bert.")}
  sd["audio_query_tokens"] = q.params["query_tokens"]
  sd.update({k: v for k, v in llm.params.items()
             if k.startswith(("audio_llm_proj.", "llm_model."))})
  sd.update({f"audio_ln.{n}": beats.params[f"audio_ln.{n}"] for n in ("weight", "bias")})
  sd = {k: v for k, v in sd.items() if k not in drop}
  sd.update(extra or {})
  if rename:
    sd = {k.replace("audio_", rename + "_", 1) if k.startswith("audio_") else k: v
          for k, v in sd.items()}
  path = tmp_path / "audio_qformer.pth"
  torch.save({"model": {k: _t(v) for k, v in sd.items()}, "epoch": 1}, path)
  return path, sd, q, llm


def _bridge_model(q, modality="audio") -> XInstructBlip:
  meta = q.meta["config"]
  qcfg = QFormerConfig(vocab_size=meta["vocab_size"], hidden_size=meta["hidden_size"],
                       num_layers=meta["num_hidden_layers"], num_heads=meta["num_attention_heads"],
                       intermediate_size=meta["intermediate_size"],
                       max_position_embeddings=meta["max_position_embeddings"],
                       encoder_width=meta["encoder_width"],
                       cross_attention_freq=meta["cross_attention_freq"])
  cfg = XBlipConfig(encoder_widths=((modality, meta["encoder_width"]),), qformer=qcfg,
                    llm=LlamaConfig.tiny(), num_query_tokens=meta["query_length"])
  return _abstract(lambda: XInstructBlip(cfg, rngs=nnx.Rngs(0)))


@nnx.jit
def _qformer_out(qformer, queries, enc, ids, mask, enc_mask):
  return qformer(queries, enc, ids, mask, enc_mask).last_hidden_state


def _check_bridge(model, q, llm, m="audio"):
  inp = q.inputs
  queries = jnp.broadcast_to(model.query_tokens[m][...], (2,) + model.query_tokens[m].shape[1:])
  got = _qformer_out(model.qformer[m], queries, jnp.asarray(inp["encoder_hidden_states"]),
                     jnp.asarray(inp["input_ids"]), jnp.asarray(inp["text_attention_mask"]),
                     jnp.asarray(inp["encoder_attention_mask"]))
  np.testing.assert_allclose(got, q.outputs["last_hidden_state"], atol=ATOL, rtol=RTOL)
  hidden = llm.inputs["audio_qformer_last_hidden_state"]
  proj = model.llm_proj[m](jnp.asarray(hidden[:, :4])).reshape(2, -1, hidden.shape[-1])
  np.testing.assert_allclose(proj, llm.outputs["inputs_llm_audio"], atol=ATOL, rtol=RTOL)


def test_per_modality_file_converts_matches_and_exports_exact(tmp_path):
  path, sd, q, llm = _audio_file(tmp_path)
  log = _run("import", "lavis-qformer", path, "--modality", "audio", "--num-heads", 4,
             "--out", tmp_path / "bridge")
  assert "audio_Qformer.bert.embeddings.position_ids" in log  # listed as expected, unused
  assert "belong to other components" in log  # llm_model.* is not this component's
  model = orbax_io.load_component(tmp_path / "bridge", _bridge_model(q))
  _check_bridge(model, q, llm)
  _run("export", "lavis", "--from", tmp_path / "bridge", "--out", tmp_path / "back.pth")
  back = torch.load(tmp_path / "back.pth", weights_only=True)
  assert set(back) == {"model"}
  mine = {k: v for k, v in sd.items() if not k.startswith("llm_model.")}
  assert sorted(back["model"]) == sorted(mine)  # exactly LAVIS' key names, buffer included
  for k, v in mine.items():
    np.testing.assert_array_equal(back["model"][k].numpy(), v, err_msg=k)


def test_video_bridge_initialised_from_the_image_file(tmp_path):
  path, sd, q, llm = _audio_file(tmp_path, rename="image")
  _run("import", "lavis-qformer", path, "--modality", "video", "--source-modality", "image",
       "--num-heads", 4, "--dtype", "bfloat16", "--out", tmp_path / "video")
  meta = orbax_io.read_meta(tmp_path / "video")
  assert meta["roots"][0] == "ln.video" and meta["dtype_policy"] == "bfloat16"
  assert all(v["dtype"] == "bfloat16" for v in meta["arrays"].values())
  model = orbax_io.load_component(tmp_path / "video", _bridge_model(q, "video"))
  want = sd["image_Qformer.bert.encoder.layer.1.output_query.dense.weight"].T
  got = model.qformer["video"].layers[1].query_ffn.output.kernel[...]
  np.testing.assert_array_equal(got, jnp.asarray(want, jnp.bfloat16).astype(jnp.float32))


def test_missing_tensors_merged_from_stage1_and_skip_attention(tmp_path):
  """LAVIS #344: a per-modality file without some Q-Former tensors; BLIP-2 stage-1 has them."""
  q = _case("qformer")
  last = "audio_Qformer.bert.encoder.layer.3."
  gone = [f"{last}{n}" for n in ("intermediate.dense.weight", "intermediate.dense.bias",
                                 "output.dense.weight", "output.dense.bias",
                                 "output.LayerNorm.weight", "output.LayerNorm.bias")]
  path, sd, _, _ = _audio_file(tmp_path, drop=gone)
  with pytest.raises(CheckpointKeyError, match=r"(?s)MISSING.*layer\.3\.output\.dense\.weight"):
    _run("import", "lavis-qformer", path, "--modality", "audio", "--out", tmp_path / "x")
  assert not (tmp_path / "x").exists()
  stage1 = {f"Qformer.{k}": v + 1.0 for k, v in q.params.items() if k.startswith("bert.")}
  stage1["Qformer.cls.predictions.bias"] = np.zeros(3, np.float32)
  stage1["query_tokens"] = q.params["query_tokens"]
  torch.save({"model": {k: _t(v) for k, v in stage1.items()}}, tmp_path / "stage1.pth")
  log = _run("import", "lavis-qformer", path, "--modality", "audio", "--stage1",
             tmp_path / "stage1.pth", "--skip-attention", "--out", tmp_path / "merged")
  assert "6 taken from the fallback checkpoint" in log
  arrays = orbax_io.read_meta(tmp_path / "merged")["arrays"]
  assert not any(".attention." in k or "cross_attention" in k for k in arrays)
  report = orbax_io.read_meta(tmp_path / "merged")["report"]
  assert "qformer.audio.layers.0.attention.query.kernel" in report["left_at_init"]
  store = orbax_io.ArrayStore()
  store.add_component(tmp_path / "merged")
  got = store.read(["qformer.audio.layers.3.text_ffn.output.kernel",
                    "qformer.audio.layers.2.text_ffn.output.kernel"])
  np.testing.assert_array_equal(got["qformer.audio.layers.3.text_ffn.output.kernel"],
                                stage1["Qformer.bert.encoder.layer.3.output.dense.weight"].T)
  np.testing.assert_array_equal(got["qformer.audio.layers.2.text_ffn.output.kernel"],
                                sd[f"audio_Qformer.bert.encoder.layer.2.output.dense.weight"].T)


@pytest.mark.parametrize("how", ["unexpected", "mis-shaped", "missing-allowed", "prefix"])
def test_bad_keys_fail_by_name(tmp_path, how):
  q_key = "audio_Qformer.bert.encoder.layer.1.attention.self.key.weight"
  if how == "unexpected":
    path, *_ = _audio_file(tmp_path, extra={"audio_Qformer.bert.encoder.layer.1.extra.weight":
                                            np.zeros(2, np.float32)})
    match = r"(?s)UNEXPECTED.*layer\.1\.extra\.weight"
  elif how == "mis-shaped":
    path, *_ = _audio_file(tmp_path, extra={q_key: np.zeros((64, 63), np.float32)})
    match = r"(?s)MIS-SHAPED.*layer\.1\.attention\.self\.key\.weight: \(63, 64\)"
  elif how == "prefix":
    path, *_ = _audio_file(tmp_path)
    with pytest.raises(CheckpointKeyError, match=r"no image_Qformer\.\* keys.*\['audio_'\]"):
      _run("import", "lavis-qformer", path, "--modality", "image", "--out", tmp_path / "bad")
    return
  else:
    path, *_ = _audio_file(tmp_path, drop=(q_key,))
    log = _run("import", "lavis-qformer", path, "--modality", "audio", "--allow-missing",
               "--out", tmp_path / "partial")
    assert f"1 MISSING:\n    {q_key}" in log
    assert "qformer.audio.layers.1.attention.key.kernel" not in orbax_io.read_meta(
        tmp_path / "partial")["arrays"]
    return
  with pytest.raises(CheckpointKeyError, match=match):
    _run("import", "lavis-qformer", path, "--modality", "audio", "--out", tmp_path / "bad")
  assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------ frozen encoders


def test_beats_pt_converts_and_matches_golden(tmp_path):
  case = _case("beats")
  model_sd = {k: _t(v) for k, v in case.params.items() if not k.startswith("audio_ln.")}
  torch.save({"cfg": case.meta["config"], "model": model_sd}, tmp_path / "beats.pt")
  _run("import", "beats", tmp_path / "beats.pt", "--out", tmp_path / "audio")
  cfg = BeatsConfig.from_lavis(case.meta["config"])
  beats = orbax_io.load_component(
      tmp_path / "audio", _abstract(lambda: Beats(cfg, precision=Precision(), rngs=nnx.Rngs(0))))
  got = nnx.jit(lambda m, x: m(x).features)(beats, jnp.asarray(case.inputs["fbank"]))
  np.testing.assert_allclose(got, case.outputs["features"], atol=ATOL, rtol=RTOL)
  _run("export", "beats", "--from", tmp_path / "audio", "--out", tmp_path / "back.pt")
  back = torch.load(tmp_path / "back.pt", weights_only=True)
  assert back["cfg"] == case.meta["config"] and sorted(back["model"]) == sorted(model_sd)
  for k, v in model_sd.items():
    assert torch.equal(back["model"][k], v), k


def test_pointbert_ulip_pt_converts_and_matches_golden(tmp_path):
  case = _case("pointbert")
  tower = {f"module.{k}": _t(v) for k, v in case.params.items() if not k.startswith("pc_ln.")}
  other = {"module.logit_scale": torch.ones(()), "module.image_projection": torch.ones(2, 2)}
  torch.save({"state_dict": {**tower, **other}, "epoch": 9}, tmp_path / "ulip.pt")
  log = _run("import", "pointbert", tmp_path / "ulip.pt", "--num-heads", 4, "--group-size", 8,
             "--num-group", 16, "--npoints", 256, "--out", tmp_path / "pc")
  assert "2 source keys belong to other components" in log
  cfg = PointBertConfig.from_lavis(case.meta["config"])
  pb = orbax_io.load_component(
      tmp_path / "pc", _abstract(lambda: PointBert(cfg, precision=Precision(), rngs=nnx.Rngs(0))))
  got = nnx.jit(lambda m, x: m(x).pooled)(pb, jnp.asarray(case.inputs["points"]))
  np.testing.assert_allclose(got[:, 0], case.outputs["pc_embed"], atol=ATOL, rtol=RTOL)
  _run("export", "pointbert", "--from", tmp_path / "pc", "--out", tmp_path / "back.pt")
  back = torch.load(tmp_path / "back.pt", weights_only=True)["state_dict"]
  tower = {k: v for k, v in tower.items() if not k.endswith("num_batches_tracked")}
  assert sorted(back) == sorted(tower)
  for k, v in tower.items():
    assert torch.equal(back[k], v), k


def test_eva_vit_drops_extra_blocks_resamples_positions_and_matches(tmp_path):
  case = _case("eva_vit")
  sd = {k: _t(v) for k, v in case.params.items()}
  for k, v in case.params.items():  # a third block that depth 2 must drop
    if k.startswith("blocks.1."):
      sd[k.replace("blocks.1.", "blocks.2.")] = _t(v * 0)
  torch.save(sd, tmp_path / "eva.pth")
  log = _run("import", "eva-vit", tmp_path / "eva.pth", "--depth", 2, "--num-heads", 4,
             "--out", tmp_path / "vit")
  assert "blocks 2..2 of the file dropped" in log and "ln_vision.weight" in log
  cfg = EvaViTConfig.tiny()
  vit = orbax_io.load_component(
      tmp_path / "vit", _abstract(lambda: EvaViT(cfg, precision=Precision(), rngs=nnx.Rngs(0))))
  pixels = jnp.asarray(case.inputs["image"].transpose(0, 2, 3, 1))
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(vit, pixels), case.outputs["features"],
                             atol=ATOL, rtol=RTOL)
  _run("import", "eva-vit", tmp_path / "eva.pth", "--depth", 2, "--img-size", 48,
       "--out", tmp_path / "vit48")
  store = orbax_io.ArrayStore()
  store.add_component(tmp_path / "vit48")
  got = store.read(["encoders.image.pos_embed"])["encoders.image.pos_embed"]
  want = interpolate_pos_embed(case.params["pos_embed"][0], 6)
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert got.shape == (37, 48)


def _random_bridge(cfg: XBlipConfig, seed: int) -> XInstructBlip:
  """An abstract model whose trainable parameters get numpy-random values (no jitted init)."""
  model = nnx.eval_shape(lambda: XInstructBlip(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  for _, var in nnx.to_flat_state(nnx.state(model, trainable)):
    var.set_value(jnp.asarray(rng.normal(size=var.get_value().shape), jnp.float32))
  return model


def test_trainer_checkpoint_exports_lavis_names_and_imports_back(tmp_path):
  cfg = XBlipConfig(encoder_widths=(("pc", 8),), qformer=QFormerConfig.tiny(8, num_layers=2),
                    llm=LlamaConfig.tiny(), num_query_tokens=2)
  model = _random_bridge(cfg, 0)
  params = nnx.state(model, trainable)
  # The trainer's layout: <workdir>/checkpoints/<step>/state holds {"params", "opt_state", ...}.
  with ocp.CheckpointManager(tmp_path / "work" / "checkpoints") as manager:
    manager.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(
        {"params": params, "opt_state": {"mu": params}, "step": 7})))
  _run("export", "lavis", "--trainer", tmp_path / "work", "--qformer-heads", 4,
       "--out", tmp_path / "pc.pth")
  sd = torch.load(tmp_path / "pc.pth", weights_only=True)["model"]
  np.testing.assert_array_equal(sd["pc_query_tokens"].numpy(), model.query_tokens["pc"][...])
  np.testing.assert_array_equal(sd["pc_llm_proj.weight"].numpy(),
                                np.asarray(model.llm_proj["pc"].kernel[...]).T)
  assert sd["pc_Qformer.bert.embeddings.position_ids"].shape == (1, 32)
  assert not any(k.startswith("llm_model.") for k in sd)
  # And back: the LAVIS file imports into the same bridge, every value identical.
  _run("import", "lavis-qformer", tmp_path / "pc.pth", "--modality", "pc", "--num-heads", 4,
       "--out", tmp_path / "again")
  again = orbax_io.load_component(
      tmp_path / "again", nnx.eval_shape(lambda: XInstructBlip(cfg, rngs=nnx.Rngs(1))))
  want = dict(nnx.to_flat_state(params))
  got = dict(nnx.to_flat_state(nnx.state(again, trainable)))
  assert sorted(got) == sorted(want)
  for p, v in want.items():
    np.testing.assert_array_equal(got[p].get_value(), v.get_value(), err_msg=str(p))
