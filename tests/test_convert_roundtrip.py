"""PyTorch -> Orbax -> PyTorch round trips of tiny random transformers models (bit-exact), and
the converted weights giving the PyTorch model's outputs in xblip_jax."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from flax import nnx

from xblip_jax.convert import cli, orbax_io
from xblip_jax.convert.io import open_source
from xblip_jax.models.encoders.eva_vit import EvaViT, EvaViTConfig
from xblip_jax.models.layers import Precision
from xblip_jax.models.llm.llama import Llama, LlamaConfig
from xblip_jax.models.qformer import QFormerConfig
from xblip_jax.models.xblip import XBlipConfig, XInstructBlip

REPO = Path(__file__).resolve().parents[1]
ATOL = RTOL = 1e-5


def _run(*argv):
  lines = []
  cli.run([str(a) for a in argv], log=lines.append)
  return "\n".join(lines)


def _randomise(model: torch.nn.Module, seed: int) -> None:
  """Weights far from their defaults, so that a wrong mapping shows."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name.lower() and name.endswith("weight"):
        p.copy_(1 + 0.2 * torch.randn_like(p))
      elif name.endswith("bias") or p.ndim == 1:
        p.copy_(0.1 * torch.randn_like(p))
      elif p.ndim >= 2 and "embed" not in name and "query_tokens" not in name:
        p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))
      else:
        p.normal_()
    for name, p in model.named_parameters():  # the importer drops the (softmax-invariant) key
      if name.endswith("self_attn.qkv.bias"):  # bias: zero it for a bit-exact round trip
        p[p.shape[0] // 3: 2 * p.shape[0] // 3] = 0


def _same_tensors(folder: Path, want: dict) -> None:
  src = open_source(folder)
  assert sorted(src.keys()) == sorted(want)
  for k, v in want.items():
    np.testing.assert_array_equal(src.read(k), v.detach().numpy(), err_msg=k)


# ---------------------------------------------------------------------------------- LLaMA


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
  cfg = T.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                      attn_implementation="eager")
  model = T.LlamaForCausalLM(cfg).eval()
  _randomise(model, 0)
  folder = tmp_path_factory.mktemp("hf") / "llama"
  model.save_pretrained(folder, max_shard_size="20KB")
  assert (folder / "model.safetensors.index.json").exists()  # sharded
  return model, folder


def test_llama_sharded_round_trip_and_logits(hf_llama, tmp_path):
  model, folder = hf_llama
  _run("import", "hf-llama", folder, "--out", tmp_path / "llm")
  cfg = LlamaConfig.from_hf(model.config.to_dict())
  ours = orbax_io.load_component(
      tmp_path / "llm", nnx.eval_shape(lambda: Llama(cfg, precision=Precision(),
                                                      rngs=nnx.Rngs(0))))
  ids = np.random.default_rng(0).integers(0, 97, (2, 7))
  with torch.no_grad():
    want = model(torch.from_numpy(ids)).logits.numpy()
  got = nnx.jit(lambda m, i: m(m.embed(i)).logits)(ours, jnp.asarray(ids))
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)

  _run("export", "hf-llama", "--from", tmp_path / "llm", "--max-shard-size", "20KB",
       "--out", tmp_path / "back")
  assert (tmp_path / "back" / "model.safetensors.index.json").exists()
  _same_tensors(tmp_path / "back", model.state_dict())
  back, info = T.LlamaForCausalLM.from_pretrained(tmp_path / "back", output_loading_info=True)
  assert not any(info.values()), info
  with torch.no_grad():
    np.testing.assert_allclose(back(torch.from_numpy(ids)).logits.numpy(), want, atol=1e-6)


def test_llama_pad_row_and_dtype_policy(hf_llama, tmp_path):
  model, folder = hf_llama
  log = _run("import", "hf-llama", folder, "--add-pad-row", "--dtype", "bfloat16",
             "--out", tmp_path / "llm")
  assert "[PAD] row 97 appended" in log
  meta = orbax_io.read_meta(tmp_path / "llm")
  assert meta["config"]["hf_config"]["vocab_size"] == 98
  assert {v["dtype"] for v in meta["arrays"].values()} == {"bfloat16"}
  store = orbax_io.ArrayStore()
  store.add_component(tmp_path / "llm")
  emb = store.read(["llm.embed_tokens.embedding"])["llm.embed_tokens.embedding"]
  src = model.model.embed_tokens.weight.detach().numpy()
  assert emb.shape == (98, 32)
  np.testing.assert_array_equal(emb[:97], src.astype(emb.dtype))
  np.testing.assert_allclose(emb[97].astype(np.float32), src.mean(0), atol=1e-2)


# ------------------------------------------------------------------------------ InstructBLIP

NQ, IMAGE_TOKEN = 4, 95


