"""One training step of the Q-Former bridge (frozen LLM), xblip_jax vs PyTorch, in one process.

Both sides run the same work per step: trainable LayerNorm on given encoder features ->
Q-Former (queries + instruction text, cross-attention to the features) -> `llm_proj` -> soft
prefix followed by the LLM text embeddings -> frozen LLaMA -> causal LM loss on the answer
tokens -> gradients of the trainable bridge only -> AdamW update (weight decay on ndim >= 2).

* xblip_jax: `XInstructBlip` + `train.step.make_train_step` (jitted, params and optimizer state
  donated), `train.optim.make_optimizer`; timed with `jax.block_until_ready`. Its loss runs the
  LM head on the label-carrying rows only (`assembly.text_lm_loss`), as the trainer does.
* PyTorch, the reference (`torch`): `LayerNorm` + `transformers.InstructBlipQFormerModel` +
  `Linear` + `transformers.LlamaForCausalLM` (every LLM parameter `requires_grad_(False)`), the
  HF causal LM loss on full logits from `inputs_embeds` (the LAVIS way), `torch.optim.AdamW` on
  the trainable parameters only, default (SDPA) attention, `torch.set_num_threads` to the cores
  this process may use (`os.cpu_count()` unless restricted with `taskset`, which XLA's thread
  pool follows too).
* PyTorch with the label gather (`torch_gathered`): the same model (same weights, its own
  optimizer), but the loss takes `model.model`'s hidden states, keeps the rows whose next token
  is supervised, and applies `lm_head` + cross-entropy to those rows only. `ratio` (reference
  torch / xblip_jax) is the gain of algorithm and framework together, `ratio_vs_torch_gathered`
  (torch_gathered / xblip_jax) the framework's alone.

Dropout is off on both sides (rates 0, eval mode). Repetitions alternate JAX / torch so that
load changes on a shared machine hit both equally; warm-up (and JAX compilation) is excluded.
`--check` first runs a small configuration with torch's weights loaded into ours (key tables of
`xblip_jax.convert`) and compares loss, gradient norm and updated parameters (and the gathered
torch loss / gradient norm with the reference's).

The last line printed is one JSON object (times in ms, `ratio` = torch / xblip_jax,
`ratio_vs_torch_gathered` = torch_gathered / xblip_jax, config, environment).

  .venv/bin/python -m bench.step_vs_torch [--check] [--reps 10] [--batch 8] ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

IGNORE = -100


@dataclasses.dataclass(frozen=True)
class Sizes:
  batch: int = 8
  enc_tokens: int = 257
  enc_width: int = 1408
  queries: int = 32
  q_layers: int = 4
  q_hidden: int = 768
  q_heads: int = 12
  q_intermediate: int = 3072
  q_cross_freq: int = 2
  q_text: int = 16
  q_vocab: int = 30523
  llm_layers: int = 4
  llm_hidden: int = 512
  llm_heads: int = 8
  llm_intermediate: int = 1376
  llm_vocab: int = 32001
  llm_text: int = 64


# Small enough for a quick parity check, with padding, several heads and both layer kinds.
CHECK_SIZES = Sizes(batch=3, enc_tokens=11, enc_width=40, queries=4, q_layers=2, q_hidden=64,
                    q_heads=4, q_intermediate=96, q_text=7, q_vocab=101, llm_layers=2,
                    llm_hidden=48, llm_heads=4, llm_intermediate=80, llm_vocab=97, llm_text=9)


def make_batch(s: Sizes, seed: int = 0) -> dict[str, np.ndarray]:
  """Random features, right-padded Q-Former text and LLM text (labels on the answer part)."""
  rng = np.random.default_rng(seed)
  feats = rng.standard_normal((s.batch, 1, s.enc_tokens, s.enc_width), np.float32)
  q_len = rng.integers(max(1, s.q_text // 2), s.q_text + 1, s.batch)
  q_len[0] = s.q_text
  q_mask = (np.arange(s.q_text)[None] < q_len[:, None]).astype(np.int32)
  q_ids = rng.integers(1, s.q_vocab, (s.batch, s.q_text)).astype(np.int32) * q_mask
  t_len = rng.integers(max(2, 3 * s.llm_text // 4), s.llm_text + 1, s.batch)
  t_len[0] = s.llm_text
  t_mask = (np.arange(s.llm_text)[None] < t_len[:, None]).astype(np.int32)
  t_ids = rng.integers(1, s.llm_vocab, (s.batch, s.llm_text)).astype(np.int32) * t_mask
  instr = (0.4 * t_len).astype(np.int64)  # instruction tokens are not supervised
  pos = np.arange(s.llm_text)[None]
  labels = np.where((pos >= instr[:, None]) & (pos < t_len[:, None]), t_ids, IGNORE)
  return {"image_features": feats, "qformer_ids": q_ids, "qformer_mask": q_mask,
          "llm_text_ids": t_ids, "llm_text_mask": t_mask,
          "llm_text_labels": labels.astype(np.int32)}


# --------------------------------------------------------------------------------- xblip_jax


def build_jax(s: Sizes, lr: float):
  """(model, optimizer, prompt) of xblip_jax for the sizes; dropout rates 0."""
  from flax import nnx

  from xblip_jax.models import assembly
  from xblip_jax.models.llm.llama import LlamaConfig
  from xblip_jax.models.qformer import QFormerConfig
  from xblip_jax.models.xblip import XBlipConfig, XInstructBlip
  from xblip_jax.train import optim

  qcfg = QFormerConfig(vocab_size=s.q_vocab, hidden_size=s.q_hidden, num_layers=s.q_layers,
                       num_heads=s.q_heads, intermediate_size=s.q_intermediate,
                       encoder_width=s.enc_width, cross_attention_freq=s.q_cross_freq,
                       num_query_tokens=s.queries, hidden_dropout=0.0, attention_dropout=0.0)
  lcfg = LlamaConfig(vocab_size=s.llm_vocab, hidden_size=s.llm_hidden,
                     intermediate_size=s.llm_intermediate, num_layers=s.llm_layers,
                     num_heads=s.llm_heads, num_kv_heads=s.llm_heads)
  cfg = XBlipConfig(encoder_widths=(("image", s.enc_width),), qformer=qcfg, llm=lcfg,
                    num_query_tokens=s.queries, use_cues=False)
  model = XInstructBlip(cfg, rngs=nnx.Rngs(0))
  # Constant rate (warm-up of one step from init_lr to init_lr), LAVIS AdamW otherwise.
  tx = optim.make_optimizer(optim.OptimConfig(init_lr=lr, warmup_lr=lr, warmup_steps=0))
  return model, tx, assembly.PromptIds()  # no prefix, no cues: [soft; text]


class JaxStep:
  """The jitted training step with donated params / optimizer state."""

  def __init__(self, model, tx, prompt, batch: dict[str, np.ndarray]):
    import jax
    from flax import nnx

    from xblip_jax.models.xblip import trainable
    from xblip_jax.train.step import make_train_step

    self.jax = jax
    graphdef, self.params, self.rest = nnx.split(model, trainable, ...)
    self.opt_state = tx.init(self.params)
    self.step_fn = make_train_step(graphdef, tx, prompt)
    self.batch = {k: jax.device_put(v) for k, v in batch.items()}
    self.rng = jax.random.key(0)
    self.metrics = None

  def __call__(self) -> None:
    self.params, self.opt_state, self.metrics = self.step_fn(
        self.params, self.opt_state, self.rest, self.batch, self.rng, ("image",))
    self.jax.block_until_ready((self.params, self.opt_state, self.metrics))


# ----------------------------------------------------------------------------------- PyTorch


def build_torch(s: Sizes, seed: int = 0):
  """The reference bridge: LayerNorm + HF Q-Former + Linear + frozen HF LLaMA."""
  import torch
  from torch import nn
  from transformers import (InstructBlipQFormerConfig, InstructBlipQFormerModel, LlamaConfig,
                            LlamaForCausalLM)

  torch.manual_seed(seed)
  qconf = InstructBlipQFormerConfig(
      vocab_size=s.q_vocab, hidden_size=s.q_hidden, num_hidden_layers=s.q_layers,
      num_attention_heads=s.q_heads, intermediate_size=s.q_intermediate, hidden_act="gelu",
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12,
      cross_attention_frequency=s.q_cross_freq, encoder_hidden_size=s.enc_width)
  lconf = LlamaConfig(vocab_size=s.llm_vocab, hidden_size=s.llm_hidden,
                      intermediate_size=s.llm_intermediate, num_hidden_layers=s.llm_layers,
                      num_attention_heads=s.llm_heads, num_key_value_heads=s.llm_heads,
                      rms_norm_eps=1e-6, attention_dropout=0.0, pad_token_id=0)

  class TorchXBlip(nn.Module):
    def __init__(self):
      super().__init__()
      self.ln = nn.LayerNorm(s.enc_width, eps=1e-5)
      self.query_tokens = nn.Parameter(0.02 * torch.randn(1, s.queries, s.q_hidden))
      self.qformer = InstructBlipQFormerModel(qconf)
      self.llm_proj = nn.Linear(s.q_hidden, s.llm_hidden)
      self.llm = LlamaForCausalLM(lconf)
      self.llm.requires_grad_(False)

    def forward(self, feats, q_ids, q_mask, t_ids, t_mask, labels, gathered: bool = False):
      b, nq = feats.shape[0], s.queries
      x = self.ln(feats.flatten(0, 1))
      ones = torch.ones(b, nq, dtype=q_mask.dtype)
      out = self.qformer(input_ids=q_ids, attention_mask=torch.cat([ones, q_mask], 1),
                         query_embeds=self.query_tokens.expand(b, -1, -1),
                         encoder_hidden_states=x)
      soft = self.llm_proj(out.last_hidden_state[:, :nq])
      embeds = torch.cat([soft, self.llm.get_input_embeddings()(t_ids)], 1)
      mask = torch.cat([ones.to(t_mask.dtype), t_mask], 1)
      labels = torch.cat([torch.full((b, nq), IGNORE, dtype=labels.dtype), labels], 1)
      if not gathered:  # the LAVIS / HF way: full logits, HF's shifted loss
        return self.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
      # The label gather: final hidden states, the rows whose next token is supervised, the LM
      # head and the cross-entropy on those rows only (same value as above).
      hidden = self.llm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
      targets = labels[:, 1:]
      keep = targets != IGNORE
      logits = self.llm.lm_head(hidden[:, :-1][keep])
      return nn.functional.cross_entropy(logits.float(), targets[keep])

  return TorchXBlip().eval()  # eval: dropout off (rates are 0 anyway)


def torch_optimizer(model, lr: float, impl: str):
  """AdamW on the trainable parameters only, LAVIS groups (decay 0.05 on ndim >= 2)."""
  import torch
  params = [p for p in model.parameters() if p.requires_grad]
  groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.05},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
  kw = {"fused": {"fused": True}, "foreach": {"foreach": True},
        "for-loop": {"foreach": False}}[impl]
  return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, **kw)


class TorchStep:
  def __init__(self, model, opt, batch: dict[str, np.ndarray], gathered: bool = False):
    import torch
    self.model, self.opt, self.gathered = model, opt, gathered
    t = lambda k, dt=torch.long: torch.from_numpy(batch[k]).to(dt)
    self.args = (torch.from_numpy(batch["image_features"]), t("qformer_ids"),
                 t("qformer_mask"), t("llm_text_ids"), t("llm_text_mask"), t("llm_text_labels"))
    self.loss = None

  def __call__(self) -> None:
    self.opt.zero_grad(set_to_none=True)
    loss = self.model(*self.args, gathered=self.gathered)
    loss.backward()
    self.opt.step()
    self.loss = loss.detach()


# --------------------------------------------------------------------------------- parity


def _key_table(jax_model, with_llm: bool):
  """Our paths <-> the torch module's keys, from the converters' tables."""
  from xblip_jax.convert import llama_keys, qformer_keys
  from xblip_jax.convert.mapping import copy, layer_norm, linear, prefixed
  cfg = jax_model.cfg
  rules = (layer_norm("ln.image", "ln") + [copy("query_tokens.image", "query_tokens")]
           + linear("llm_proj.image", "llm_proj")
           + prefixed(qformer_keys.hf_rules(cfg.qformer), "qformer.image.", "qformer."))
  return rules + (prefixed(llama_keys.hf_rules(cfg.llm), "llm.", "llm.") if with_llm else [])


def check(lr: float = 1e-3) -> dict:
  """Loss, gradient norm and one AdamW update: JAX vs torch with identical weights."""
  import torch
  from flax import nnx

  from xblip_jax.convert import qformer_keys
  from xblip_jax.convert.mapping import export_state_dict, load_state_dict, unmapped_params
  s = CHECK_SIZES
  tmodel = build_torch(s, seed=1)
  with torch.no_grad():  # move every weight off its default so that mapping errors show
    for name, p in tmodel.named_parameters():
      if p.ndim == 1:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / np.sqrt(p.shape[-1]))
  tsd = lambda: {k: v.detach().numpy().copy() for k, v in tmodel.state_dict().items()}
  jmodel, tx, prompt = build_jax(s, lr)
  rules = _key_table(jmodel, with_llm=True)
  assert unmapped_params(jmodel, rules) == [], unmapped_params(jmodel, rules)
  loaded = load_state_dict(jmodel, rules, tsd(),
                           ignore=["qformer\\." + p for p in qformer_keys.HF_IGNORE]).loaded
  batch = make_batch(s, seed=3)
  jstep = JaxStep(jmodel, tx, prompt, batch)
  jstep()
  tstep = TorchStep(tmodel, torch_optimizer(tmodel, lr, "for-loop"), batch)
  before = tsd()
  gnorm = lambda grads: float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))
  loss_g = tmodel(*tstep.args, gathered=True)  # the label-gather variant: same loss, gradients
  loss_g.backward()
  g_gnorm = gnorm({k: p.grad for k, p in tmodel.named_parameters() if p.grad is not None})
  tmodel.zero_grad(set_to_none=True)
  loss = tmodel(*tstep.args)
  loss.backward()
  grads = {k: p.grad for k, p in tmodel.named_parameters() if p.grad is not None}
  t_gnorm = gnorm(grads)
  tstep.opt.step()
  after = tsd()
  nnx.update(jmodel, jstep.params)
  ours = export_state_dict(jmodel, _key_table(jmodel, with_llm=False))
  # Per tensor, |update_jax - update_torch| / |update_torch| (L2 norms), the largest. Adam turns
  # float noise into +-lr steps, so tensors whose gradient is mathematically zero are skipped
  # (attention key biases: softmax is invariant to a per-query constant).
  diffs = {k: float(np.linalg.norm(ours[k] - after[k]) / np.linalg.norm(after[k] - before[k]))
           for k in ours if float(grads[k].abs().max()) > 1e-6}
  worst = max(diffs, key=diffs.get)
  out = {"loss_jax": float(jstep.metrics["loss"]), "loss_torch": float(loss.detach()),
         "grad_norm_jax": float(jstep.metrics["grad_norm"]), "grad_norm_torch": t_gnorm,
         "loss_torch_gathered": float(loss_g.detach()), "grad_norm_torch_gathered": g_gnorm,
         "max_update_rel_err": diffs[worst], "worst_update": worst, "tensors_loaded": loaded}
  out["ok"] = bool(abs(out["loss_jax"] - out["loss_torch"]) <= 1e-4 * abs(out["loss_torch"])
                   and abs(out["grad_norm_jax"] - t_gnorm) <= 1e-3 * t_gnorm
                   and diffs[worst] <= 1e-2
                   and abs(out["loss_torch_gathered"] - out["loss_torch"])
                   <= 1e-5 * abs(out["loss_torch"])
                   and abs(g_gnorm - t_gnorm) <= 1e-4 * t_gnorm)
  return out


# ------------------------------------------------------------------------------ measurement


def measure(steps: dict, warmup: int, reps: int):
  """Warm-up, then `reps` rounds; each round runs every side once (order alternating).

  Returns wall-clock and process CPU times (user + system, all threads) in ms per step.
  """
  for name, fn in steps.items():
    for _ in range(warmup):
      fn()
  times: dict[str, list[float]] = {name: [] for name in steps}
  cpu: dict[str, list[float]] = {name: [] for name in steps}
  names = list(steps)
  for r in range(reps):
    for name in (names if r % 2 == 0 else names[::-1]):
      c0, t0 = time.process_time(), time.perf_counter()
      steps[name]()
      times[name].append(1e3 * (time.perf_counter() - t0))
      cpu[name].append(1e3 * (time.process_time() - c0))
  return times, cpu


def summary(ms: list[float]) -> dict[str, float]:
  q = np.percentile(ms, [25, 75])
  return {"median": statistics.median(ms), "min": min(ms), "max": max(ms),
          "p25": float(q[0]), "p75": float(q[1])}


def environment() -> dict:
  import flax
  import jax
  import torch
  import transformers
  load = os.getloadavg() if hasattr(os, "getloadavg") else None
  return {"cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
          "torch_threads": torch.get_num_threads(),
          "torch_interop_threads": torch.get_num_interop_threads(),
          "jax_devices": [str(d) for d in jax.devices()],
          "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
          "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", ""),
          "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", ""),
          "loadavg": [round(x, 2) for x in load] if load else None,
          "python": platform.python_version(),
          "machine": platform.processor() or platform.machine(),
          "jax": jax.__version__, "flax": flax.__version__, "torch": torch.__version__,
          "transformers": transformers.__version__}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  for f in dataclasses.fields(Sizes):
    p.add_argument("--" + f.name.replace("_", "-"), type=int, default=f.default)
  p.add_argument("--warmup", type=int, default=2, help="untimed steps per side (after compile)")
  p.add_argument("--reps", type=int, default=10, help="timed steps per side")
  p.add_argument("--lr", type=float, default=1e-5)
  p.add_argument("--torch-adamw", choices=("fused", "foreach", "for-loop"), default="fused",
                 help="torch.optim.AdamW implementation (fused is the fastest on CPU)")
  p.add_argument("--only", choices=("all", "both", "jax", "torch"), default="all",
                 help="all: xblip_jax, torch and torch_gathered; both: xblip_jax and torch")
  p.add_argument("--max-load", type=float, default=0.0,
                 help="before timing, wait (up to --wait-s) until the 1-min load is at most this")
  p.add_argument("--wait-s", type=float, default=600.0)
  p.add_argument("--check", action="store_true", help="parity check on a small config first")
  p.add_argument("--check-only", action="store_true")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax
  import torch
  # The cores this process may run on (os.cpu_count() ignores `taskset`); XLA sizes its pool
  # the same way.
  threads = len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  s = Sizes(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Sizes)})
  result: dict = {"bench": "step_vs_torch"}
  if args.check or args.check_only:
    result["check"] = check()
    print("parity (small config, identical weights): " + ", ".join(
        f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in result["check"].items()))
    if args.check_only:
      print(json.dumps(result))
      return 0 if result["check"]["ok"] else 1
  batch = make_batch(s)
  steps, compile_ms = {}, None
  if args.only in ("all", "both", "jax"):
    model, tx, prompt = build_jax(s, args.lr)
    jstep = JaxStep(model, tx, prompt, batch)
    t0 = time.perf_counter()
    jstep()  # compile + first step
    compile_ms = 1e3 * (time.perf_counter() - t0)
    steps["xblip_jax"] = jstep
  if args.only in ("all", "both", "torch"):
    tmodel = build_torch(s)
    steps["torch"] = TorchStep(tmodel, torch_optimizer(tmodel, args.lr, args.torch_adamw), batch)
  if args.only in ("all", "torch"):
    gmodel = build_torch(s)  # same seed, same weights; its own optimizer state
    steps["torch_gathered"] = TorchStep(
        gmodel, torch_optimizer(gmodel, args.lr, args.torch_adamw), batch, gathered=True)
  if "torch" in steps:
    attn = (tmodel.qformer.config._attn_implementation, tmodel.llm.config._attn_implementation)
    result["torch_attention"] = {"qformer": attn[0], "llm": attn[1]}
    n_train = sum(p.numel() for p in tmodel.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in tmodel.parameters())
    result["params"] = {"trainable": n_train, "frozen": n_all - n_train}
  deadline = time.time() + args.wait_s
  while args.max_load and os.getloadavg()[0] > args.max_load and time.time() < deadline:
    time.sleep(10)
  load_before = os.getloadavg()[0]
  times, cpu = measure(steps, args.warmup, args.reps)
  load_after = os.getloadavg()[0]
  stats = {name: summary(ms) for name, ms in times.items()}
  print(f"\none training step, batch {s.batch}, {args.reps} reps after {args.warmup} warm-up, "
        f"{threads} threads; load avg {load_before:.2f} -> {load_after:.2f}")
  print(f"{'ms':15s} {'median':>9s} {'p25':>9s} {'p75':>9s} {'min':>9s} {'max':>9s} "
        f"{'cpu med':>9s}")
  for name, st in stats.items():
    print(f"{name:15s} " + " ".join(f"{st[k]:9.1f}" for k in ("median", "p25", "p75", "min",
                                                               "max"))
          + f" {statistics.median(cpu[name]):9.1f}")
  # ratio: the reference torch step over ours; ratio_vs_torch_gathered: torch with the same
  # label gather over ours (the framework's share of the gain, without the algorithm's).
  for side, key in (("torch", "ratio"), ("torch_gathered", "ratio_vs_torch_gathered")):
    if side not in stats or "xblip_jax" not in stats:
      continue
    ratio = stats[side]["median"] / stats["xblip_jax"]["median"]
    per_round = [t / j for t, j in zip(times[side], times["xblip_jax"])]
    print(f"ratio {side}/jax: {ratio:.2f}x (medians); per round min {min(per_round):.2f}x, "
          f"median {statistics.median(per_round):.2f}x, max {max(per_round):.2f}x")
    result[key] = ratio
    result[key + "_per_round"] = {"min": min(per_round), "max": max(per_round),
                                  "median": statistics.median(per_round)}
  if "ratio" in result:
    result["ratio_torch_over_jax"] = result["ratio"]  # the name earlier runs recorded
  result["loadavg_1min"] = {"before": load_before, "after": load_after}
  if "xblip_jax" in steps:
    result["jax_ms"] = stats["xblip_jax"]
    result["jax_compile_ms"] = compile_ms
    result["jax_loss"] = float(steps["xblip_jax"].metrics["loss"])
    cache_size = getattr(steps["xblip_jax"].step_fn, "_cache_size", None)
    result["jax_compilations"] = cache_size() if cache_size else None  # 1: no recompilation
  for side in ("torch", "torch_gathered"):
    if side in steps:
      result[side + "_ms"] = stats[side]
      result[side + "_loss"] = float(steps[side].loss)
  result["times_ms"] = {k: [round(x, 1) for x in v] for k, v in times.items()}
  result["cpu_ms"] = {k: [round(x, 1) for x in v] for k, v in cpu.items()}
  result["config"] = dict(dataclasses.asdict(s), warmup=args.warmup, reps=args.reps,
                          threads=threads,
                          torch_adamw=args.torch_adamw, lr=args.lr)
  result["env"] = environment()
  print(json.dumps(result))
  return 0 if result.get("check", {"ok": True})["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
