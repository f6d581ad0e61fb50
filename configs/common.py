"""Shared parts of the released X-InstructBLIP training experiments (LAVIS
`projects/xinstruct_blip/train/vicuna{7b,13b}/*.yaml`).

Every run: AdamW (0.9, 0.999), lr 1e-5 with 1,000 warm-up steps from 1e-8, cosine per inner
epoch to 0, weight decay 0.05 (ndim >= 2), no clipping, 32 query tokens, text lengths 128/256,
cues on. LAVIS ran 8 GPUs with a per-GPU batch; `data.batch_size` here is the global batch
(8 x per-GPU). Mixing draws one dataset per batch with the yaml's ratios.

The experiment files pick a `(size, modality)` row of `EXPERIMENTS`; the config argument picks
a target machine from `TARGETS` (mesh and planner settings), e.g.
`--config configs/vicuna7b/image.py:v5e-64`.
"""

from __future__ import annotations

import ml_collections

# Datasets and mixing ratios of the released runs (reference section 2.3).
IMAGE_7B = (("conceptual_caption_12m_instruct", 0.1944), ("coco_caption_instruct", 0.0596),
            ("capfilt14m_instruct", 0.2948), ("vg_caption_instruct", 0.0718),
            ("sbu_caption_instruct", 0.0734), ("vg_vqa_instruct", 0.0950),
            ("coco_vqa_instruct", 0.0642), ("ocr_vqa_instruct", 0.0792),
            ("ok_vqa_instruct", 0.0075), ("aok_vqa_instruct", 0.0103),
            ("llava150k_dialogue_instruct", 0.0497))
IMAGE_13B = tuple((n, 0.3) if n == "coco_caption_instruct" else
                  ("llava150k", r) if n.startswith("llava150k") else (n, r) for n, r in IMAGE_7B)
AUDIO = (("audiocaps_mm_caption_instruct", 0.1936), ("audiocaps_mm_qa", 0.1529),
         ("wavcaps_mm_caption_instruct", 0.5365), ("audioset_mm_caption_instruct", 0.1170))
PC = (("objaverse_mm_caption_instruct", 0.6175), ("objaverse_mm_qa", 0.3825))
# Un-normalised in the yaml (MSR-VTT captions deliberately up-sampled); the mixer normalises.
VIDEO = (("msrvtt_caption_instruct", 1.0), ("msrvtt_qa_instruct", 0.1786),
         ("webvid2m_caption_instruct", 0.6544))

# (size, modality) -> per-GPU batch, max iterations, iterations per inner epoch, datasets.
EXPERIMENTS = {
    ("7b", "image"): (8, 65_000, 5_000, IMAGE_7B),
    ("7b", "audio"): (8, 65_000, 5_000, AUDIO),
    ("7b", "pc"): (16, 65_000, 5_000, PC),
    ("7b", "video"): (4, 15_000, 1_000, VIDEO),
    ("13b", "image"): (8, 750_000, 5_000, IMAGE_13B),
    ("13b", "audio"): (2, 300_000, 5_000, AUDIO),
    ("13b", "pc"): (4, 355_000, 5_000, PC),
    ("13b", "video"): (1, 25_000, 1_000, VIDEO),
}
REFERENCE_GPUS = 8

ENCODERS = {"image": dict(preset="eva_vit_g"), "video": dict(preset="eva_vit_g"),
            "audio": dict(preset="beats_iter3"), "pc": dict(preset="ulip2_pointbert")}

# Target machines: device count, accelerator (planner), and a mesh per global batch size
# (data x fsdp must divide the batch; tensor takes what is left).
TARGETS = {
    "v5e-64": dict(devices=64, accelerator="v5e"),
    "v5p-8": dict(devices=4, accelerator="v5p"),
    "h100x8": dict(devices=8, accelerator="h100"),
    "cpu": dict(devices=0, accelerator=""),
}