@pytest.fixture(scope="module")
def hf_instructblip(tmp_path_factory):
  vc = T.InstructBlipVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, image_size=32, patch_size=8,
                                  layer_norm_eps=1e-6)
  qc = T.InstructBlipQFormerConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64,
                                   max_position_embeddings=16, encoder_hidden_size=48,
                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  tc = T.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                     num_attention_heads=4, rms_norm_eps=1e-6)
  cfg = T.InstructBlipConfig(vision_config=vc.to_dict(), qformer_config=qc.to_dict(),
                             text_config=tc.to_dict(), num_query_tokens=NQ,
                             image_token_index=IMAGE_TOKEN)
  model = T.InstructBlipForConditionalGeneration(cfg).eval()
  _randomise(model, 1)
  folder = tmp_path_factory.mktemp("hf") / "instructblip"
  model.save_pretrained(folder, max_shard_size="50KB")
  return model, folder


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  pixels = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
  q_ids = rng.integers(1, 60, (2, 5))
  q_mask = np.ones((2, 5), np.int64)
  q_mask[1, 3:] = 0
  ids = np.concatenate([np.full((2, NQ), IMAGE_TOKEN), rng.integers(3, 90, (2, 6))], 1)
  return pixels, q_ids, q_mask, ids


def _hf_logits(model, pixels, q_ids, q_mask, ids):
  with torch.no_grad():
    return model(pixel_values=torch.from_numpy(pixels), qformer_input_ids=torch.from_numpy(q_ids),
                 qformer_attention_mask=torch.from_numpy(q_mask),
                 input_ids=torch.from_numpy(ids)).logits.numpy()


def test_instructblip_components_match_and_round_trip(hf_instructblip, tmp_path):
  model, folder = hf_instructblip
  log = _run("import", "hf-instructblip", folder, "--out", tmp_path / "c")
  assert {p.name for p in (tmp_path / "c").iterdir()} == {"bridge-image", "encoder-image", "llm"}
  assert "MISSING" not in log and "UNEXPECTED" not in log

  # The bridge (Q-Former + query tokens + projection + LN) gives the HF Q-Former's outputs.
  qcfg = QFormerConfig(vocab_size=60, hidden_size=32, num_layers=2, num_heads=4,
                       intermediate_size=64, max_position_embeddings=16, encoder_width=48,
                       hidden_dropout=0.0, attention_dropout=0.0)
  xcfg = XBlipConfig(encoder_widths=(("image", 48),), qformer=qcfg, num_query_tokens=NQ,
                     llm=LlamaConfig.tiny(hidden_size=32, vocab_size=97), modality_ln_eps=1e-6)
  ours = orbax_io.load_component(tmp_path / "c" / "bridge-image",
                                 nnx.eval_shape(lambda: XInstructBlip(xcfg, rngs=nnx.Rngs(0))))
  pixels, q_ids, q_mask, ids = _inputs()
  with torch.no_grad():
    vision = model.vision_model(torch.from_numpy(pixels)).last_hidden_state
    queries = model.query_tokens.expand(2, -1, -1)
    mask = torch.cat([torch.ones(2, NQ, dtype=torch.long), torch.from_numpy(q_mask)], 1)
    q_out = model.qformer(input_ids=torch.from_numpy(q_ids), attention_mask=mask,
                          query_embeds=queries, encoder_hidden_states=vision).last_hidden_state
  run = nnx.jit(lambda qf, *a: qf(*a).last_hidden_state)  # the LLM part stays abstract
  got = run(ours.qformer["image"], jnp.broadcast_to(ours.query_tokens["image"][...], (2, NQ, 32)),
            jnp.asarray(vision.numpy()), jnp.asarray(q_ids), jnp.asarray(q_mask))
  np.testing.assert_allclose(got, q_out.numpy(), atol=ATOL, rtol=RTOL)

  # Back to an HF folder: every tensor identical, loads strictly, same logits.
  parts = [a for d in ("bridge-image", "encoder-image", "llm") for a in
           ("--from", tmp_path / "c" / d)]
  _run("export", "hf-instructblip", *parts, "--image-token-index", IMAGE_TOKEN,
       "--max-shard-size", "50KB", "--out", tmp_path / "back")
  _same_tensors(tmp_path / "back", model.state_dict())
  back, info = T.InstructBlipForConditionalGeneration.from_pretrained(
      tmp_path / "back", output_loading_info=True)
  assert not any(info.values()), info
  np.testing.assert_allclose(_hf_logits(back.eval(), *_inputs()), _hf_logits(model, *_inputs()),
                             atol=1e-6)

  # The same bridge under LAVIS names (reference section 5.5 mapping).
  _run("export", "lavis", "--from", tmp_path / "c" / "bridge-image", "--out", tmp_path / "l.pth")
  lavis = torch.load(tmp_path / "l.pth", weights_only=True)["model"]
  hf_sd = model.state_dict()
  for ours, theirs in (("image_Qformer.bert.encoder.layer.0.crossattention.self.key.weight",
                        "qformer.encoder.layer.0.crossattention.attention.key.weight"),
                       ("image_Qformer.bert.embeddings.LayerNorm.bias",
                        "qformer.embeddings.layernorm.bias"),
                       ("image_query_tokens", "query_tokens"),
                       ("image_llm_proj.weight", "language_projection.weight"),
                       ("image_ln.weight", "vision_model.post_layernorm.weight")):
    assert torch.equal(lavis[ours], hf_sd[theirs]), ours

  # Default: an <image> row is appended to the LLM vocabulary and used.
  _run("export", "hf-instructblip", *parts, "--out", tmp_path / "appended")
  config = json.loads((tmp_path / "appended" / "config.json").read_text())
  assert config["image_token_index"] == 97 and config["text_config"]["vocab_size"] == 98
  appended = T.InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "appended")
  ids = np.where(_inputs()[3] == IMAGE_TOKEN, 97, _inputs()[3])
  np.testing.assert_allclose(_hf_logits(appended.eval(), *_inputs()[:3], ids)[..., :97],
                             _hf_logits(model, *_inputs()), atol=1e-5)


