"""Generation throughput, xblip_jax `decode.api` vs transformers `generate`, in one process.

Both sides decode the same random LLaMA (weights copied from the torch model into ours with the
`xblip_jax.convert` key table) from the same prompt embeddings: a soft prefix (the Q-Former
tokens) followed by a left-padded instruction (rows of a batch have different instruction
lengths; the padding sits between prefix and instruction, as in X-InstructBLIP's `generate`).
EOS is disabled on both sides so every call generates exactly `--new` tokens per row.

* greedy: `num_beams=1`, no penalties (the trainer's evaluation decoding);
* beam5: `num_beams=5`, `length_penalty=1.0`, `repetition_penalty=1.15` (captioning preset).

xblip_jax: `decode.api.jit_generate` (prefill once, `lax.while_loop`, KV cache; transformers 5
semantics, `hf_version="5"`), compile time reported separately. transformers: `LlamaForCausalLM.generate(inputs_embeds=..., attention_mask=
..., max_new_tokens=...)` in `torch.inference_mode()`, eval mode, default attention,
`torch.set_num_threads(os.cpu_count())`, one warm-up call excluded. Repetitions alternate the two
sides so load changes on a shared machine hit both; process CPU time per call is reported too
(less distorted by other jobs). Tokens/s counts returned tokens (`batch * new`), not beam
hypotheses. `match` says whether both sides returned the same ids.

The last line printed is one JSON object (times in ms, ratio = torch time / jax time).

  .venv/bin/python -m bench.generate_vs_torch [--reps 5] [--new 32] [--batches 1,8]
      [--max-load 2 --wait-s 600] [--threads 1] [--xla-options JSON]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np


def load_avg() -> float:
  return os.getloadavg()[0]


def build(args):
  """The torch model and ours with the same weights."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from xblip_jax.convert import mapping  # pylint: disable=import-outside-toplevel
  from xblip_jax.convert.llama_keys import hf_rules, ignore_patterns  # pylint: disable=C0415
  from xblip_jax.models.layers import Precision  # pylint: disable=import-outside-toplevel
  from xblip_jax.models.llm.llama import Llama, LlamaConfig  # pylint: disable=C0415

  torch.manual_seed(0)
  hf_cfg = transformers.LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
      num_hidden_layers=args.layers, num_attention_heads=args.heads,
      num_key_value_heads=args.heads, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
      pad_token_id=0)
  hf = transformers.LlamaForCausalLM(hf_cfg).eval()
  with torch.no_grad():  # peaked, untied logits: greedy/beam choices are stable across sides
    for name, p in hf.named_parameters():
      if "norm" not in name:
        p.normal_(std=(4.0 if "lm_head" in name else 1.0) * p.shape[-1] ** -0.5)
  hf.generation_config.eos_token_id = None  # fixed lengths on both sides
  hf.generation_config.pad_token_id = 0
  cfg = LlamaConfig.from_hf(hf_cfg.to_dict())
  ours = nnx.eval_shape(lambda: Llama(cfg, precision=Precision(), rngs=nnx.Rngs(0)))
  sd = {k: v.numpy() for k, v in hf.state_dict().items()}
  mapping.load_state_dict(ours, hf_rules(cfg), sd, ignore=ignore_patterns(cfg, lavis=False))
  return hf, ours


