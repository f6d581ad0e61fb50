"""The Q-Former of X-InstructBLIP: a BERT encoder whose query rows cross-attend to a frozen encoder.

Semantics follow LAVIS `Qformer.py` `BertModel` as `Blip2VicunaXInstruct` calls it
(`.bert(input_ids, attention_mask, query_embeds, encoder_hidden_states, encoder_attention_mask)`):

* Embeddings: text tokens get word + absolute position embeddings with positions counted from 0
  at the first TEXT token; the learned queries get none. `[queries; text]` is then LayerNormed
  (and dropped out) as one sequence.
* Self-attention is bidirectional over `[queries; text]` with the additive BERT mask
  `(1 - m) * -10000` built from `[ones(Q); text_mask]`.
* Every `cross_attention_freq`-th layer (`layer % freq == 0`) lets the query rows, and only them,
  attend to the encoder features; masked encoder tokens get the float32 minimum
  (`invert_attention_mask`).
* Query rows and text rows use separate feed-forward weights (`*_query` vs plain in LAVIS).
* `text_input=False` (LAVIS deletes the word/position embeddings and text FFNs) runs queries only.

The learned query tokens live in the bridge (`<m>_query_tokens`), not here.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jaxtyping import Array, Float, Int

from xblip_jax.models import layers
from xblip_jax.models.layers import Precision

# LAVIS' self-attention mask value (BERT's get_extended_attention_mask).
_SELF_MASK_VALUE = -10000.0


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
  """Q-Former hyper-parameters (bert-base-uncased plus the BLIP-2 additions).

  Attributes:
    vocab_size: word-embedding rows (30522 BERT tokens + `[DEC]`).
    hidden_size: model width D.
    num_layers: transformer layers.
    num_heads: attention heads (D must divide evenly).
    intermediate_size: feed-forward hidden width.
    max_position_embeddings: longest text the position table covers.
    layer_norm_eps: epsilon of every LayerNorm.
    encoder_width: width E of the frozen encoder's features (image 1408, audio 768, pc 512).
    cross_attention_freq: layer i has cross-attention when `i % cross_attention_freq == 0`.
    num_query_tokens: learned queries Q (owned by the bridge; kept here as the one source).
    hidden_dropout: dropout on embeddings and on every residual branch.
    attention_dropout: dropout on attention probabilities.
    text_input: whether the instruction text enters (word/position embeddings, text FFNs).
  """

  vocab_size: int = 30523
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  layer_norm_eps: float = 1e-12
  encoder_width: int = 1408
  cross_attention_freq: int = 2
  num_query_tokens: int = 32
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  text_input: bool = True

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads "
                       f"{self.num_heads}")
    if self.cross_attention_freq < 1:
      raise ValueError(f"cross_attention_freq must be >= 1, got {self.cross_attention_freq}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def has_cross_attention(self, layer: int) -> bool:
    return layer % self.cross_attention_freq == 0

  @classmethod
  def base(cls, encoder_width: int = 1408, **overrides) -> "QFormerConfig":
    """The released X-InstructBLIP Q-Former (bert-base-uncased sizes) for one modality."""
    return cls(encoder_width=encoder_width, **overrides)

  @classmethod
  def tiny(cls, encoder_width: int = 48, **overrides) -> "QFormerConfig":
    """A few-layer Q-Former for tests and CPU smoke runs (the golden cases' sizes)."""
    sizes = dict(vocab_size=1000, hidden_size=64, num_layers=4, num_heads=4,
                 intermediate_size=128, max_position_embeddings=32, num_query_tokens=8)
    return cls(encoder_width=encoder_width, **{**sizes, **overrides})


@struct.dataclass
class QFormerOutput:
  """Named outputs of `QFormer.__call__`.

  Attributes:
    last_hidden_state: `(B, Q+L, D)` final hidden states of queries then text.
    query_output: `(B, Q, D)` the query rows (what feeds `<m>_llm_proj`).
    hidden_states: the embedding output then each layer's output (`num_layers + 1` arrays of
      `(B, Q+L, D)`), or None unless requested.
  """

  last_hidden_state: Float[Array, "B T D"]
  query_output: Float[Array, "B Q D"]
  hidden_states: tuple[Float[Array, "B T D"], ...] | None = None


def _dropout(x: Array, rate: float, deterministic: bool, rngs: nnx.Rngs | None) -> Array:
  """Inverted dropout drawing its key from `rngs.dropout` (the module itself holds no RNG state)."""
  if deterministic or rate == 0.0:
    return x
  if rngs is None:
    raise ValueError("QFormer: deterministic=False needs `rngs` with a 'dropout' stream")
  keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class _Attention(nnx.Module):
  """Multi-head attention + output dense + residual LayerNorm (LAVIS `BertAttention`)."""

  def __init__(self, cfg: QFormerConfig, kv_width: int, kv_axis: str, *, precision: Precision,
               rngs: nnx.Rngs, may_factor: bool = False):
    d = cfg.hidden_size
    self.may_factor = may_factor  # cross-attention: see `_factored`
    self.num_heads = cfg.num_heads
    self.head_dim = cfg.head_dim
    self.attention_dropout = cfg.attention_dropout
    self.hidden_dropout = cfg.hidden_dropout
    self.precision = precision
    self.query = layers.dense(d, d, ("embed", "heads"), precision=precision, rngs=rngs)
    self.key = layers.dense(kv_width, d, (kv_axis, "heads"), precision=precision, rngs=rngs)
    self.value = layers.dense(kv_width, d, (kv_axis, "heads"), precision=precision, rngs=rngs)
    self.out = layers.dense(d, d, ("heads", "embed"), precision=precision, rngs=rngs)
    self.norm = layers.LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=precision.jnp_param_dtype)

  def __call__(self, x: Float[Array, "B T D"], kv: Float[Array, "B S E"],
               bias: Float[Array, "B S"], deterministic: bool,
               rngs: nnx.Rngs | None) -> Float[Array, "B T D"]:
    split = lambda y: y.reshape(*y.shape[:2], self.num_heads, self.head_dim)
    q = split(self.query(x))
    prec = self.precision.lax_precision
    factored = self.may_factor and self._factored(x.shape[1], kv.shape[1], kv.shape[2])
    # As LAVIS: scores = q.k / sqrt(d) + mask, softmax in float32.
    if factored:  # q . (kv Wk + bk) without projecting the keys
      wk, bk = self._kernel(self.key, kv.shape[-1])
      q_in = jnp.einsum("bqhd,ehd->bhqe", q, wk, precision=prec)
      scores = jnp.einsum("bhqe,bke->bhqk", q_in, kv, precision=prec)
      if bk is not None:  # constant per query row: softmax ignores it, kept for exact scores
        scores = scores + jnp.einsum("bqhd,hd->bhq", q, bk, precision=prec)[..., None]
    else:
      k = split(self.key(kv))
      scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=prec)
    scores = scores / math.sqrt(self.head_dim)
    scores = scores.astype(jnp.float32) + bias[:, None, None, :]
    probs = layers.softmax_f32(scores, self.precision.jnp_dtype)
    probs = _dropout(probs, self.attention_dropout, deterministic, rngs)
    if factored:  # probs @ (kv Wv + bv) without projecting the values
      wv, bv = self._kernel(self.value, kv.shape[-1])
      mixed = jnp.einsum("bhqk,bke->bhqe", probs, kv, precision=prec)
      ctx = jnp.einsum("bhqe,ehd->bqhd", mixed, wv, precision=prec)
      if bv is not None:  # rows of probs sum to 1, except under attention dropout
        ctx = ctx + jnp.sum(probs, axis=-1).transpose(0, 2, 1)[..., None] * bv
    else:
      ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, split(self.value(kv)), precision=prec)
    y = self.out(ctx.reshape(x.shape))
    y = _dropout(y, self.hidden_dropout, deterministic, rngs)
    return self.norm(y + x)

  def _factored(self, t: int, s: int, e: int) -> bool:
    """Whether `q (kv Wk)^T` as `(q Wk^T) kv^T` (and `P (kv Wv)` as `(P kv) Wv`) is cheaper.

    Projecting S keys costs S*E*D multiply-adds; folding the kernel into the T queries instead
    costs T*D*E + H*T*S*E. Cross-attention (32 queries, 257 encoder tokens, E 1408, D 768,
    12 heads) needs 40 % fewer FLOPs that way, forward and backward. Same maths, other
    rounding order (float32 round-off, ~1e-7 relative).
    """
    d, h = self.num_heads * self.head_dim, self.num_heads
    return t * d * e + h * t * s * e < s * e * d + t * s * d

  def _kernel(self, dense: nnx.Linear, e: int) -> tuple[Array, Array | None]:
    """A projection's kernel `(E, H, Dh)` and bias `(H, Dh)` in the compute dtype."""
    dt = self.precision.jnp_dtype
    w = dense.kernel[...].astype(dt).reshape(e, self.num_heads, self.head_dim)
    b = None if dense.bias is None else dense.bias[...].astype(dt).reshape(self.num_heads,
                                                                          self.head_dim)
    return w, b


