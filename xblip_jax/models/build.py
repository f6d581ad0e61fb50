"""Building the whole model (encoders, bridges, LLM) from the `model` config section."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from flax import nnx

from xblip_jax import config_utils
from xblip_jax.models.encoders import registry
from xblip_jax.models.layers import Precision
from xblip_jax.models.llm.llama import LlamaConfig
from xblip_jax.models.qformer import QFormerConfig
from xblip_jax.models.xblip import XBlipConfig, XInstructBlip

PRECISIONS = {"float32": Precision.float32, "bf16_compute": Precision.bf16_compute,
              "bf16": Precision.bf16}


def precision(name: str, where: str) -> Precision:
  if name not in PRECISIONS:
    raise config_utils.ConfigError(f"{where}={name!r}; choose one of {sorted(PRECISIONS)}")
  return PRECISIONS[name]()


def xblip_config(model: Mapping[str, Any], modalities, llm_vocab_size: int | None = None
                 ) -> tuple[XBlipConfig, dict[str, Any]]:
  """The bridge config and each modality's encoder config."""
  encoders = {m: registry.encoder_config(m, model["encoders"][m], f"model.encoders.{m}")
              for m in modalities}
  llm = config_utils.build(LlamaConfig, model["llm"], "model.llm")
  if llm_vocab_size is not None and llm.vocab_size != llm_vocab_size:
    llm = dataclasses.replace(llm, vocab_size=llm_vocab_size)
  bridge = {k: v for k, v in model["bridge"].items()}
  cfg = config_utils.build(XBlipConfig, bridge, "model.bridge")
  cfg = dataclasses.replace(
      cfg, llm=llm, qformer=config_utils.build(QFormerConfig, model["qformer"], "model.qformer"),
      encoder_widths=tuple((m, registry.feature_width(m, encoders[m])) for m in modalities))
  cfg.validate()
  return cfg, encoders


def build_model(model: Mapping[str, Any], modalities, *, seed: int,
                llm_vocab_size: int | None = None) -> XInstructBlip:
  cfg, enc_cfgs = xblip_config(model, modalities, llm_vocab_size)
  rngs = nnx.Rngs(params=seed, dropout=seed + 1)
  prec = model["precision"]
  enc_prec = precision(prec["encoders"], "model.precision.encoders")
  encoders = {m: registry.build_encoder(m, enc_cfgs[m], precision=enc_prec, rngs=rngs)
              for m in modalities}
  return XInstructBlip(cfg, rngs=rngs,
                       precision=precision(prec["trainable"], "model.precision.trainable"),
                       llm_precision=precision(prec["llm"], "model.precision.llm"),
                       encoders=encoders)
