"""Input pipeline throughput per CPU core, against what the training step consumes.

Supply: for each modality, small files written here in the real on-disk formats and at real
source sizes (COCO-like 640x480 JPEG; MSR-VTT-like 320x240 30 fps H.264 MP4 of 10 s; AudioCaps
10 s stereo FLAC at 32 kHz; Cap3D `<uid>/<uid>_8192.npz`), read by the real readers and run
through `pipeline.build_pipeline` with the released media settings (image 224 px, video 5
frames, audio 2 clips of 512 fbank frames, 8192 points) and the train transforms; once from the
raw files and once from ArrayRecord shards that `data/tfds` prepared from them. One decoding
thread, no worker processes; the process's CPU time (all threads) over the timed batches gives
samples per CPU-core-second. Text is encoded as fixed-length character ids: tokenisation costs
tens of microseconds per example, under 1% of the media work.

Demand: per released experiment (`configs/common.py` EXPERIMENTS), the analytic training
FLOPs per example (`train/metrics.example_flops` on the abstract model) and an accelerator's
dense bf16 peak (`train/metrics.PEAK_TFLOPS`) at `--mfu` (default 40%) give the samples per
second one accelerator consumes, and the step time of the global batch on the target machine
(8 x H100 as the reference's 8 GPUs; a v5e-64 slice). CPU cores per accelerator = consumption /
samples per core-second.

  .venv/bin/python -m bench.data                       # ~5 min on 2 busy cores (FLOPs of 8 models)
  .venv/bin/python -m bench.data --experiments 7b:image,7b:pc --samples 32
  .venv/bin/python -m bench.data --tiny --experiments demo   # seconds: the smoke test

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from xblip_jax.data import pipeline as P
from xblip_jax.data.example import Example, Examples
from xblip_jax.data.formats import audiocaps, coco, msrvtt, objaverse
from xblip_jax.data.tfds import builders, source

MODALITIES = ("image", "video", "audio", "pc")
FAMILY_READER = {"image": "coco_caption", "video": "video_caption", "audio": "audiocaps",
                 "pc": "cap3d_caption"}
# Accelerator -> (TARGETS entry of configs/common.py, its `train/metrics.PEAK_TFLOPS` key).
ACCELERATORS = {"h100": ("h100x8", "NVIDIA H100"), "v5e": ("v5e-64", "TPU v5e")}


@dataclasses.dataclass(frozen=True)
class Sources:
  """Sizes of the generated source files and the pipeline's media settings."""

  image_wh: tuple[int, int] = (640, 480)
  video_wh: tuple[int, int] = (320, 240)
  video_fps: int = 30
  video_seconds: float = 10.0
  audio_rate: int = 32000
  audio_seconds: float = 10.0
  points: int = 8192
  media: P.MediaOptions = P.MediaOptions()


TINY = Sources(image_wh=(64, 48), video_wh=(64, 48), video_fps=10, video_seconds=1.0,
               audio_rate=16000, audio_seconds=1.0, points=300,
               media=P.MediaOptions(image_size=32, n_frms=2, num_clips=1, frames_per_clip=32,
                                    npoints=64))


def _picture(w: int, h: int, rng: np.random.Generator) -> np.ndarray:
  """A photo-like frame: smooth gradients, a few flat boxes and sensor noise."""
  y, x = np.mgrid[0:h, 0:w] / max(w, h)
  base = np.stack([np.sin(6 * x + c) * np.cos(4 * y - c) for c in rng.uniform(0, 6, 3)], -1)
  img = 127 + 90 * base
  for _ in range(4):
    x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
    img[y0:y0 + h // 3, x0:x0 + w // 3] = rng.uniform(0, 255, 3)
  return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def _write_image(path: Path, s: Sources, rng: np.random.Generator) -> None:
  from PIL import Image
  Image.fromarray(_picture(*s.image_wh, rng)).save(path, quality=90)


def _write_video(path: Path, s: Sources, rng: np.random.Generator) -> None:
  import av
  w, h = s.video_wh
  background = _picture(w, h, rng)
  with av.open(str(path), "w") as container:
    stream = container.add_stream("libx264", rate=s.video_fps, options={"threads": "1"})
    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
    for t in range(int(s.video_fps * s.video_seconds)):
      frame = np.roll(background, 2 * t, axis=1)  # a panning camera: every frame changes
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def _write_audio(path: Path, s: Sources, rng: np.random.Generator) -> None:
  import soundfile as sf
  t = np.arange(int(s.audio_rate * s.audio_seconds)) / s.audio_rate
  wave = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 2000) * t) + rng.normal(0, 0.05, t.shape)
  sf.write(str(path), np.stack([wave, wave], 1), s.audio_rate, subtype="PCM_16")


