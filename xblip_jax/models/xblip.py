"""X-InstructBLIP: per-modality Q-Former bridges into a frozen LLM.

For each modality m: frozen encoder features -> `ln[m]` (trainable LayerNorm, eps 1e-5) ->
Q-Former with learned `query_tokens[m]` and the instruction text -> first Q outputs ->
`llm_proj[m]` -> soft tokens, which `assembly.assemble` places in the LLM input.

Sequential modalities (video frames, audio clips) run one Q-Former pass per frame/clip and
concatenate the soft tokens frame by frame. Children are keyed by modality name so that
freezing, sharding and checkpoint conversion stay one rule each.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from xblip_jax.models import assembly
from xblip_jax.models.layers import LayerNorm, Precision, dense
from xblip_jax.models.llm.llama import Llama, LlamaConfig
from xblip_jax.models.qformer import QFormer, QFormerConfig
from xblip_jax.sharding import constrain

# Reference quirk Q02 (docs/quirks.md): LAVIS pairs frame/clip rows with instructions through
# `.repeat` (tiling), which mismatches them for batch > 1; "interleave" gives each row its own
# sample's instruction.
TEXT_PAIRINGS = ("interleave", "tile")
FROZEN_TOWERS = ("llm", "encoders")


@dataclasses.dataclass(frozen=True)
class XBlipConfig:
  """The bridge architecture. `encoder_widths` maps each modality to its feature width."""

  encoder_widths: tuple[tuple[str, int], ...] = (("image", 1408),)
  qformer: QFormerConfig = dataclasses.field(default_factory=QFormerConfig)
  llm: LlamaConfig = dataclasses.field(default_factory=LlamaConfig.vicuna_7b)
  num_query_tokens: int = 32
  modality_ln_eps: float = 1e-5
  shared_qformer: bool = False
  shared_qformer_width: int = 512
  projection_only: bool = False
  text_pairing: str = "interleave"
  layout: str = "single"
  use_cues: bool = True

  @property
  def modalities(self) -> tuple[str, ...]:
    return tuple(m for m, _ in self.encoder_widths)

  def width(self, modality: str) -> int:
    return dict(self.encoder_widths)[modality]

  def validate(self) -> None:
    if self.text_pairing not in TEXT_PAIRINGS:
      raise ValueError(f"text_pairing must be one of {TEXT_PAIRINGS}, got {self.text_pairing!r}")
    if self.layout not in assembly.LAYOUTS:
      raise ValueError(f"layout must be one of {assembly.LAYOUTS}, got {self.layout!r}")
    if self.shared_qformer and self.projection_only:
      raise ValueError("shared_qformer and projection_only are exclusive")


@flax.struct.dataclass
class XBlipOutput:
  """The loss, its supervised token count, and the sequence it was computed on.

  `logits` are the full `(B, T, V)` logits, or None when the call skipped them (`logits=False`:
  the training loss, which runs the LM head on the label-carrying positions only).
  """

  loss: Float[Array, ""]
  num_tokens: Int[Array, ""]
  logits: Float[Array, "B T V"] | None
  labels: Int[Array, "B T"]
  attention_mask: Int[Array, "B T"]


class XInstructBlip(nnx.Module):
  """Trainable bridges (`ln`, `qformer`, `query_tokens`, `llm_proj`) around a frozen `llm`."""

  def __init__(self, cfg: XBlipConfig, *, rngs: nnx.Rngs,
               precision: Precision = Precision(), llm_precision: Precision = Precision(),
               encoders: Mapping[str, nnx.Module] | None = None):
    cfg.validate()
    self.cfg = cfg
    d_q, d_llm, nq = cfg.qformer.hidden_size, cfg.llm.hidden_size, cfg.num_query_tokens
    keys = ("shared",) if cfg.shared_qformer else cfg.modalities
    self.ln = nnx.Dict({m: LayerNorm(cfg.width(m), eps=cfg.modality_ln_eps, axis_name="enc_embed")
                        for m in cfg.modalities})
    if cfg.projection_only:
      self.qformer = None
      self.query_tokens = None
      self.llm_proj = nnx.Dict({m: dense(cfg.width(m), d_llm, ("enc_embed", "embed"),
                                         precision=precision, rngs=rngs) for m in keys})
    else:
      width = lambda m: cfg.shared_qformer_width if cfg.shared_qformer else cfg.width(m)
      self.qformer = nnx.Dict({
          m: QFormer(dataclasses.replace(cfg.qformer, encoder_width=width(m),
                                         num_query_tokens=nq), precision=precision, rngs=rngs)
          for m in keys})
      init = nnx.initializers.normal(0.02)  # LAVIS: query_tokens ~ N(0, 0.02)
      self.query_tokens = nnx.Dict({
          m: nnx.Param(init(rngs.params(), (1, nq, d_q), precision.jnp_param_dtype),
                       out_sharding=(None, "queries", "embed")) for m in keys})
      self.llm_proj = nnx.Dict({m: dense(d_q, d_llm, ("embed", "heads"), precision=precision,
                                         rngs=rngs) for m in keys})
    self.encoder_proj = (nnx.Dict({m: dense(cfg.width(m), cfg.shared_qformer_width,
                                            ("enc_embed", "embed"), precision=precision,
                                            rngs=rngs) for m in cfg.modalities})
                         if cfg.shared_qformer else None)
    self.llm = Llama(cfg.llm, precision=llm_precision, rngs=rngs)
    self.encoders = nnx.Dict(dict(encoders)) if encoders else None

  def _key(self, modality: str) -> str:
    return "shared" if self.cfg.shared_qformer else modality

  def soft_tokens(
      self,
      modality: str,
      features: Float[Array, "B C N E"],
      qformer_ids: Int[Array, "B L"] | None = None,
      qformer_mask: Int[Array, "B L"] | None = None,
      *,
      deterministic: bool = True,
      rngs: nnx.Rngs | None = None,
  ) -> Float[Array, "B CQ H"]:
    """LLM-width soft tokens from (frozen) encoder features, C frames/clips per sample."""
    cfg = self.cfg
    if features.shape[-1] != cfg.width(modality):
      raise ValueError(f"{modality} features are {features.shape[-1]} wide but the config's "
                       f"encoder width is {cfg.width(modality)}")
    b, c, n, e = features.shape
    x = self.ln[modality](features.reshape(b * c, n, e).astype(jnp.float32))
    key = self._key(modality)
    if cfg.shared_qformer:
      x = self.encoder_proj[modality](x)
    if cfg.projection_only:
      return self._projection_only(key, x, b, c)
    if qformer_ids is not None:
      qformer_ids, qformer_mask = (self._pair_text(t, b, c) for t in (qformer_ids, qformer_mask))
    queries = jnp.broadcast_to(self.query_tokens[key][...], (b * c,) + self.query_tokens[key].shape[1:])
    out = self.qformer[key](queries, x, qformer_ids, qformer_mask, deterministic=deterministic,
                            rngs=rngs)
    proj = self.llm_proj[key](out.query_output)
    return proj.reshape(b, c * proj.shape[1], proj.shape[2])

  def _pair_text(self, t: Array, b: int, c: int) -> Array:
    if c == 1:
      return t
    if self.cfg.text_pairing == "tile":
      return jnp.tile(t, (c, 1))
    return jnp.repeat(t, c, axis=0)

  def _projection_only(self, key: str, x: Array, b: int, c: int) -> Array:
    """Linear baseline: per-token projection, averaged into Q groups per frame/clip."""
    nq = self.cfg.num_query_tokens
    y = self.llm_proj[key](x)  # (B*C, N, H)
    n = y.shape[1]
    groups = jnp.minimum(jnp.arange(n) * nq // n, nq - 1)
    one_hot = jax.nn.one_hot(groups, nq, dtype=y.dtype)
    pooled = jnp.einsum("bnh,nq->bqh", y, one_hot) / one_hot.sum(0)[None, :, None]
    return pooled.reshape(b, c * nq, y.shape[-1])

  def __call__(
      self,
      soft: Mapping[str, Float[Array, "B S H"]],
      text_ids: Int[Array, "B L"],
      text_mask: Int[Array, "B L"],
      text_labels: Int[Array, "B L"],
      prompt: assembly.PromptIds,
      order: Sequence[str],
      logits: bool = True,
  ) -> XBlipOutput:
    """Language-modelling loss of the assembled sequence (frozen LLM).

    With `logits=False` the LM head runs only where a label can be (`assembly.text_lm_loss`):
    same loss and gradients, no `(B, T, V)` logits. The LLM input, hidden states and logits
    are constrained by logical names (a no-op outside a mesh).
    """
    embeds, mask, labels = assembly.assemble(
        self.llm.embed, soft, text_ids, text_mask, text_labels, prompt, order,
        layout=self.cfg.layout, use_cues=self.cfg.use_cues)
    embeds = constrain(embeds, ("batch", "seq", "embed"))
    out = self.llm(embeds, attention_mask=mask, head=logits)
    if logits:
      full = constrain(out.logits, ("batch", "seq", "vocab"))
      loss, count = assembly.causal_lm_loss(full, labels)
    else:
      full = None
      head = lambda h: constrain(self.llm.lm_logits(h), ("batch", "seq", "vocab"))
      loss, count = assembly.text_lm_loss(constrain(out.hidden_states, ("batch", "seq", "embed")),
                                          text_labels, head)
    return XBlipOutput(loss=loss, num_tokens=count, logits=full, labels=labels,
                       attention_mask=mask)


def trainable(path: tuple, value) -> bool:
  """NNX filter: parameters outside the frozen towers (LLM, encoders)."""
  return isinstance(value, nnx.Param) and (not path or path[0] not in FROZEN_TOWERS)