def test_blip2_vision_model_round_trip_and_features(tmp_path):
  hf_cfg = T.Blip2VisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, image_size=32, patch_size=8,
                               layer_norm_eps=1e-6, qkv_bias=True)
  model = T.Blip2VisionModel(hf_cfg).eval()
  _randomise(model, 2)
  torch.save(model.state_dict(), tmp_path / "vision.pth")
  _run("import", "eva-vit", tmp_path / "vision.pth", "--with-ln", "--num-heads", 4,
       "--out", tmp_path / "vit")
  cfg = EvaViTConfig.tiny(mlp_ratio=2.0)
  vit = orbax_io.load_component(tmp_path / "vit", nnx.eval_shape(
      lambda: EvaViT(cfg, precision=Precision(), rngs=nnx.Rngs(0))), subtree="encoders.image",
      strict=False)
  pixels = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    want = model(torch.from_numpy(pixels), output_hidden_states=True).hidden_states[-1].numpy()
  got = nnx.jit(lambda m, x: m(x))(vit, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)
  _run("export", "eva-vit", "--from", tmp_path / "vit", "--modality", "image", "--naming", "hf",
       "--out", tmp_path / "back.pth")
  back = torch.load(tmp_path / "back.pth", weights_only=True)
  assert sorted(back) == sorted(model.state_dict())
  for k, v in model.state_dict().items():
    assert torch.equal(back[k], v), k


# ------------------------------------------------------------------- entry point, sharding

_SHARDED = """
import os, runpy, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, numpy as np
from flax import nnx
folder, out = sys.argv[1], sys.argv[2]
sys.argv = ["xblip_jax.convert", "import", "hf-llama", folder, "--out", out]
try:
  runpy.run_module("xblip_jax.convert", run_name="__main__")
except SystemExit as e:
  assert e.code == 0, e.code
from xblip_jax.convert import orbax_io
from xblip_jax.models.llm.llama import Llama, LlamaConfig
import json
cfg = LlamaConfig.from_hf(json.load(open(folder + "/config.json")))
mesh = jax.make_mesh((1, 2, 2), ("data", "fsdp", "tensor"))
build = lambda: nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0),
    precision=__import__("xblip_jax.models.layers").models.layers.Precision()))
sharded = orbax_io.load_component(out, build(), mesh=mesh)
plain = orbax_io.load_component(out, build())
q = sharded.layers[0].self_attn.q_proj.kernel[...]
assert len(q.sharding.device_set) == 4, q.sharding
print("spec", q.sharding.spec)
print("embed", sharded.embed_tokens.embedding[...].sharding.spec)  # 97 rows: not split
np.testing.assert_array_equal(np.asarray(q),
                              np.asarray(plain.layers[0].self_attn.q_proj.kernel[...]))
print("OK")
"""


def test_entry_point_and_restore_sharded_over_a_mesh(hf_llama, tmp_path):
  _, folder = hf_llama
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, "-c", _SHARDED, str(folder), str(tmp_path / "llm")],
                        capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "OK" in proc.stdout and "spec P('fsdp', 'tensor')" in proc.stdout
  assert "embed P(None, 'fsdp')" in proc.stdout


def test_main_reports_errors_and_exit_code(tmp_path, capsys):
  assert cli.main(["import", "hf-llama", str(tmp_path / "nope"), "--out",
                   str(tmp_path / "x")]) == 1
  assert "file not found" in capsys.readouterr().err