def _write_pc(path: Path, s: Sources, rng: np.random.Generator) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez(path, arr_0=rng.normal(size=(s.points, 6)).astype(np.float32))  # xyz + rgb


def write_sources(root: Path, s: Sources, n: int, seed: int = 0) -> dict[str, Examples]:
  """`n` files per modality in the real formats, read back by the real readers."""
  rng = np.random.default_rng(seed)
  out = {}
  for m in MODALITIES:
    (root / m).mkdir(parents=True, exist_ok=True)
  caps = [f"a caption of item {k}" for k in range(n)]
  images = [f"{k:012d}.jpg" for k in range(n)]
  for name in images:
    _write_image(root / "image" / name, s, rng)
  (root / "coco.json").write_text(json.dumps(
      [{"image": name, "caption": c, "image_id": k} for k, (name, c) in enumerate(zip(images, caps))]))
  out["image"] = coco.read_coco_caption(root / "coco.json", root / "image")
  for k in range(n):
    _write_video(root / "video" / f"video{k}.mp4", s, rng)
  (root / "msrvtt.json").write_text(json.dumps(
      [{"video": f"video{k}.mp4", "caption": c} for k, c in enumerate(caps)]))
  out["video"] = msrvtt.read_video_caption(root / "msrvtt.json", root / "video")
  rows = [(k, f"yt{k:09d}", 30, c) for k, c in enumerate(caps)]
  for _, ytid, start, _ in rows:
    _write_audio(root / "audio" / audiocaps.audio_filename(ytid, start), s, rng)
  with open(root / "audiocaps.csv", "w", newline="") as f:
    csv.writer(f).writerows([("audiocap_id", "youtube_id", "start_time", "caption"), *rows])
  out["audio"] = audiocaps.read_audiocaps(root / "audiocaps.csv", root / "audio")
  uids = [f"{k:032x}" for k in range(n)]
  for uid in uids:
    _write_pc(Path(objaverse.pc_path(root / "pc", uid)), s, rng)
  with open(root / "cap3d.csv", "w", newline="") as f:
    csv.writer(f).writerows(zip(uids, caps))
  out["pc"] = objaverse.read_cap3d_caption(root / "cap3d.csv", root / "pc")
  return out


def encode_text(example: Example) -> dict[str, np.ndarray]:
  text = f"{example.text_input} {example.text_output}".encode()[:128]
  return {"text": np.frombuffer(text.ljust(128, b"\0"), np.uint8).copy()}


