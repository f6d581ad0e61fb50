"""Entry point: `python -m xblip_jax.main --config configs/<experiment>.py --workdir DIR`.

`--config` takes a Python file with `get_config(arg)` (`configs/x.py:arg` passes `arg`);
`--config.<field>=value` overrides one field. The run's mode comes from `config.mode`
(`--config.mode=eval`).
"""

from __future__ import annotations

import json

import jax
from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and summaries.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS

MODES = ("train",)


def main(argv):
  del argv
  config = FLAGS.config
  if jax.process_count() > 1 or config.get("distributed", False):
    jax.distributed.initialize()
  logging.info("JAX devices: %s", jax.devices())
  if config.mode not in MODES:
    raise app.UsageError(f"config.mode={config.mode!r}; choose one of {MODES}")
  from xblip_jax.train.trainer import train_and_evaluate  # pylint: disable=import-outside-toplevel

  summary = train_and_evaluate(config, FLAGS.workdir)
  if jax.process_index() == 0:
    print(json.dumps({"summary": f"{FLAGS.workdir}/summary.json",
                      "first_loss": summary["first_loss"], "last_loss": summary["last_loss"],
                      "eval": summary["eval"]}))


if __name__ == "__main__":
  app.run(main)
