"""Entry point: `python -m xblip_jax.main --config configs/<experiment>.py --workdir DIR`.

`--config` takes a Python file with `get_config(arg)` (`configs/x.py:arg` passes `arg`);
`--config.<field>=value` overrides one field. The run's mode comes from `config.mode`:

  train  train, checkpoint and evaluate (`train.trainer.train_and_evaluate`)
  plan   compile the training step for the configured mesh on simulated CPU devices and print
         per-device memory (`train.planner`); writes `<workdir>/plan.json`

Multi-host runs (`config.distributed=True`, or a launcher that sets JAX's cluster variables)
call `jax.distributed.initialize()` first; every host runs the same command.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and summaries.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS

MODES = ("train", "plan")


def _plan(config, workdir: Path) -> None:
  devices = int(config.plan.devices)
  if devices:  # simulated CPU devices; must happen before JAX starts its backends
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", devices)
  from xblip_jax.train import planner  # pylint: disable=import-outside-toplevel

  result = planner.plan(config)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "plan.json").write_text(json.dumps(result, indent=2))
  print(planner.table(result))


def main(argv):
  del argv
  config = FLAGS.config
  if config.mode not in MODES:
    raise app.UsageError(f"config.mode={config.mode!r}; choose one of {MODES}")
  workdir = Path(FLAGS.workdir)
  if config.mode == "plan":
    _plan(config, workdir)
    return
  if config.get("distributed", False):
    jax.distributed.initialize()
  logging.info("JAX processes: %d, devices: %s", jax.process_count(), jax.devices())
  from xblip_jax.train.trainer import train_and_evaluate  # pylint: disable=import-outside-toplevel

  summary = train_and_evaluate(config, workdir)
  if jax.process_index() == 0:
    print(json.dumps({"summary": f"{workdir}/summary.json", "preempted": summary["preempted"],
                      "first_loss": summary["first_loss"], "last_loss": summary["last_loss"],
                      "eval": summary["eval"]}))


if __name__ == "__main__":
  app.run(main)