def prompt(args, batch: int, seed: int = 0):
  """Soft prefix + left-padded instruction: embeddings (numpy) and mask."""
  rng = np.random.default_rng(seed)
  prefix = rng.standard_normal((batch, args.prefix, args.hidden), np.float32)
  table_rows = rng.integers(3, args.vocab, (batch, args.prompt))
  lengths = rng.integers(args.prompt // 2, args.prompt + 1, batch)
  lengths[0] = args.prompt
  mask_text = (np.arange(args.prompt)[None] >= (args.prompt - lengths)[:, None]).astype(np.int32)
  return prefix, table_rows, mask_text


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--new", type=int, default=32, help="new tokens per row")
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--modes", default="greedy,beam5")
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--hidden", type=int, default=512)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--intermediate", type=int, default=1376)
  parser.add_argument("--vocab", type=int, default=32001)
  parser.add_argument("--prefix", type=int, default=32)
  parser.add_argument("--prompt", type=int, default=16)
  parser.add_argument("--max-load", type=float, default=None,
                      help="wait (up to --wait-s) for the 1-min load average to drop below this")
  parser.add_argument("--wait-s", type=float, default=600)
  parser.add_argument("--xla-options", default="{}",
                      help='XLA options for the generate program (JSON), e.g. '
                           '\'{"xla_cpu_experimental_ynn_fusion_type": ""}\' for Eigen dots')
  parser.add_argument("--no-head-table", action="store_true",
                      help="LM head as its (hidden, vocab) kernel (faster with Eigen dots)")
  parser.add_argument("--threads", type=int, default=None,
                      help="pin the process to this many cores (both sides use them all)")
  args = parser.parse_args()
  if args.threads is not None:  # pin the process before jax / torch size their thread pools
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
  if args.max_load is not None:
    deadline = time.time() + args.wait_s
    while load_avg() > args.max_load and time.time() < deadline:
      time.sleep(10)

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel

  from xblip_jax.decode.api import DecodeConfig, jit_generate  # pylint: disable=C0415

  torch.set_num_threads(args.threads or os.cpu_count())  # == cores available to the process
  load_start = load_avg()
  hf, ours = build(args)
  modes = {
      "greedy": dict(num_beams=1, repetition_penalty=1.0, length_penalty=1.0),
      "beam5": dict(num_beams=5, repetition_penalty=1.15, length_penalty=1.0),
  }
  rows, results = [], {}
  for batch in [int(b) for b in args.batches.split(",")]:
    prefix, ids, mask_text = prompt(args, batch)
    with torch.inference_mode():
      text = hf.get_input_embeddings()(torch.tensor(ids)).numpy()
    emb = np.concatenate([prefix, text], axis=1)
    mask = np.concatenate([np.ones((batch, args.prefix), np.int32), mask_text], axis=1)
    emb_t, mask_t = torch.tensor(emb), torch.tensor(mask, dtype=torch.long)
    emb_j, mask_j = jnp.asarray(emb), jnp.asarray(mask)
    for mode in args.modes.split(","):
      kw = modes[mode]
      cfg = DecodeConfig(max_new_tokens=args.new, min_new_tokens=0, hf_version="5",
                         eos_id=None, **kw)
      fn = jit_generate(ours, cfg, compiler_options=json.loads(args.xla_options) or None,
                        head_table=False if args.no_head_table else None)
      t0 = time.perf_counter()
      got = np.asarray(jax.block_until_ready(fn(emb_j, mask_j))[0])
      compile_s = time.perf_counter() - t0

      def run_torch():
        with torch.inference_mode():
          return hf.generate(inputs_embeds=emb_t, attention_mask=mask_t, do_sample=False,
                             max_new_tokens=args.new, min_new_tokens=0, **kw)

      want = run_torch().numpy()  # warm-up
      jax_ms, torch_ms, jax_cpu, torch_cpu = [], [], [], []
      load_case = load_avg()
      for _ in range(args.reps):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(emb_j, mask_j))
        jax_ms.append(1e3 * (time.perf_counter() - t0))
        jax_cpu.append(1e3 * (time.process_time() - c0))
        t0, c0 = time.perf_counter(), time.process_time()
        run_torch()
        torch_ms.append(1e3 * (time.perf_counter() - t0))
        torch_cpu.append(1e3 * (time.process_time() - c0))
      j, t = statistics.median(jax_ms), statistics.median(torch_ms)
      tokens = batch * args.new
      name = f"{mode}_b{batch}"
      results[name] = dict(jax_ms=round(j, 2), torch_ms=round(t, 2), ratio=round(t / j, 2),
                           jax_tok_s=round(1e3 * tokens / j, 1),
                           torch_tok_s=round(1e3 * tokens / t, 1),
                           jax_compile_s=round(compile_s, 2),
                           jax_cpu_ms=round(statistics.median(jax_cpu), 1),
                           torch_cpu_ms=round(statistics.median(torch_cpu), 1),
                           load=round((load_case + load_avg()) / 2, 2),
                           match=bool(want.shape == got.shape and (want == got).all()))
      rows.append((name, results[name]))

  print(f"{'case':<12}{'jax ms':>10}{'torch ms':>10}{'jax tok/s':>11}{'torch tok/s':>12}"
        f"{'ratio':>7}{'jax cpu ms':>11}{'torch cpu ms':>13}{'compile s':>10}{'load':>6}"
        f"{'match':>7}")
  for name, r in rows:
    print(f"{name:<12}{r['jax_ms']:>10.1f}{r['torch_ms']:>10.1f}{r['jax_tok_s']:>11.1f}"
          f"{r['torch_tok_s']:>12.1f}{r['ratio']:>7.2f}{r['jax_cpu_ms']:>11.1f}"
          f"{r['torch_cpu_ms']:>13.1f}{r['jax_compile_s']:>10.1f}{r['load']:>6.1f}"
          f"{str(r['match']):>7}")
  summary = dict(
      bench="generate_vs_torch", results=results,
      ratios={k: v["ratio"] for k, v in results.items()},
      config=dict(layers=args.layers, hidden=args.hidden, heads=args.heads,
                  intermediate=args.intermediate, vocab=args.vocab, prefix=args.prefix,
                  prompt=args.prompt, new=args.new, reps=args.reps, dtype="float32",
                  threads=args.threads, xla_options=json.loads(args.xla_options),
                  head_table=not args.no_head_table),
      env=dict(cpu_count=os.cpu_count(), load_start=round(load_start, 2),
               load_end=round(load_avg(), 2), jax=jax.__version__, torch=torch.__version__,
               torch_threads=torch.get_num_threads(), platform=platform.platform()))
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
