"""Forward throughput and FLOPs of the frozen encoders (EVA ViT, BEATs, PointBERT) on CPU.

For every encoder, three presets (see `CASES`): `tiny` (the golden-case scale), `mid` (defined
here: the real input size with a 384-wide, 4-6 layer tower) and `real` (ViT-g/14 at 224 px,
BEATs iter3 on a 512 x 128 fbank clip, ULIP-2 PointBERT on 8192 points).

* FLOPs per sample, all presets: analytic from the config (`bench.encoder_flops`, components
  listed there), the same matmul part traced from the jaxpr of the real forward, and XLA's
  `compiled.cost_analysis()["flops"]` (which also counts the elementwise work: LayerNorm,
  softmax, the erf polynomial of GELU, residual adds).
* Throughput, timed presets (`--presets`, default tiny and mid) at each `--batches` size:
  float32 weights, random init; one abstract `jit(...).lower(...).compile()` per shape (its
  time is reported apart), `--warmup` untimed calls, then timed calls (`jax.block_until_ready`)
  until both `--min-reps` calls and `--min-time` seconds are reached (at most `--max-reps`);
  the median gives samples/s and the achieved GFLOP/s (analytic total FLOPs / median time).
* `--torch`: the timed ViT presets also run as `transformers.Blip2VisionModel` (eval,
  `torch.inference_mode()`, `torch.set_num_threads(os.cpu_count())` unless `--torch-threads`,
  same sizes; it adds a final LayerNorm, negligible), alternating with JAX call by call so that
  load changes hit both. On an oversubscribed machine torch's OpenMP barriers make its median
  erratic (compare the `min_ms` figures too).

The 1-minute load average is recorded before and after every timed case (`--max-load` waits
for a quieter machine first). The last line printed is one JSON object with every figure.

  .venv/bin/python -m bench.encoders [--torch] [--batches 1,4] [--presets tiny,mid]
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
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench import encoder_flops as ef
from xblip_jax.models.encoders.beats import Beats, BeatsConfig
from xblip_jax.models.encoders.eva_vit import EvaViT, EvaViTConfig
from xblip_jax.models.encoders.pointbert import PointBert, PointBertConfig
from xblip_jax.models.layers import Precision


@dataclasses.dataclass(frozen=True)
class Case:
  """One encoder at one size: its config and the shape of one input sample."""

  encoder: str  # "vit" | "beats" | "pointbert"
  preset: str  # "tiny" | "mid" | "real"
  cfg: Any
  sample_shape: tuple[int, ...]

  @property
  def name(self) -> str:
    return f"{self.encoder}/{self.preset}"

  def flops(self) -> dict[str, int]:
    if self.encoder == "vit":
      return ef.vit_flops(self.cfg, self.sample_shape[0])
    if self.encoder == "beats":
      return ef.beats_flops(self.cfg, self.sample_shape[0])
    return ef.pointbert_flops(self.cfg, self.sample_shape[0])

  def tokens(self) -> int:
    if self.encoder == "vit":
      return (self.sample_shape[0] // self.cfg.patch_size) ** 2 + 1
    if self.encoder == "beats":
      return self.cfg.num_tokens(self.sample_shape[0])
    return self.cfg.num_group + 1


VIT_MID = EvaViTConfig(img_size=224, patch_size=14, width=384, depth=6, num_heads=6)
BEATS_MID = BeatsConfig(embed_dim=512, encoder_embed_dim=384, encoder_layers=4,
                        encoder_attention_heads=6, encoder_ffn_embed_dim=1536)
POINTBERT_MID = PointBertConfig(trans_dim=384, depth=4, num_heads=6, pc_feat_dim=768)

CASES = [
    Case("vit", "tiny", EvaViTConfig.tiny(), (32, 32, 3)),
    Case("vit", "mid", VIT_MID, (224, 224, 3)),
    Case("vit", "real", EvaViTConfig.eva_vit_g(), (224, 224, 3)),
    Case("beats", "tiny", BeatsConfig.tiny(), (64, 128)),  # the golden's 64 frames
    Case("beats", "mid", BEATS_MID, (512, 128)),
    Case("beats", "real", BeatsConfig.beats_iter3(), (512, 128)),
    Case("pointbert", "tiny", PointBertConfig.tiny(), (256, 3)),
    Case("pointbert", "mid", POINTBERT_MID, (8192, 3)),
    Case("pointbert", "real", PointBertConfig.ulip2_pointbert(), (8192, 3)),
]


def forward(case: Case) -> tuple[Callable, Any]:
  """`(fn, abstract_state)`: `fn(state, x)` is the encoder's forward returning what the bridge
  uses (ViT / BEATs tokens, PointBERT's pooled token)."""
  cls = {"vit": EvaViT, "beats": Beats, "pointbert": PointBert}[case.encoder]
  module = nnx.eval_shape(lambda: cls(case.cfg, precision=Precision.float32(), rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(module)
  pick = {"vit": lambda o: o, "beats": lambda o: o.features,
          "pointbert": lambda o: o.pooled}[case.encoder]
  return (lambda st, x: pick(nnx.merge(graphdef, st)(x))), state


def random_state(abstract_state, seed: int = 0):
  """Concrete weights for timing, drawn in numpy (no eager per-op compilation): N(0, 0.02),
  except norm scales and BatchNorm variances, which are 1."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    names = {str(getattr(k, "key", getattr(k, "name", k))) for k in path[-2:]}
    if names & {"scale", "var"}:
      return np.ones(leaf.shape, leaf.dtype)
    return (rng.standard_normal(leaf.shape, np.float32) * 0.02).astype(leaf.dtype)
  return jax.device_put(jax.tree_util.tree_map_with_path(fill, abstract_state))


def param_count(state) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.filter(nnx.Param)))


def compile_case(case: Case, batch: int, fn: Callable, state) -> tuple[Any, dict]:
  """Abstract lower + compile of `fn` at `batch`; the executable and its timings / XLA flops."""
  spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
  x = jax.ShapeDtypeStruct((batch, *case.sample_shape), jnp.float32)
  t0 = time.perf_counter()
  lowered = jax.jit(fn).lower(jax.tree.map(spec, state), x)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return compiled, {"lower_s": t1 - t0, "compile_s": t2 - t1,
                    "xla_flops_per_sample": float(cost["flops"]) / batch}


def flops_row(case: Case, xla: bool) -> dict:
  """Analytic, traced and (optionally) XLA FLOPs per sample of one case."""
  parts = case.flops()
  fn, state = forward(case)
  traced, loops = ef.traced_matmul_flops(fn, state, jax.ShapeDtypeStruct((1, *case.sample_shape),
                                                                         jnp.float32))
  row = {"encoder": case.encoder, "preset": case.preset, "sample_shape": list(case.sample_shape),
         "tokens": case.tokens(), "params": param_count(state), "parts": parts,
         **ef.totals(parts), "traced_matmul": traced, "traced_while_loops": loops,
         "config": dataclasses.asdict(case.cfg)}
  if xla:
    row["xla"] = compile_case(case, 1, fn, state)[1]["xla_flops_per_sample"]
    row["xla_over_analytic"] = row["xla"] / row["total"]
  return row


def load1() -> float:
  return round(os.getloadavg()[0], 2)


def wait_for_load(max_load: float | None, wait_s: float) -> None:
  deadline = time.monotonic() + wait_s
  while max_load is not None and load1() > max_load and time.monotonic() < deadline:
    time.sleep(5)


def measure(runs: dict[str, Callable[[], None]], warmup: int, min_reps: int, max_reps: int,
            min_time: float) -> dict[str, tuple[list[float], list[float]]]:
  """(wall seconds, process CPU seconds) per call of each run, after warm-up.

  Runs alternate, the order flipped every round. CPU seconds (all threads of this process) are
  what a loaded machine distorts least: GFLOP per CPU-second stays close to the quiet figure.
  """
  for run in runs.values():
    for _ in range(warmup):
      run()
  names = list(runs)
  times: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in names}
  count = lambda: len(times[names[0]][0])
  start = time.perf_counter()
  while count() < max_reps and (
      count() < min_reps or time.perf_counter() - start < min_time * len(names)):
    for name in (names if count() % 2 == 0 else names[::-1]):
      t0, c0 = time.perf_counter(), time.process_time()
      runs[name]()
      times[name][1].append(time.process_time() - c0)
      times[name][0].append(time.perf_counter() - t0)
  return times


def torch_vit(cfg: EvaViTConfig):
  """`transformers.Blip2VisionModel` of the same sizes (random weights, eval)."""
  from transformers import Blip2VisionConfig, Blip2VisionModel
  tcfg = Blip2VisionConfig(hidden_size=cfg.width, intermediate_size=cfg.mlp_dim,
                           num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
                           image_size=cfg.img_size, patch_size=cfg.patch_size,
                           layer_norm_eps=cfg.layer_norm_eps, qkv_bias=True)
  return Blip2VisionModel(tcfg).eval()


def throughput(case: Case, batch: int, total_flops: int, fn: Callable, state, args) -> dict:
  """Times one case at one batch size (and the torch ViT beside it when asked).

  Args:
    case: the encoder and preset.
    batch: samples per call.
    total_flops: analytic FLOPs per sample (for the achieved GFLOP/s).
    fn: the forward from `forward`.
    state: concrete weights (`random_state`), shared by every batch size.
    args: the command-line options (timing, `--torch`, `--max-load`).
  """
  start = time.perf_counter()
  compiled, info = compile_case(case, batch, fn, state)
  x = jax.device_put(np.random.default_rng(0).standard_normal((batch, *case.sample_shape),
                                                              np.float32))
  runs = {"jax": lambda: jax.block_until_ready(compiled(state, x))}
  if args.torch and case.encoder == "vit":
    import torch
    model = torch_vit(case.cfg)
    tx = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous()

    def torch_run():
      with torch.inference_mode():
        model(pixel_values=tx)
    runs["torch"] = torch_run
  wait_for_load(args.max_load, args.wait_s)
  load_before = load1()
  times = measure(runs, args.warmup, args.min_reps, args.max_reps, args.min_time)
  row = {"encoder": case.encoder, "preset": case.preset, "batch": batch, **info,
         "load_before": load_before, "load_after": load1()}
  for name, (ts, cpu) in times.items():
    med, cpu_med = statistics.median(ts), statistics.median(cpu)
    pre = "" if name == "jax" else "torch_"
    row.update({pre + "median_ms": 1e3 * med, pre + "min_ms": 1e3 * min(ts),
                pre + "samples_per_s": batch / med,
                pre + "gflops_per_s": total_flops * batch / med / 1e9,
                pre + "cpu_ms": 1e3 * cpu_med,
                pre + "gflops_per_cpu_s": total_flops * batch / max(cpu_med, 1e-9) / 1e9,
                pre + "reps": len(ts), pre + "times_ms": [round(1e3 * t, 3) for t in ts]})
  row["wall_s"] = time.perf_counter() - start
  if "torch" in times:
    row["torch_over_jax"] = row["torch_median_ms"] / row["median_ms"]
  return row


def gf(x: float) -> str:
  return f"{x / 1e9:.4g}"


def print_flops(rows: list[dict]) -> None:
  print("FLOPs per sample (GFLOP; analytic = matmul + other; traced = matmul part from the jaxpr;"
        " xla = cost_analysis, batch 1)")
  print(f"{'encoder':10s} {'preset':6s} {'tokens':>6s} {'params':>9s} {'matmul':>9s} "
        f"{'other':>8s} {'analytic':>9s} {'traced':>9s} {'xla':>9s} {'xla/an':>7s}")
  for r in rows:
    print(f"{r['encoder']:10s} {r['preset']:6s} {r['tokens']:6d} {r['params'] / 1e6:8.2f}M "
          f"{gf(r['matmul']):>9s} {gf(r['other']):>8s} {gf(r['total']):>9s} "
          f"{gf(r['traced_matmul']):>9s} {gf(r['xla']) if 'xla' in r else '-':>9s} "
          f"{r['xla_over_analytic'] if 'xla' in r else float('nan'):7.4f}")


def print_throughput(rows: list[dict]) -> None:
  print("\nforward throughput on CPU (float32; median of N timed calls after warm-up; GF/cpu-s ="
        " analytic GFLOP per process CPU-second; load = 1-min load average before-after)")
  head = (f"{'encoder':10s} {'preset':6s} {'batch':>5s} {'compile s':>9s} {'median ms':>10s} "
          f"{'min ms':>9s} {'samples/s':>10s} {'GFLOP/s':>8s} {'GF/cpu-s':>8s} {'N':>3s} "
          f"{'load':>11s}")
  torch_cols = any("torch_median_ms" in r for r in rows)
  print(head + (f" {'torch ms':>9s} {'t min ms':>9s} {'torch/jax':>9s}" if torch_cols else ""))
  for r in rows:
    line = (f"{r['encoder']:10s} {r['preset']:6s} {r['batch']:5d} "
            f"{r['lower_s'] + r['compile_s']:9.2f} {r['median_ms']:10.3f} {r['min_ms']:9.3f} "
            f"{r['samples_per_s']:10.2f} {r['gflops_per_s']:8.2f} {r['gflops_per_cpu_s']:8.2f} "
            f"{r['reps']:3d} "
            f"{r['load_before']:5.2f}-{r['load_after']:5.2f}")
    if "torch_median_ms" in r:
      line += f" {r['torch_median_ms']:9.3f} {r['torch_min_ms']:9.3f} {r['torch_over_jax']:9.2f}"
    print(line)


def environment() -> dict:
  return {"cpu_count": os.cpu_count(), "jax_devices": [str(d) for d in jax.devices()],
          "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "python": platform.python_version(),
          "machine": platform.processor() or platform.machine(), "jax": jax.__version__,
          "flax": flax.__version__}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--presets", default="tiny,mid", help="timed presets (tiny, mid, real)")
  p.add_argument("--encoders", default="vit,beats,pointbert")
  p.add_argument("--batches", default="1,4", help="batch sizes to time")
  p.add_argument("--warmup", type=int, default=1, help="untimed calls after compilation")
  p.add_argument("--min-reps", type=int, default=3)
  p.add_argument("--max-reps", type=int, default=30)
  p.add_argument("--min-time", type=float, default=1.0, help="seconds of timed calls per case")
  p.add_argument("--flops-presets", default="tiny,mid,real", help="presets in the FLOP table")
  p.add_argument("--no-xla-real", action="store_true",
                 help="skip compiling the real presets for their XLA FLOP count")
  p.add_argument("--flops-only", action="store_true", help="no timing")
  p.add_argument("--torch", action="store_true", help="time the ViT in PyTorch beside JAX")
  p.add_argument("--torch-threads", type=int, default=os.cpu_count(),
                 help="torch.set_num_threads (default: every core)")
  p.add_argument("--max-load", type=float, default=None,
                 help="before each timed case wait (up to --wait-s) for a 1-min load below this")
  p.add_argument("--wait-s", type=float, default=120.0)
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  encoders = args.encoders.split(",")
  timed = set(args.presets.split(","))
  batches = [int(b) for b in args.batches.split(",")]
  result: dict = {"bench": "encoders", "load_start": [round(x, 2) for x in os.getloadavg()]}
  print(f"load average (1, 5, 15 min) at start: {result['load_start']}; cpus {os.cpu_count()}")
  if args.torch:
    import torch
    torch.set_num_threads(args.torch_threads)
    result["torch"] = {"version": torch.__version__, "threads": torch.get_num_threads()}
  cases = [c for c in CASES if c.encoder in encoders
           and c.preset in timed | set(args.flops_presets.split(","))]
  flops = [flops_row(c, xla=not (args.no_xla_real and c.preset == "real")) for c in cases]
  print_flops(flops)
  result["flops"] = flops
  rows = []
  if not args.flops_only:
    for case, fr in zip(cases, flops):
      if case.preset in timed:
        fn, abstract = forward(case)
        state = random_state(abstract)
        rows += [throughput(case, b, fr["total"], fn, state, args) for b in batches]
    print_throughput(rows)
  result["throughput"] = rows
  result["load_end"] = [round(x, 2) for x in os.getloadavg()]
  result["args"] = vars(args)
  result["env"] = environment()
  print(f"load average at end: {result['load_end']}")
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
