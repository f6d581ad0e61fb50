"""Evaluation outputs: `<workdir>/eval/<set>.json` per set and the `results.md` table.

Per-set files keep every prediction with its references and per-example score, so a number in
the table can be traced to the answers behind it. Only process 0 writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax

from xblip_jax.eval.scoring import HEADLINE
from xblip_jax.eval.tasks import Task


def write_set(workdir: Path, name: str, task: Task, metrics: Mapping[str, Any],
              preds: Sequence[Mapping[str, Any]]) -> None:
  if jax.process_index() != 0:
    return
  out = Path(workdir) / "eval"
  out.mkdir(parents=True, exist_ok=True)
  (out / f"{name}.json").write_text(json.dumps(
      {"set": name, "task": task.name, "metric": task.metric, "prompt": task.prompt,
       "metrics": dict(metrics), "predictions": list(preds)}, indent=1))


def table(results: Mapping[str, Mapping[str, Any]], tasks: Mapping[str, Task]) -> str:
  """Markdown: one row per set and reported metric (values as fractions, LAVIS prints x100)."""
  lines = ["| set | task | metric | value | n |", "|---|---|---|---|---|"]
  for name, metrics in results.items():
    task = tasks[name]
    head = HEADLINE[task.metric]
    names = [head] + (["Bleu_4", "METEOR", "ROUGE_L"] if task.metric == "caption" else [])
    names += ["accuracy"] if "accuracy" in metrics else []
    names += ["loss"] if "loss" in metrics else []
    for metric in names:
      if metric in metrics:
        lines.append(f"| {name} | {task.name} | {metric} | {metrics[metric]:.4f} | "
                     f"{metrics.get('num_examples', 0)} |")
  return "\n".join(lines) + "\n"


def write_table(workdir: Path, results: Mapping[str, Mapping[str, Any]],
                tasks: Mapping[str, Task]) -> str:
  text = table(results, tasks)
  if jax.process_index() == 0:
    out = Path(workdir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
  return text
