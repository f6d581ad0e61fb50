"""LLaMA / Vicuna v1.1 decoder (the frozen LLM of X-InstructBLIP) in Flax NNX.

Numerically follows `transformers.LlamaForCausalLM` (and LAVIS' copy of it, `modeling_llama.py`):
pre-norm blocks with RMSNorm, rotary position embeddings in the rotate-half convention, SwiGLU
MLP, causal self-attention with grouped-query heads and a key padding mask, float32 softmax.

Module paths mirror HF names (`embed_tokens`, `layers.{i}.self_attn.q_proj`, ..., `norm`,
`lm_head`) so that `xblip_jax/convert/llama_keys.py` is a one-to-one table.

Decoding keeps a `KVCache` (see `kv_cache.py`): a prefill call writes `T` slots, each later call
writes its own tokens after them; shapes stay static so a decoder loop can run in
`jax.lax.while_loop`::

  cache = llm.init_cache(batch, max_len)                     # compute dtype by default
  out = llm(prompt_embeds, prompt_mask, cache=cache)         # left-padded prompt (B, T)
  tok = out.logits[:, -1].argmax(-1)
  out = llm(llm.embed(tok[:, None]), jnp.ones((B, 1), jnp.int32), cache=out.cache)

With a cache and no `positions`, positions continue from the real tokens already cached
(`cumsum(mask) - 1` under left padding, as HF generate). Donate the cache to a jitted step to
update it in place.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jaxtyping import Array, Bool, Float, Int

from xblip_jax.models import layers
from xblip_jax.sharding import constrain
from xblip_jax.models.layers import Precision, RMSNorm, softmax_f32
from xblip_jax.models.llm.kv_cache import KVCache, update_layer
from xblip_jax.models.remat import checkpointed

REMAT_POLICIES = ("none", "full", "dots")
HIDDEN_AXES = ("batch", "seq", "embed")


def dense(in_features: int, out_features: int, axes: tuple[str, str], *, precision: Precision,
          rngs: nnx.Rngs) -> nnx.Linear:
  """A bias-free `layers.dense` (LLaMA has no biases)."""
  return layers.dense(in_features, out_features, axes, precision=precision, rngs=rngs,
                      use_bias=False)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """LLaMA architecture hyper-parameters (HF `LlamaConfig` names in brackets).

  Attributes:
    vocab_size: rows of the embedding and the LM head (X-InstructBLIP adds a `[PAD]` row).
    hidden_size: residual width.
    intermediate_size: SwiGLU hidden width.
    num_layers: decoder blocks [num_hidden_layers].
    num_heads: query heads [num_attention_heads].
    num_kv_heads: key/value heads (grouped-query attention) [num_key_value_heads].
    rms_norm_eps: RMSNorm epsilon.
    rope_theta: rotary base.
    max_position_embeddings: the longest context the model was trained for (informational).
    tie_word_embeddings: LM head shares the input embedding (no `lm_head` parameter).
    remat_policy: per-layer rematerialisation, "none" | "full" | "dots".
  """

  vocab_size: int = 32001
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1e4
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  remat_policy: str = "none"

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} not divisible by {self.num_heads} heads")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"{self.num_heads} heads not divisible by {self.num_kv_heads} kv heads")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy {self.remat_policy!r} not in {REMAT_POLICIES}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @classmethod
  def vicuna_7b(cls, **overrides) -> "LlamaConfig":
    """Vicuna v1.1 7B with the `[PAD]` row X-InstructBLIP adds (vocab 32001)."""
    return dataclasses.replace(cls(), **overrides)

  @classmethod
  def vicuna_13b(cls, **overrides) -> "LlamaConfig":
    """Vicuna v1.1 13B with the `[PAD]` row (vocab 32001)."""
    base = cls(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
               num_kv_heads=40)
    return dataclasses.replace(base, **overrides)

  @classmethod
  def tiny(cls, **overrides) -> "LlamaConfig":
    """A test-sized model (hidden 64, 2 layers, 4 heads)."""
    base = cls(vocab_size=256, hidden_size=64, intermediate_size=172, num_layers=2, num_heads=4,
               num_kv_heads=4, max_position_embeddings=256)
    return dataclasses.replace(base, **overrides)

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "LlamaConfig":
    """From an HF `LlamaConfig.to_dict()` (any transformers version, incl. LAVIS' 4.33 dumps)."""
    heads = hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta", rope.get("rope_theta", 1e4))
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default"
                                         else None)
    if scaling:
      raise NotImplementedError(f"rope scaling {scaling} is not supported")
    if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
      raise NotImplementedError("head_dim other than hidden_size / num_heads")
    if hf.get("attention_bias") or hf.get("mlp_bias") or hf.get("pretraining_tp", 1) != 1:
      raise NotImplementedError("attention/mlp biases and pretraining_tp > 1")
    kwargs = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))
    kwargs.update(overrides)
    return cls(**kwargs)