def _cpu_s() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def measure(spec: P.DatasetSpec, batch_size: int, samples: int) -> dict[str, float]:
  """Samples per CPU-core-second (and per wall second) of one dataset's train pipeline."""
  cfg = P.PipelineConfig(batch_size=batch_size, seed=0, num_threads=1, prefetch_buffer_size=1,
                         process_index=0, process_count=1)
  it = iter(P.build_pipeline([spec], encode_text, cfg))
  next(it)  # warm-up: imports, first decoder set-up
  batches = max(1, samples // batch_size)
  wall, cpu = time.perf_counter(), _cpu_s()
  for _ in range(batches):
    next(it)
  wall, cpu = time.perf_counter() - wall, _cpu_s() - cpu
  n = batches * batch_size
  return {"samples": n, "cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
          "samples_per_core_s": round(n / cpu, 2), "samples_per_wall_s": round(n / wall, 2)}


def experiment_demand(name: str, mfu: float) -> dict[str, Any]:
  """Global batch, analytic FLOPs per example, and per-accelerator consumption of one
  experiment: `7b:image`, ... from `configs/common.py`, or `demo:<modality>`."""
  from flax import nnx

  from configs import common
  from xblip_jax.train import metrics, model_init, planner

  size, modality = name.split(":")
  if size == "demo":
    from configs import demo
    cfg = demo.get_config()
    cfg.model.encoders = {modality: dict(cfg.model.encoders[modality])}
  else:
    cfg = common.get_config(size, modality)
  global_batch = int(cfg.data.batch_size)
  abstract = nnx.eval_shape(model_init.builder(cfg, (modality,), None))
  _, params, rest = nnx.split(abstract, model_init.trainable, ...)
  flops = planner.example_flops(cfg, modality, params, rest).total
  out: dict[str, Any] = {"experiment": name, "modality": modality,
                         "global_batch": global_batch, "flops_per_example": flops,
                         "accelerators": {}}
  for acc, (target, kind) in ACCELERATORS.items():
    rate = metrics.PEAK_TFLOPS[kind] * 1e12 * mfu / flops
    devices = common.TARGETS[target]["devices"]
    out["accelerators"][acc] = {"samples_per_s": round(rate, 2), "devices": devices,
                                "step_s": float(f"{global_batch / (devices * rate):.4g}")}
  return out


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--experiments", default=",".join(f"{s}:{m}" for s in ("7b", "13b")
                                                   for m in MODALITIES),
                 help="comma-separated size:modality ('demo:<modality>' for the demo model)")
  p.add_argument("--modalities", default=",".join(MODALITIES))
  p.add_argument("--files", type=int, default=8, help="source files per modality")
  p.add_argument("--samples", type=int, default=48, help="timed samples per pipeline")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--mfu", type=float, default=0.4)
  p.add_argument("--pc-points", type=int, default=0,
                 help="points per source cloud (default 8192, as Cap3D; more runs FPS)")
  p.add_argument("--tiny", action="store_true", help="tiny media (smoke test)")
  p.add_argument("--no-shards", action="store_true", help="skip the ArrayRecord pipelines")
  return p.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  sources = TINY if args.tiny else Sources()
  if args.pc_points:
    sources = dataclasses.replace(sources, points=args.pc_points)
  modalities = [m for m in args.modalities.split(",") if m]
  result: dict[str, Any] = {"bench": "data", "mfu": args.mfu, "cpu_count": os.cpu_count(),
                            "load_start": [round(x, 2) for x in os.getloadavg()],
                            "media": dataclasses.asdict(sources.media), "supply": {},
                            "demand": []}
  with tempfile.TemporaryDirectory() as tmp:
    t = time.perf_counter()
    examples = write_sources(Path(tmp) / "raw", sources, args.files)
    result["write_s"] = round(time.perf_counter() - t, 1)
    for m in modalities:
      specs = {"raw": P.DatasetSpec(m, examples[m], media=sources.media)}
      if not args.no_shards:
        directory = builders.prepare(m, FAMILY_READER[m], {"train": examples[m]},
                                     Path(tmp) / "shards", media=sources.media)
        specs["shards"] = source.spec_from_shards(directory, media=sources.media)
      result["supply"][m] = {kind: measure(spec, args.batch_size, args.samples)
                             for kind, spec in specs.items()}
      print(f"{m:6s} " + "  ".join(f"{k}: {v['samples_per_core_s']:8.2f} samples/core-s"
                                   for k, v in result["supply"][m].items()), file=sys.stderr)
  for name in [e for e in args.experiments.split(",") if e]:
    demand = experiment_demand(name, args.mfu)
    supply = result["supply"].get(demand["modality"], {})
    for acc in demand["accelerators"].values():
      acc["cores_per_accelerator"] = {kind: round(acc["samples_per_s"] / s["samples_per_core_s"], 2)
                                      for kind, s in supply.items()}
    result["demand"].append(demand)
    print(f"{name:9s} {demand['flops_per_example'] / 1e12:7.2f} TFLOP/example  " + "  ".join(
        f"{acc}: {a['samples_per_s']:7.1f}/s step {a['step_s']:.3f} s cores "
        f"{a['cores_per_accelerator']}" for acc, a in demand["accelerators"].items()),
        file=sys.stderr)
  result["load_end"] = [round(x, 2) for x in os.getloadavg()]
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