class _FeedForward(nnx.Module):
  """Dense -> exact GELU -> dense + residual LayerNorm (LAVIS `BertIntermediate` + `BertOutput`)."""

  def __init__(self, cfg: QFormerConfig, *, precision: Precision, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.hidden_dropout = cfg.hidden_dropout
    self.intermediate = layers.dense(d, f, ("embed", "mlp"), precision=precision, rngs=rngs)
    self.output = layers.dense(f, d, ("mlp", "embed"), precision=precision, rngs=rngs)
    self.norm = layers.LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=precision.jnp_param_dtype)

  def __call__(self, x: Float[Array, "B T D"], deterministic: bool,
               rngs: nnx.Rngs | None) -> Float[Array, "B T D"]:
    y = self.output(layers.gelu_exact(self.intermediate(x)))
    y = _dropout(y, self.hidden_dropout, deterministic, rngs)
    return self.norm(y + x)


class _Layer(nnx.Module):
  """One Q-Former layer: self-attention, cross-attention for queries, split FFNs."""

  def __init__(self, cfg: QFormerConfig, index: int, *, precision: Precision, rngs: nnx.Rngs):
    self.attention = _Attention(cfg, cfg.hidden_size, "embed", precision=precision, rngs=rngs)
    self.cross_attention = (
        _Attention(cfg, cfg.encoder_width, "enc_embed", precision=precision, rngs=rngs,
                   may_factor=True)
        if cfg.has_cross_attention(index) else None)
    self.query_ffn = _FeedForward(cfg, precision=precision, rngs=rngs)
    self.text_ffn = (_FeedForward(cfg, precision=precision, rngs=rngs)
                     if cfg.text_input else None)

  def __call__(self, x: Float[Array, "B T D"], num_queries: int, self_bias: Float[Array, "B T"],
               enc: Float[Array, "B N E"], enc_bias: Float[Array, "B N"], deterministic: bool,
               rngs: nnx.Rngs | None, split_rows: bool = False
               ) -> Float[Array, "B T D"] | tuple[Float[Array, "B Q D"], Float[Array, "B L D"]]:
    """The layer's output; with `split_rows`, (query rows, text rows) computed apart.

    Split rows let a caller that reads only the query rows of the last layer skip the text
    rows' attention output, FFN and all of their backward pass (their cotangent is then a
    symbolic zero instead of a zero-filled array pushed through the text FFN).
    """
    if split_rows:
      h_q = self.attention(x[:, :num_queries], x, self_bias, deterministic, rngs)
      h_t = self.attention(x[:, num_queries:], x, self_bias, deterministic, rngs)
    else:
      h = self.attention(x, x, self_bias, deterministic, rngs)
      h_q, h_t = h[:, :num_queries], h[:, num_queries:]
    if self.cross_attention is not None:
      h_q = self.cross_attention(h_q, enc, enc_bias, deterministic, rngs)
    out = self.query_ffn(h_q, deterministic, rngs)
    out_t = self.text_ffn(h_t, deterministic, rngs) if h_t.shape[1] else h_t
    if split_rows:
      return out, out_t
    return jnp.concatenate([out, out_t], axis=1) if h_t.shape[1] else out