def mesh_for(devices: int, global_batch: int) -> dict[str, int]:
  """FSDP over as many devices as the batch has rows (at least one row per shard), tensor
  parallelism over the rest; `devices=0` means whatever the host has (FSDP over all)."""
  if devices == 0:
    return dict(data=1, fsdp=-1, tensor=1)
  fsdp = devices
  while global_batch % fsdp:
    fsdp //= 2
  return dict(data=1, fsdp=fsdp, tensor=devices // fsdp)


def get_config(size: str, modality: str, target: str | None = None) -> ml_collections.ConfigDict:
  """The released `(size, modality)` experiment, laid out for `target` (default: h100x8)."""
  per_gpu, iters, inner, datasets = EXPERIMENTS[(size, modality)]
  target = target or "h100x8"
  if target not in TARGETS:
    raise ValueError(f"unknown target {target!r}; choose one of {sorted(TARGETS)}")
  global_batch = per_gpu * REFERENCE_GPUS
  c = ml_collections.ConfigDict()
  c.seed = 42
  c.mode = "train"
  c.resume = ""
  c.init_from = ""            # e.g. converted BLIP-2 stage-1 Q-Former (video: the image run's)
  c.distributed = target != "cpu"
  c.mesh = mesh_for(TARGETS[target]["devices"], global_batch)
  c.sharding = dict(trainable="fsdp", frozen="fsdp_tensor")
  c.plan = dict(devices=TARGETS[target]["devices"], accelerator=TARGETS[target]["accelerator"],
                modality=modality, compile=True)
  names = tuple(name for name, _ in datasets)
  c.data = dict(
      demo=False,
      # Folder holding the datasets in LAVIS' cache_root layout (docs/launch.md, "Preparing
      # the datasets"); each dataset's files can be moved with `paths.<name>.annotation`
      # (comma-separated for several) and `paths.<name>.media`, relative to `root` or absolute;
      # `paths.<name>.shards` trains from its prepared ArrayRecord shards instead.
      root="", paths={name: dict(annotation="", media="", shards="") for name in names},
      modalities=(modality,), train_datasets=names,
      train_ratios=tuple(ratio for _, ratio in datasets),
      eval_datasets=(), batch_size=global_batch, eval_batch_size=global_batch,
      num_threads=8, max_bad_fraction=0.01,
      llm_tokenizer="",         # folder with the Vicuna tokenizer.model (the HF checkpoint's)
      demo_vocab_size=0,
      media=dict(image_size=224, n_frms=5, num_clips=2, frames_per_clip=512, npoints=8192,
                 video_hflip_prob=0.5))
  c.text = dict(max_txt_len=128, max_output_txt_len=256, qformer_max_len=128,
                llm_text_len=160, prompt_len=128, prefix="", postfix="",
                clean_tokenization=True)
  c.model = dict(
      encoders={modality: dict(ENCODERS[modality])},
      qformer=dict(preset="base"),
      llm=dict(preset=f"vicuna_{size}", remat_policy="none"),
      bridge=dict(num_query_tokens=32, layout="single", text_pairing="interleave",
                  use_cues=True),
      precision=dict(trainable="bf16_compute", llm="bf16", encoders="bf16"),
      llm_init="random",        # Orbax directory of the converted Vicuna parameters
      encoders_init={modality: ""},  # Orbax directory of the converted encoder
  )
  c.optim = dict(init_lr=1e-5, min_lr=0.0, warmup_lr=1e-8, warmup_steps=1000,
                 iters_per_epoch=inner, num_epochs=iters // inner, weight_decay=0.05,
                 grad_clip_norm=0.0, grad_accum_steps=1)
  c.train = dict(num_steps=iters, log_every=50, checkpoint_every=1000, keep_checkpoints=3,
                 microbatches=1, tensorboard=True, peak_tflops=0.0)
  # 0: each task's own preset length (eval/tasks.py; e.g. 79 for objaverse_qa), as the reference.
  c.eval = dict(max_new_tokens=0, num_examples=0)
  return c
