"""The embedded default: tiny towers on the bundled synthetic data, trains on a laptop CPU.

    python -m xblip_jax.main --config configs/demo.py --workdir workdir/demo

Writes the demo data (real on-disk formats, all four modalities) under `<workdir>/demo_data`
unless `data.root` points at an existing copy, trains a small LLaMA-style tokenizer on its text,
trains the Q-Former bridges of image, video, audio and 3D (one modality per batch, frozen
random-init encoders, an LLM pretrained on the demo text), then evaluates held-out QA
accuracy and the two-modality DisCRn questions.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mode = "train"                   # or "plan" (per-device memory of the train step)
  c.resume = ""                      # another run's checkpoints to continue from
  c.init_from = ""                   # trainable parameters to start from (Orbax)
  c.distributed = False              # jax.distributed.initialize() (multi-host)
  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  c.sharding = dict(trainable="fsdp_tensor", frozen="fsdp_tensor")
  c.plan = dict(devices=8, accelerator="", modality="image", compile=True)

  c.data = dict(
      demo=True,                       # write/read the bundled synthetic data
      root="",                         # "" -> <workdir>/demo_data
      # Items per (train, val) split written for each family.
      demo_sizes=dict(image=(96, 32), video=(64, 32), audiocaps=(64, 32), clotho=(8, 4),
                      pc=(64, 32), discrn=(32, 32)),
      modalities=("image", "video", "audio", "pc"),
      train_datasets=("image_qa", "video_qa", "audiocaps_qa", "pc_qa"),
      train_ratios=(1.0, 1.0, 1.0, 2.0),  # mixing weights (empty: sqrt of the dataset sizes)
      eval_datasets=("image_qa", "video_qa", "audiocaps_qa", "pc_qa",
                     "discrn_image_pc", "discrn_video_audio",
                     "audio_cls", "pc_cls"),    # ESC-50 / ModelNet40 layouts, ranked classes
      batch_size=16,
      eval_batch_size=16,
      num_threads=2,
      max_bad_fraction=0.05,
      llm_tokenizer="",                # "" -> train one on the demo text
      demo_vocab_size=384,
      media=dict(image_size=48, n_frms=4, num_clips=1, frames_per_clip=256, npoints=8192,
                 video_hflip_prob=0.0),
  )
  c.text = dict(max_txt_len=32, max_output_txt_len=24, qformer_max_len=24, llm_text_len=48,
                prompt_len=32, prefix="", postfix="", clean_tokenization=True)

  c.model = dict(
      encoders=dict(
          image=dict(preset="tiny", img_size=48, patch_size=8, width=48, depth=2),
          video=dict(preset="tiny", img_size=48, patch_size=8, width=48, depth=2),
          audio=dict(preset="tiny"),
          # ULIP's per-group mini-PointNet is 128/256/512 wide; a quarter of that makes the 3D
          # step 4x cheaper here and loses nothing the demo shapes need.
          pc=dict(preset="tiny", npoints=8192, num_group=64, group_size=32,
                  first_conv_dims=(32, 64), second_conv_hidden=128),
      ),
      qformer=dict(preset="tiny", vocab_size=30523, hidden_size=96, num_layers=2, num_heads=4,
                   intermediate_size=192, max_position_embeddings=64, hidden_dropout=0.0,
                   attention_dropout=0.0),
      llm=dict(preset="tiny", hidden_size=128, intermediate_size=256, num_layers=2,
               num_heads=4, num_kv_heads=4),
      bridge=dict(num_query_tokens=8, layout="single", text_pairing="interleave",
                  use_cues=True),
      precision=dict(trainable="float32", llm="float32", encoders="float32"),
      llm_init="demo",                 # pretrain the tiny LLM on the demo text once, then freeze
      # The 3D token of a random PointBERT is nearly the same for every cloud: fit its projection
      # to the training clouds once (PCA, no labels; train/demo_encoders.py), then freeze.
      encoders_init=dict(pc="demo"),
      demo_llm=dict(steps=200, batch_size=32, lr=3e-3),
  )
  # The 3D bridge reads one token per cloud and learns slowest: alone, 200 steps at 2e-3 left
  # it on the answer prior (12.5% held out) and 200 at 5e-3 taught it (62.5%). So it gets
  # twice the batches of the others (data.train_ratios) and the rate is 4e-3.
  c.optim = dict(init_lr=4e-3, warmup_lr=1e-6, warmup_steps=30, iters_per_epoch=250,
                 num_epochs=4, weight_decay=0.05)
  c.train = dict(num_steps=1000, log_every=20, checkpoint_every=100, keep_checkpoints=2,
                 microbatches=1, tensorboard=True, peak_tflops=0.0)
  # Each set decodes and scores as its task (eval/tasks.py); max_new_tokens / num_beams > 0
  # cap and replace the task preset's (0: the preset's, e.g. beam 5 for QA).
  c.eval = dict(max_new_tokens=8, num_examples=64, num_beams=0)
  # --mode generate (decode/interactive.py): preset greedy | sample | reference | caption | vqa
  # | demo (run_demo.py's beam 5), plus any DecodeConfig field (temperature=0.7, top_p=...).
  c.generate = dict(preset="greedy", max_new_tokens=16, prompt="{}", qformer_prompt="",
                    add_space=False,           # the reference's eval yamls: True (Q05)
                    joint_video_audio=False, seed=0)
  return c