class _Embeddings(nnx.Module):
  """Word + position embeddings for text, concatenated after the queries, then LayerNorm."""

  def __init__(self, cfg: QFormerConfig, *, precision: Precision, rngs: nnx.Rngs):
    self.hidden_dropout = cfg.hidden_dropout
    if cfg.text_input:
      init = nnx.initializers.normal(0.02)
      embed = lambda n, axes: nnx.Embed(
          n, cfg.hidden_size, param_dtype=precision.jnp_param_dtype,
          embedding_init=nnx.with_partitioning(init, axes), rngs=rngs)
      self.word_embeddings = embed(cfg.vocab_size, ("vocab", "embed"))
      self.position_embeddings = embed(cfg.max_position_embeddings, ("seq", "embed"))
    else:
      self.word_embeddings = self.position_embeddings = None
    self.norm = layers.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps,
                                 param_dtype=precision.jnp_param_dtype)

  def __call__(self, query_embeds: Float[Array, "B Q D"], input_ids: Int[Array, "B L"] | None,
               deterministic: bool, rngs: nnx.Rngs | None) -> Float[Array, "B T D"]:
    x = query_embeds.astype(jnp.float32)
    if input_ids is not None:
      text = self.word_embeddings(input_ids).astype(jnp.float32)
      pos = self.position_embeddings.embedding[...][: input_ids.shape[1]]
      x = jnp.concatenate([x, text + pos.astype(jnp.float32)[None]], axis=1)
    return _dropout(self.norm(x), self.hidden_dropout, deterministic, rngs)


