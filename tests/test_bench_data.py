"""bench/data.py at tiny sizes: runs, and its JSON line holds consistent figures."""

from __future__ import annotations

import json

from bench import data as bench_data
from xblip_jax.train import metrics


def test_bench_data_tiny_runs_and_reports_json(capsys):
  bench_data.main(["--tiny", "--experiments", "demo:pc", "--modalities", "image,pc",
                   "--files", "2", "--samples", "2", "--batch-size", "1"])
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert set(result["supply"]) == {"image", "pc"}
  for modality in result["supply"].values():
    assert set(modality) == {"raw", "shards"}
    for run in modality.values():
      assert run["samples"] == 2 and run["samples_per_core_s"] > 0
  (demand,) = result["demand"]
  assert demand["modality"] == "pc" and demand["flops_per_example"] > 0
  supply = result["supply"]["pc"]
  for acc, (_, kind) in bench_data.ACCELERATORS.items():
    a = demand["accelerators"][acc]
    rate = metrics.PEAK_TFLOPS[kind] * 1e12 * result["mfu"] / demand["flops_per_example"]
    assert abs(a["samples_per_s"] - rate) <= 0.01
    assert abs(a["step_s"] * a["devices"] * rate / demand["global_batch"] - 1) < 1e-3
    for kind_, cores in a["cores_per_accelerator"].items():
      expected = a["samples_per_s"] / supply[kind_]["samples_per_core_s"]
      assert abs(cores - expected) <= 0.01 * expected + 0.01
