"""Throughput accounting: analytic FLOPs per example, MFU, and where metrics are written.

FLOPs per example (a matmul with N weights on T tokens is 2NT forward):
  frozen encoders  forward only: 2N per token, plus 4 L T^2 D for the attention products;
  Q-Former         trained: 6N per token, each weight counted on the tokens it sees
                   (cross-attention K/V on encoder tokens, query FFN on queries, text FFN on
                   text, self-attention on both), attention products x3 (forward + backward);
                   the projection into the LLM likewise 6N on the soft tokens;
  frozen LLM       under a trained prefix: forward 2N plus the input-gradient half of the
                   backward 2N = 4N per token (no weight gradients), attention products x3;
                   the embedding table is a lookup and is not counted.
The causal mask is not discounted (standard practice). MFU divides the achieved rate by the
devices' dense bf16 peak (`PEAK_TFLOPS`, or `train.peak_tflops`); compile time is reported on its
own and excluded from step times.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from absl import logging
from flax import nnx

from xblip_jax.models import assembly

# Dense bf16 peak TFLOP/s per device, by `jax.Device.device_kind` prefix.
PEAK_TFLOPS = {"TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
               "TPU v4": 275.0, "TPU v6": 918.0, "NVIDIA H100": 989.0, "NVIDIA H200": 989.0,
               "NVIDIA A100": 312.0}


def peak_tflops(device_kind: str, override: float = 0.0) -> float | None:
  if override:
    return float(override)
  for prefix, value in PEAK_TFLOPS.items():
    if device_kind.startswith(prefix):
      return value
  return None


def param_sizes(*states) -> dict[str, int]:
  """Parameter count of every variable by its '/'-joined path, over the given states."""
  return {"/".join(map(str, p)): int(np.prod(v.get_value().shape))
          for state in states for p, v in nnx.to_flat_state(state)}


def _attn(layers: int, t_q: int, t_k: int, width: int) -> float:
  """Forward FLOPs of the two attention products (scores and values) over all heads."""
  return 4.0 * layers * t_q * t_k * width


@dataclasses.dataclass(frozen=True)
class FlopCount:
  """Training FLOPs of one example, by tower, and the LLM sequence length."""

  encoders: float
  qformer: float
  llm: float
  llm_tokens: int

  @property
  def total(self) -> float:
    return self.encoders + self.qformer + self.llm


def encoder_tokens(modality: str, enc_cfg, media) -> tuple[int, int]:
  """(frames or clips per example, tokens per frame) a frozen encoder produces."""
  if modality == "image":
    return 1, enc_cfg.num_tokens
  if modality == "video":
    return int(media.n_frms), enc_cfg.num_tokens
  if modality == "audio":
    p = enc_cfg.input_patch_size
    return int(media.num_clips), (int(media.frames_per_clip) // p) * (enc_cfg.num_mel_bins // p)
  return 1, enc_cfg.num_group + 1


def example_flops(sizes: Mapping[str, int], bridge, enc_cfgs: Mapping[str, Any],
                  order: Sequence[str], *, media, llm_text_len: int, qformer_len: int,
                  prompt: assembly.PromptIds) -> FlopCount:
  """Analytic training FLOPs of one example of modalities `order` (see the module docstring).

  Args:
    sizes: `param_sizes` of the model's (abstract) states.
    bridge: the `XBlipConfig`; `enc_cfgs`: each modality's encoder config.
    order, media, llm_text_len, qformer_len, prompt: what the batch holds.
  """
  under = lambda prefix: {k: v for k, v in sizes.items() if k.startswith(prefix)}
  enc = qf = 0.0
  soft_len = {}
  nq = bridge.num_query_tokens
  for m in order:
    frames, t_enc = encoder_tokens(m, enc_cfgs[m], media)
    cfg = enc_cfgs[m]
    params = under(f"encoders/{m}/")
    if m == "pc":  # the mini-PointNet runs on every point of every group, the head on one row
      on_points = sum(v for k, v in params.items() if k.startswith(f"encoders/{m}/encoder/"))
      head = sum(v for k, v in params.items() if k.startswith(f"encoders/{m}/pc_projection/"))
      rest = sum(params.values()) - on_points - head
      fwd = 2.0 * (on_points * cfg.num_group * cfg.group_size + rest * t_enc + head)
      fwd += _attn(cfg.depth, t_enc, t_enc, cfg.trans_dim)
    else:
      depth, width = ((cfg.depth, cfg.width) if m in ("image", "video")
                      else (cfg.encoder_layers, cfg.encoder_embed_dim))
      fwd = 2.0 * sum(params.values()) * t_enc + _attn(depth, t_enc, t_enc, width)
    enc += frames * fwd
    key = "shared" if bridge.shared_qformer else m
    q = under(f"qformer/{key}/")
    qcfg = bridge.qformer
    text = qformer_len if qcfg.text_input else 0
    tokens = {"cross_attention/key": t_enc, "cross_attention/value": t_enc,
              "cross_attention": nq, "query_ffn": nq, "text_ffn": text, "attention": nq + text}
    per_pass = 0.0
    for k, v in q.items():
      if "embeddings" in k or "/norm/" in k:
        continue
      t = next(n for name, n in tokens.items() if f"/{name}/" in k)
      per_pass += 2.0 * v * t
    n_cross = sum(qcfg.has_cross_attention(i) for i in range(qcfg.num_layers))
    per_pass += _attn(qcfg.num_layers, nq + text, nq + text, qcfg.hidden_size)
    per_pass += _attn(n_cross, nq, t_enc, qcfg.hidden_size)
    proj = sum(under(f"llm_proj/{key}/").values()) + sum(under(f"encoder_proj/{m}/").values())
    qf += frames * 3.0 * (per_pass + 2.0 * proj * nq)
    soft_len[m] = frames * nq
  seq = llm_text_len
  for kind, value in assembly.segments(prompt, order, bridge.layout, bridge.use_cues):
    seq += len(value) if kind == "ids" else soft_len[value]
  n_llm = sum(v for k, v in under("llm/").items() if "embed_tokens" not in k)
  llm = 4.0 * n_llm * seq + 3.0 * _attn(bridge.llm.num_layers, seq, seq, bridge.llm.hidden_size)
  return FlopCount(encoders=enc, qformer=qf, llm=llm, llm_tokens=seq)


class Writer:
  """Scalars to TensorBoard event files, `metrics.jsonl` and the console (process 0 only)."""

  def __init__(self, workdir: Path, *, enabled: bool, total_steps: int,
               tensorboard: bool = True):
    self.enabled, self.total = enabled, total_steps
    self.tb = None
    self.jsonl = None
    if not enabled:
      return
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self.tb = SummaryWriter(str(workdir / "tensorboard"))
    self.jsonl = (workdir / "metrics.jsonl").open("a")

  def truncate_after(self, path: Path, step: int) -> None:
    """Drops `metrics.jsonl` rows past `step` (written after the checkpoint a run resumes)."""
    if not self.enabled or not path.exists():
      return
    self.jsonl.close()
    rows = [r for r in path.read_text().splitlines() if r and json.loads(r)["step"] <= step]
    path.write_text("".join(r + "\n" for r in rows))
    self.jsonl = path.open("a")

  def write(self, step: int, row: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    for key, value in row.items():
      if self.tb is not None and isinstance(value, (int, float)) and key != "step":
        self.tb.add_scalar(key, value, step)
    self.jsonl.write(json.dumps({"step": step, **row}) + "\n")
    self.jsonl.flush()
    if self.tb is not None:
      self.tb.flush()
    self._console(step, row)

  def _console(self, step: int, row: Mapping[str, Any]) -> None:
    width = 24
    done = int(width * step / max(self.total, 1))
    bar = "#" * done + "-" * (width - done)
    keys = ("loss", "examples_per_s", "tokens_per_s_per_device", "mfu", "step_s", "eta_s")
    parts = [f"{k}={row[k]:.4g}" for k in keys if isinstance(row.get(k), (int, float))]
    line = f"[{bar}] {step}/{self.total} " + " ".join(parts)
    logging.info("%s", line)
    if sys.stderr.isatty():
      print("\r" + line, end="", file=sys.stderr, flush=True)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()
    if self.jsonl is not None:
      self.jsonl.close()


class Throughput:
  """Wall time per step over log windows; compiling steps are timed apart and left out."""

  def __init__(self, num_devices: int, peak: float | None):
    self.devices, self.peak = num_devices, peak
    self.compile_s = 0.0
    self.reset()

  def reset(self) -> None:
    self.t0, self.steps, self.flops, self.examples, self.tokens = time.perf_counter(), 0, 0., 0, 0

  def add(self, flops: float, examples: int, tokens: int) -> None:
    self.steps += 1
    self.flops += flops
    self.examples += examples
    self.tokens += tokens

  def compiled(self, seconds: float) -> None:
    """A step that compiled took `seconds` (synced on both sides); restart the window."""
    self.compile_s += seconds
    self.reset()

  def report(self, remaining_steps: int) -> dict[str, float]:
    """Rates since the last report (call after the step's results are ready)."""
    elapsed = time.perf_counter() - self.t0
    if not self.steps or elapsed <= 0:
      return {"compile_s": round(self.compile_s, 2)}
    step_s = elapsed / self.steps
    out = {"step_s": step_s, "examples_per_s": self.examples / elapsed,
           "tokens_per_s_per_device": self.tokens / elapsed / self.devices,
           "tflops_per_device": self.flops / elapsed / self.devices / 1e12,
           "compile_s": round(self.compile_s, 2), "eta_s": step_s * remaining_steps}
    if self.peak:
      out["mfu"] = out["tflops_per_device"] / self.peak
    self.reset()
    return out