class QFormer(nnx.Module):
  """The Q-Former (LAVIS `BertModel` without pooler) for one modality.

  Parameters (NNX paths): `embeddings.{word_embeddings,position_embeddings}.embedding`,
  `embeddings.norm`, and per layer `layers.<i>.{attention,cross_attention}.{query,key,value,out,
  norm}`, `layers.<i>.{query_ffn,text_ffn}.{intermediate,output,norm}`; see
  `xblip_jax/convert/qformer_keys.py` for the LAVIS / transformers names.
  """

  def __init__(self, cfg: QFormerConfig, *, precision: Precision, rngs: nnx.Rngs):
    self.cfg = cfg
    self.precision = precision
    self.embeddings = _Embeddings(cfg, precision=precision, rngs=rngs)
    self.layers = nnx.List([_Layer(cfg, i, precision=precision, rngs=rngs)
                            for i in range(cfg.num_layers)])

  def _check_inputs(self, query_embeds, encoder_hidden_states, input_ids, text_mask,
                    encoder_mask) -> None:
    cfg = self.cfg
    if encoder_hidden_states.shape[-1] != cfg.encoder_width:
      raise ValueError(
          f"QFormer: encoder features have width {encoder_hidden_states.shape[-1]} but "
          f"QFormerConfig.encoder_width is {cfg.encoder_width}")
    if query_embeds.shape[-1] != cfg.hidden_size:
      raise ValueError(f"QFormer: query_embeds have width {query_embeds.shape[-1]} but "
                       f"hidden_size is {cfg.hidden_size}")
    if input_ids is not None:
      if not cfg.text_input:
        raise ValueError("QFormer: input_ids given but the config has text_input=False")
      if input_ids.shape[1] > cfg.max_position_embeddings:
        raise ValueError(f"QFormer: text length {input_ids.shape[1]} exceeds "
                         f"max_position_embeddings {cfg.max_position_embeddings}")
      if text_mask is not None and text_mask.shape != input_ids.shape:
        raise ValueError(f"QFormer: text_mask shape {text_mask.shape} != input_ids shape "
                         f"{input_ids.shape}")
    elif text_mask is not None:
      raise ValueError("QFormer: text_mask given without input_ids")
    if encoder_mask is not None and encoder_mask.shape != encoder_hidden_states.shape[:2]:
      raise ValueError(f"QFormer: encoder_mask shape {encoder_mask.shape} != encoder tokens "
                       f"{encoder_hidden_states.shape[:2]}")

  def __call__(
      self,
      query_embeds: Float[Array, "B Q D"],
      encoder_hidden_states: Float[Array, "B N E"],
      input_ids: Int[Array, "B L"] | None = None,
      text_mask: Int[Array, "B L"] | None = None,
      encoder_mask: Int[Array, "B N"] | None = None,
      *,
      deterministic: bool = True,
      rngs: nnx.Rngs | None = None,
      return_hidden_states: bool = False,
  ) -> QFormerOutput:
    """Runs the Q-Former.

    Args:
      query_embeds: the learned queries, already broadcast over the batch.
      encoder_hidden_states: the (LayerNormed) frozen-encoder features.
      input_ids: instruction token ids (right-padded), or None for queries only.
      text_mask: 1 for real text tokens, 0 for padding; None means all ones.
      encoder_mask: 1 for encoder tokens to attend to; None means all ones.
      deterministic: disables dropout when True.
      rngs: the source of dropout keys (stream `dropout`) when `deterministic` is False.
      return_hidden_states: also return the embedding output and every layer's output.

    Returns:
      A `QFormerOutput`.

    Raises:
      ValueError: on inputs that do not fit the config (checked at trace time).
    """
    self._check_inputs(query_embeds, encoder_hidden_states, input_ids, text_mask, encoder_mask)
    batch, num_queries = query_embeds.shape[:2]
    dtype = self.precision.jnp_dtype

    self_mask = jnp.ones((batch, num_queries), jnp.float32)
    if input_ids is not None:
      tm = (jnp.ones(input_ids.shape, jnp.float32) if text_mask is None
            else text_mask.astype(jnp.float32))
      self_mask = jnp.concatenate([self_mask, tm], axis=1)
    self_bias = (1.0 - self_mask) * _SELF_MASK_VALUE
    if encoder_mask is None:
      enc_bias = jnp.zeros(encoder_hidden_states.shape[:2], jnp.float32)
    else:
      enc_bias = (1.0 - encoder_mask.astype(jnp.float32)) * jnp.finfo(jnp.float32).min

    x = self.embeddings(query_embeds, input_ids, deterministic, rngs).astype(dtype)
    enc = encoder_hidden_states.astype(dtype)
    hidden = [x]
    query_output = x[:, :num_queries]
    for i, layer in enumerate(self.layers):
      if i == len(self.layers) - 1 and x.shape[1] > num_queries:
        # Callers that read `query_output` only never touch the last text rows (see _Layer).
        query_output, text_output = layer(x, num_queries, self_bias, enc, enc_bias,
                                          deterministic, rngs, split_rows=True)
        x = jnp.concatenate([query_output, text_output], axis=1)
      else:
        x = layer(x, num_queries, self_bias, enc, enc_bias, deterministic, rngs)
        query_output = x[:, :num_queries]
      hidden.append(x)
    return QFormerOutput(last_hidden_state=x, query_output=query_output,
                         hidden_states=tuple(hidden) if return_hidden_states else None)
