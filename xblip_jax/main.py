"""Entry point: `python -m xblip_jax.main --config configs/<experiment>.py --workdir DIR`.

`--config` takes a Python file with `get_config(arg)` (`configs/x.py:arg` passes `arg`);
`--config.<field>=value` overrides one field. The run's mode is `--mode`, else `config.mode`:

  train     train, checkpoint and evaluate (`train.trainer.train_and_evaluate`)
  eval      evaluate the workdir's latest checkpoint (or `config.init_from`) on the configured
            evaluation tasks; per-task prediction files and a markdown table (`eval.runner`)
  generate  answer `--instruction` about the files in `--media` (`modality=path`, repeatable,
            in prompt order), streaming tokens to stdout (`decode.interactive`)
  plan      compile the training step for the configured mesh on simulated CPU devices and print
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
flags.DEFINE_enum("mode", None, ["train", "eval", "generate", "plan"],
                  "What to run; default: config.mode.")
flags.DEFINE_multi_string("media", [], "generate: `modality=path` (image, video, audio, pc), "
                          "repeatable; the prompt takes them in the order given.")
flags.DEFINE_string("instruction", "", "generate: the instruction about the media.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS

MODES = ("train", "eval", "generate", "plan")


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
  mode = FLAGS.mode or config.mode
  if mode not in MODES:
    raise app.UsageError(f"config.mode={mode!r}; choose one of {MODES}")
  workdir = Path(FLAGS.workdir)
  if mode == "plan":
    _plan(config, workdir)
    return
  if config.get("distributed", False):
    jax.distributed.initialize()
  logging.info("JAX processes: %d, devices: %s", jax.process_count(), jax.devices())
  if mode == "eval":
    from xblip_jax.eval import runner  # pylint: disable=import-outside-toplevel

    results = runner.run_eval(config, workdir)
    if jax.process_index() == 0:
      print(json.dumps({"eval": results}))
    return
  if mode == "generate":
    from xblip_jax.decode import interactive  # pylint: disable=import-outside-toplevel

    interactive.run_generate(config, workdir, media=FLAGS.media, instruction=FLAGS.instruction)
    return
  from xblip_jax.train.trainer import train_and_evaluate  # pylint: disable=import-outside-toplevel

  summary = train_and_evaluate(config, workdir)
  if jax.process_index() == 0:
    print(json.dumps({"summary": f"{workdir}/summary.json", "preempted": summary["preempted"],
                      "first_loss": summary["first_loss"], "last_loss": summary["last_loss"],
                      "eval": summary["eval"]}))


if __name__ == "__main__":
  app.run(main)
