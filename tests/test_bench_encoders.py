"""The encoder FLOP counter of `bench/encoders.py`: hand-computed toy configs, the jaxpr of the
real forward, and XLA's cost analysis."""

from __future__ import annotations

import json

import pytest

from bench import encoder_flops as ef
from bench import encoders as be
from xblip_jax.models.encoders.beats import BeatsConfig
from xblip_jax.models.encoders.eva_vit import EvaViTConfig
from xblip_jax.models.encoders.pointbert import PointBertConfig

TOY_VIT = be.Case("vit", "toy", EvaViTConfig(img_size=28, patch_size=14, width=8, depth=1,
                                             num_heads=2, mlp_ratio=2.0), (28, 28, 3))
TOY_BEATS = be.Case("beats", "toy", BeatsConfig(
    embed_dim=4, encoder_embed_dim=8, encoder_layers=1, encoder_attention_heads=2,
    encoder_ffn_embed_dim=16, conv_pos=4, conv_pos_groups=2, num_buckets=8, max_distance=16,
    num_mel_bins=32), (32, 32))
TOY_POINTBERT = be.Case("pointbert", "toy", PointBertConfig(
    trans_dim=8, depth=1, num_heads=2, mlp_ratio=2.0, group_size=4, num_group=4, encoder_dims=8,
    npoints=16, pc_feat_dim=16, embed_dim=4, first_conv_dims=(4, 8), second_conv_hidden=8,
    pos_hidden=4), (16, 3))


def test_vit_by_hand():
  # 2x2 patches of 14x14x3 -> width 8; 5 tokens, mlp 16.
  assert ef.vit_flops(TOY_VIT.cfg) == {
      "patch_embed": 2 * 4 * 588 * 8, "qkv": 2 * 5 * 8 * 24, "attn_out_proj": 2 * 5 * 8 * 8,
      "attn_scores": 2 * 5 * 5 * 8, "attn_values": 2 * 5 * 5 * 8, "mlp": 2 * 2 * 5 * 8 * 16}
  assert ef.totals(ef.vit_flops(TOY_VIT.cfg))["total"] == 43552


def test_beats_by_hand():
  # 32x32 fbank -> 2x2 = 4 tokens. pos conv: kernel 4, pad 2 each side, 5 outputs computed with
  # 2, 3, 4, 3, 2 taps inside the input (14), 8 outputs x 4 inputs per group.
  parts = ef.beats_flops(TOY_BEATS.cfg, 32)
  assert parts == {
      "patch_embed": 2 * 4 * 256 * 4, "post_extract_proj": 2 * 4 * 4 * 8,
      "pos_conv": 2 * 8 * 4 * 14, "qkv": 2 * 4 * 8 * 24, "attn_out_proj": 2 * 4 * 8 * 8,
      "attn_scores": 2 * 4 * 4 * 8, "attn_values": 2 * 4 * 4 * 8, "mlp": 2 * 2 * 4 * 8 * 16,
      "rel_bias_grep_linear": 2 * 4 * 2 * 4 * 8, "rel_bias_gate": 2 * 2 * 4 * 4}
  assert ef.totals(parts) == {"matmul": 14464, "other": 64, "total": 14528}


def test_pointbert_by_hand():
  # 16 points, 4 groups of 4, PointNet 3->4->8, (8+8)->8->8; 5 tokens of width 8.
  parts = ef.pointbert_flops(TOY_POINTBERT.cfg)
  assert parts == {
      "fps": 9 * 4 * 16, "knn": 8 * 4 * 16,
      "pointnet": 2 * 16 * (3 * 4 + 4 * 8 + 16 * 8 + 8 * 8), "reduce_dim": 2 * 4 * 8 * 8,
      "pos_mlp": 2 * 4 * (3 * 4 + 4 * 8), "qkv": 2 * 5 * 8 * 24, "attn_out_proj": 2 * 5 * 8 * 8,
      "attn_scores": 2 * 5 * 5 * 8, "attn_values": 2 * 5 * 5 * 8, "mlp": 2 * 2 * 5 * 8 * 16,
      "pc_projection": 2 * 16 * 4}
  assert ef.totals(parts) == {"matmul": 14464, "other": 1088, "total": 15552}


def test_valid_taps():
  assert ef._valid_taps(4, 4, 2, 2) == 14
  assert ef._valid_taps(10, 3, 0, 0) == 8 * 3
  assert ef._valid_taps(8, 2, 0, 0, stride=2) == 8


@pytest.mark.parametrize("case", [TOY_VIT, TOY_BEATS, TOY_POINTBERT]
                         + [c for c in be.CASES if c.preset == "tiny"], ids=lambda c: c.name)
def test_analytic_matches_jaxpr(case):
  row = be.flops_row(case, xla=False)
  assert row["traced_matmul"] == row["matmul"]
  assert row["traced_while_loops"] == 0


def test_vit_against_xla_cost_analysis():
  # Wide enough that matmuls dominate: XLA's extra count is the elementwise work (~3%).
  cfg = EvaViTConfig(img_size=224, patch_size=14, width=384, depth=1, num_heads=6)
  row = be.flops_row(be.Case("vit", "x", cfg, (224, 224, 3)), xla=True)
  assert 1.0 <= row["xla_over_analytic"] < 1.05, row


def test_bench_smoke(capsys):
  be.main(["--encoders", "vit", "--presets", "tiny", "--flops-presets", "tiny", "--batches", "2",
           "--min-reps", "1", "--max-reps", "2", "--min-time", "0"])
  last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  (row,) = last["throughput"]
  assert row["batch"] == 2 and row["samples_per_s"] > 0 and row["compile_s"] > 0
  (flops,) = last["flops"]
  assert flops["preset"] == "tiny" and flops["total"] == flops["traced_matmul"] > 0
  assert row["gflops_per_s"] == pytest.approx(flops["total"] * 2 / row["median_ms"] / 1e6)