@struct.dataclass
class LlamaOutput:
  """Outputs of `Llama.__call__`.

  Attributes:
    logits: next-token logits, always float32; None when called with `head=False`.
    cache: the updated cache when one was given, else None.
    hidden_states: final-norm hidden states that feed the LM head (compute dtype).
  """

  logits: Float[Array, "B T V"] | None
  cache: KVCache | None = None
  hidden_states: Float[Array, "B T D"] | None = None


def rope_cos_sin(positions: Int[Array, "B T"], head_dim: int, theta: float
                 ) -> tuple[Float[Array, "B T Dh"], Float[Array, "B T Dh"]]:
  """float32 cos/sin tables of the rotate-half convention: frequencies repeated twice."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Float[Array, "B T H Dh"], cos: Float[Array, "B T Dh"],
               sin: Float[Array, "B T Dh"]) -> Float[Array, "B T H Dh"]:
  """`x * cos + rotate_half(x) * sin` in float32, where rotate_half(x) = [-x2, x1]."""
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


class LlamaAttention(nnx.Module):
  """Causal multi-head / grouped-query self-attention with rotary embeddings."""

  def __init__(self, cfg: LlamaConfig, layer_idx: int, *, precision: Precision, rngs: nnx.Rngs):
    self.num_heads = cfg.num_heads
    self.num_kv_heads = cfg.num_kv_heads
    self.head_dim = cfg.head_dim
    self.layer_idx = layer_idx
    self.precision = precision
    d, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
    kw = dict(precision=precision, rngs=rngs)
    self.q_proj = dense(d, cfg.num_heads * cfg.head_dim, ("embed", "heads"), **kw)
    self.k_proj = dense(d, kv, ("embed", "kv"), **kw)
    self.v_proj = dense(d, kv, ("embed", "kv"), **kw)
    self.o_proj = dense(cfg.num_heads * cfg.head_dim, d, ("heads", "embed"), **kw)

  def __call__(self, x: Float[Array, "B T D"], cos: Float[Array, "B T Dh"],
               sin: Float[Array, "B T Dh"], allowed: Bool[Array, "B T S"],
               k_all: tuple[Float[Array, "B KV S Dh"], ...] | None = None,
               v_all: tuple[Float[Array, "B KV S Dh"], ...] | None = None,
               index: Int[Array, ""] | None = None):
    """Attends `T` queries to `S` keys (`S = T` without a cache, the cache length with one).

    Returns:
      The block output `(B, T, D)` and the updated per-layer `(k_all, v_all)` (or Nones).
    """
    b, t, _ = x.shape
    dt = self.precision.jnp_dtype
    q = apply_rope(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim), cos, sin)
    k = apply_rope(self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim), cos, sin)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    kv = "bsgd"  # keys / values as computed: (B, S, KV, Dh)
    if k_all is not None:  # the cache is head-major, (B, KV, S, Dh) per layer
      k_all, v_all = update_layer(k_all, v_all, k.swapaxes(1, 2), v.swapaxes(1, 2),
                                  self.layer_idx, index)
      k, v, kv = k_all[self.layer_idx].astype(dt), v_all[self.layer_idx].astype(dt), "bgsd"
    # Query head h reads kv head h // rep (HF repeat_kv); group queries instead of copying k/v.
    rep = self.num_heads // self.num_kv_heads
    q = q.reshape(b, t, self.num_kv_heads, rep, self.head_dim)
    prec = self.precision.lax_precision
    scores = jnp.einsum(f"btgrd,{kv}->bgrts", q, k, precision=prec,
                        preferred_element_type=jnp.float32)
    scores = scores * (self.head_dim ** -0.5)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = softmax_f32(scores, dt)
    out = jnp.einsum(f"bgrts,{kv}->btgrd", probs, v, precision=prec)
    out = self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))
    return out, k_all, v_all


class LlamaMLP(nnx.Module):
  """SwiGLU: `down(silu(gate(x)) * up(x))`."""

  def __init__(self, cfg: LlamaConfig, *, precision: Precision, rngs: nnx.Rngs):
    kw = dict(precision=precision, rngs=rngs)
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = dense(d, f, ("embed", "mlp"), **kw)
    self.up_proj = dense(d, f, ("embed", "mlp"), **kw)
    self.down_proj = dense(f, d, ("mlp", "embed"), **kw)

  def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
  """Pre-norm block: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

  def __init__(self, cfg: LlamaConfig, layer_idx: int, *, precision: Precision,
               rngs: nnx.Rngs):
    norm = dict(eps=cfg.rms_norm_eps, axis_name="norm", param_dtype=precision.jnp_param_dtype)
    self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
    self.self_attn = LlamaAttention(cfg, layer_idx, precision=precision, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
    self.mlp = LlamaMLP(cfg, precision=precision, rngs=rngs)

  def __call__(self, x, cos, sin, allowed, k_all=None, v_all=None, index=None):
    h, k_all, v_all = self.self_attn(self.input_layernorm(x), cos, sin, allowed, k_all, v_all,
                                     index)
    x = x + h
    x = x + self.mlp(self.post_attention_layernorm(x))
    return x, k_all, v_all


def _run_layer(layer: LlamaDecoderLayer, *args):
  return layer(*args)


def _layer_fn(policy: str):
  if policy == "none":
    return _run_layer
  if policy == "full":
    return checkpointed(_run_layer)
  return checkpointed(_run_layer, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)


class Llama(nnx.Module):
  """`LlamaForCausalLM`: token embedding, decoder stack, final RMSNorm and LM head."""

  def __init__(self, cfg: LlamaConfig, *, precision: Precision, rngs: nnx.Rngs):
    self.cfg = cfg
    self.precision = precision
    self.embed_tokens = nnx.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=precision.jnp_dtype,
        param_dtype=precision.jnp_param_dtype,
        embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed")),
        rngs=rngs)
    self.layers = nnx.List([LlamaDecoderLayer(cfg, i, precision=precision, rngs=rngs)
                            for i in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name="norm",
                        param_dtype=precision.jnp_param_dtype)
    self.lm_head = (None if cfg.tie_word_embeddings else
                    dense(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"),
                          precision=precision, rngs=rngs))

  def embed(self, ids: Int[Array, "B T"]) -> Float[Array, "B T D"]:
    """Token embeddings in the compute dtype (`get_input_embeddings()(ids)`)."""
    return self.embed_tokens(ids)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache for `batch` rows and `max_len` slots (default dtype: compute dtype)."""
    return KVCache.init(num_layers=self.cfg.num_layers, batch=batch, max_len=max_len,
                        num_kv_heads=self.cfg.num_kv_heads, head_dim=self.cfg.head_dim,
                        dtype=dtype or self.precision.jnp_dtype)

  def __call__(self, inputs_embeds: Float[Array, "B T D"],
               attention_mask: Int[Array, "B T"] | None = None,
               positions: Int[Array, "B T"] | None = None,
               cache: KVCache | None = None, head: bool = True) -> LlamaOutput:
    """Runs the decoder on `T` new tokens.

    Args:
      inputs_embeds: token (or soft-prompt) embeddings.
      attention_mask: 1 for real tokens, 0 for padding, for these `T` tokens only (with a cache,
        earlier tokens' masks are kept in `cache.mask`). Padding keys are never attended to.
      positions: rotary positions. Default without a cache: `arange(T)` (LAVIS training, right
        padding). Default with a cache: real tokens already cached + `cumsum(mask) - 1`, i.e.
        `index + arange(T)` without padding and HF generate's convention under left padding.
      cache: a `KVCache`; the `T` tokens are written at slots `[cache.index, cache.index + T)`,
        and must fit (`cache.index + T <= cache.max_len`; not checked under jit).
      head: apply the LM head; False returns no logits (callers that need the head on a few
        positions only apply `lm_logits` to those hidden states).

    Returns:
      `LlamaOutput` with float32 logits (or None), the updated cache (or None) and final
      hidden states.
    """
    b, t, _ = inputs_embeds.shape
    x = inputs_embeds.astype(self.precision.jnp_dtype)
    mask = (jnp.ones((b, t), jnp.bool_) if attention_mask is None
            else attention_mask.astype(jnp.bool_))
    if cache is None:
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
      slots = jnp.arange(t)
      allowed = (slots[None, :] <= slots[:, None])[None] & mask[:, None, :]
      k_all = v_all = index = None
    else:
      if cache.batch_size != b:
        raise ValueError(f"cache batch {cache.batch_size} != input batch {b}")
      if t > cache.max_len:
        raise ValueError(f"{t} tokens do not fit a cache of {cache.max_len} slots")
      if positions is None:
        positions = cache.default_positions(mask)
      index = cache.index
      cache = cache.write_mask(mask)
      q_slots = index + jnp.arange(t)
      k_slots = jnp.arange(cache.max_len)
      allowed = (k_slots[None, :] <= q_slots[:, None])[None] & cache.mask[:, None, :]
      k_all, v_all = cache.k, cache.v
    cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
    run = _layer_fn(self.cfg.remat_policy)
    # Hidden states between layers sharded by logical names (a no-op outside a mesh), so GSPMD
    # keeps the activations' batch split through the stack instead of choosing per layer.
    x = constrain(x, HIDDEN_AXES)
    for layer in self.layers:
      x, k_all, v_all = run(layer, x, cos, sin, allowed, k_all, v_all, index)
      x = constrain(x, HIDDEN_AXES)
    h = self.norm(x)
    if cache is not None:
      cache = cache.replace(k=k_all, v=v_all, index=index + t)
    return LlamaOutput(logits=self.lm_logits(h) if head else None, cache=cache,
                       hidden_states=h)

  def lm_logits(self, h: Float[Array, "... D"]) -> Float[Array, "... V"]:
    """The LM head (or the tied embedding) on final-norm hidden states; float32 logits."""
    if self.lm_head is None:
      table = self.embed_tokens.embedding[...].astype(h.dtype)
      logits = jnp.einsum("...d,vd->...v", h, table, precision=self.precision.lax_precision)
    else:
      logits = self.lm_head(h)
    return logits.astype(jnp.float32)
