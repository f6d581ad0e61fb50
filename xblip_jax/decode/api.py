"""One entry point for decoding: `generate(llm, inputs_embeds, attention_mask, cfg)`.

`DecodeConfig` carries X-InstructBLIP's decoding settings (LAVIS `generate()` defaults and the
per-task presets of the eval yamls) and the transformers version whose `generate` semantics to
reproduce. The reference pins transformers 4.33.2 and calls `generate(inputs_embeds=...,
attention_mask=...)` without `input_ids`; in that version (read from its source and checked
against it, see `tests/test_decode.py`):

- `input_ids` starts as `[[BOS]]` per row, so `max_length` / `min_length` count the BOS plus the
  new tokens (`max_length=80` yields at most 79 new tokens), the repetition penalty also
  penalises the BOS id, and beam hypotheses' lengths include the BOS (`len = 1 + tokens before
  EOS`; `1 + max_new_tokens` for hypotheses cut at the maximum length). The returned sequences
  start with that BOS (the reference decodes with `skip_special_tokens`); ours do not.
- beam search: `early_stopping=False` (HF's default) - a batch row stops once it holds
  `num_beams` finished hypotheses and the best top candidate score of the step, divided by
  `(current length) ** length_penalty`, cannot beat the worst of them; hypotheses cut at the
  maximum length are added at the end unless the row stopped.

transformers 5 (`hf_version="5"`, what the tests compare against token for token) starts from
empty `input_ids`: lengths count new tokens (EOS included), no BOS in the penalty history, its
early-stop test uses the best still-running beam, and at the maximum length only the `num_beams`
best-ranked candidates are finalised. `max_new_tokens` / `min_new_tokens` here always count new
tokens; `DecodeConfig.from_lavis` converts LAVIS' `max_len` / `min_len` for either version.
Not reproduced: transformers 5 exempts the first `p` generated tokens of a row whose prompt
starts with `p` padding positions from the repetition penalty (it treats them as prompt); in
X-InstructBLIP's layout the first position is always real, so this never applies.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jaxtyping import Array, Bool, Float, Int

HF_VERSIONS = ("4.33", "5")
KNOB_FIELDS = ("repetition_penalty", "length_penalty", "min_new_tokens", "temperature", "top_p",
               "early_stopping")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """Decoding settings (defaults: LAVIS `Blip2VicunaXInstruct.generate()` under HF 4.33.2).

  Attributes:
    num_beams: 1 = greedy / sampling, > 1 = beam search (beam sampling with `do_sample`).
    max_new_tokens: the most tokens generated per row (EOS included).
    min_new_tokens: EOS is suppressed while fewer new tokens than this were generated.
    do_sample: nucleus sampling (the reference's `use_nucleus_sampling`).
    top_p: nucleus mass (sampling only).
    top_k: HF's default top-k filter, 50, applies when sampling (0 disables).
    temperature: sampling temperature.
    repetition_penalty: HF `RepetitionPenaltyLogitsProcessor` factor over generated ids.
    length_penalty: beam scores are `sum_logprobs / length ** length_penalty`.
    early_stopping: HF's beam `early_stopping` (False: the length heuristic; True: stop a row as
      soon as it has `num_beams` finished hypotheses).
    hf_version: whose `generate` semantics to follow, "4.33" (the reference) or "5".
    bos_id: BOS id (in the 4.33 penalty history). Vicuna: 1.
    eos_id: EOS id, None to never stop early (benchmarks). Vicuna: 2.
    pad_id: written after a row's EOS. Vicuna's generation pad: 0 (LAVIS maps 0 -> 2 after).
    num_return_sequences: sequences returned per row, `n` (HF's name): beam search returns each
      row's `n` best finished hypotheses by score (`n <= num_beams`), sampling `n` independent
      samples of each row (the prompt is still prefilled once); outputs are `(B * n, ...)`, a
      row's sequences adjacent, as HF. Greedy decoding needs `n = 1` (HF refuses it too).
  """

  num_beams: int = 5
  max_new_tokens: int = 255
  min_new_tokens: int = 0
  do_sample: bool = False
  top_p: float = 0.9
  top_k: int = 50
  temperature: float = 1.0
  repetition_penalty: float = 1.5
  length_penalty: float = 1.0
  early_stopping: bool = False
  hf_version: str = "4.33"
  bos_id: int | None = 1
  eos_id: int | None = 2
  pad_id: int = 0
  num_return_sequences: int = 1

  def __post_init__(self):
    if self.hf_version not in HF_VERSIONS:
      raise ValueError(f"hf_version must be one of {HF_VERSIONS}, got {self.hf_version!r}")
    if self.num_beams < 1 or self.max_new_tokens < 1 or self.min_new_tokens < 0:
      raise ValueError("need num_beams >= 1, max_new_tokens >= 1, min_new_tokens >= 0")
    if self.repetition_penalty <= 0 or self.temperature <= 0:
      raise ValueError("repetition_penalty and temperature must be > 0")
    n = self.num_return_sequences
    if n < 1 or (self.num_beams > 1 and n > self.num_beams):
      raise ValueError(f"num_return_sequences {n} must be in [1, num_beams={self.num_beams}]")
    if n > 1 and self.num_beams == 1 and not self.do_sample:
      raise ValueError("greedy decoding returns one sequence per row (num_return_sequences 1)")
    if not 0.0 <= self.top_p <= 1.0:
      raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")

  def knobs(self) -> "Knobs":
    """The traced part of the settings."""
    return Knobs(repetition_penalty=jnp.float32(self.repetition_penalty),
                 length_penalty=jnp.float32(self.length_penalty),
                 min_new_tokens=jnp.int32(self.min_new_tokens),
                 temperature=jnp.float32(self.temperature), top_p=jnp.float32(self.top_p),
                 early_stopping=jnp.bool_(self.early_stopping))

  def static_part(self) -> "DecodeConfig":
    """This config with the `Knobs` fields at fixed values (the compile-time key)."""
    return dataclasses.replace(self, **{f: getattr(DecodeConfig, f) for f in KNOB_FIELDS})

  @property
  def history_extra_ids(self) -> tuple[int, ...]:
    """Ids in every row's penalty history besides the generated ones (4.33's BOS)."""
    return (self.bos_id,) if self.hf_version == "4.33" and self.bos_id is not None else ()

  @classmethod
  def from_lavis(cls, *, max_len: int, min_len: int, hf_version: str = "4.33",
                 **kwargs) -> "DecodeConfig":
    """From LAVIS' `max_length` / `min_length` (4.33: they count the initial BOS)."""
    off = 1 if hf_version == "4.33" else 0
    return cls(max_new_tokens=max(max_len - off, 1), min_new_tokens=max(min_len - off, 0),
               hf_version=hf_version, **kwargs)

  @classmethod
  def reference(cls, **overrides) -> "DecodeConfig":
    """`generate()`'s own defaults: beams 5, max_length 256, min_length 1, rep 1.5, lp 1."""
    return dataclasses.replace(cls.from_lavis(max_len=256, min_len=1), **overrides)

  @classmethod
  def caption(cls, **overrides) -> "DecodeConfig":
    """CaptionTask with the eval yamls: beams 5, max_len 80, min_len 10, lp 1.0, rep 1.15."""
    base = cls.from_lavis(max_len=80, min_len=10, num_beams=5, length_penalty=1.0,
                          repetition_penalty=1.15)
    return dataclasses.replace(base, **overrides)

  @classmethod
  def vqa(cls, **overrides) -> "DecodeConfig":
    """VQA/GQA/DisCRn `predict_answers`: beams 5, max_len 10, min_len 1, lp -1.0, rep 1.5."""
    base = cls.from_lavis(max_len=10, min_len=1, num_beams=5, length_penalty=-1.0,
                          repetition_penalty=1.5)
    return dataclasses.replace(base, **overrides)

  @classmethod
  def demo(cls, **overrides) -> "DecodeConfig":
    """`run_demo.py`: beams 5, min_len 1, max_len 250, top_p 0.9, lp 1, rep 1.5."""
    base = cls.from_lavis(max_len=250, min_len=1, num_beams=5, top_p=0.9, length_penalty=1.0,
                          repetition_penalty=1.5)
    return dataclasses.replace(base, **overrides)


@struct.dataclass
class Knobs:
  """The settings that are traced values, not compile-time constants (changing them does not
  recompile a `jit_generate` program). Built by `DecodeConfig.knobs()`."""

  repetition_penalty: Float[Array, ""]
  length_penalty: Float[Array, ""]
  min_new_tokens: Int[Array, ""]
  temperature: Float[Array, ""]
  top_p: Float[Array, ""]
  early_stopping: Bool[Array, ""]


def generate(llm, inputs_embeds: Float[Array, "B T D"], attention_mask: Int[Array, "B T"],
             cfg: DecodeConfig, key: jax.Array | None = None, knobs: Knobs | None = None,
             head_table: Float[Array, "V D"] | None = None
             ) -> tuple[Int[Array, "B N"], Float[Array, "B"]]:
  """Decodes every row of a (left- or middle-padded) prompt; traceable under `jax.jit`.

  The prompt is prefilled once into a static-shape KV cache (beam search then repeats each
  row's cache `num_beams` times); the loop is a `lax.while_loop` that stops when every row is
  finished. Rows never influence each other.

  Args:
    llm: `xblip_jax.models.llm.llama.Llama`.
    inputs_embeds: prompt embeddings.
    attention_mask: 1 for real prompt tokens, 0 for padding (left or inside the prompt; the
      last position of every row must be a real token, decoding continues from it).
    cfg: decoding settings (static).
    key: PRNG key for sampling: one key, or `B` keys (one stream per row, so a row's sample does
      not depend on the rest of the batch; with `n > 1` samples per row, a row's key is split
      `n` ways). Ignored without `do_sample`.
    knobs: traced values of the penalties etc.; default `cfg.knobs()` (constants).
    head_table: the LM head as a `(vocab, hidden)` matrix (`sampling.head_table`), faster on
      CPU; default: `llm`'s own head.

  Returns:
    ids `(B * n, max_new_tokens)` (EOS kept, then `pad_id`; `n = cfg.num_return_sequences`, a
    row's `n` sequences adjacent, best first for beam search) and their scores: beam search HF's
    `sequences_scores` (length-normalised sum of processed log-probs), otherwise the sum of the
    chosen tokens' log-probs under the processed distribution.
  """
  from xblip_jax.decode import beam, sampling  # pylint: disable=import-outside-toplevel
  knobs = cfg.knobs() if knobs is None else knobs
  if cfg.num_beams == 1:
    return sampling.decode(llm, inputs_embeds, attention_mask, cfg, knobs, key, head_table)
  return beam.beam_search(llm, inputs_embeds, attention_mask, cfg, knobs, key, head_table)


@functools.lru_cache(maxsize=64)
def _compiled(graphdef, static: DecodeConfig, compiler_options: tuple) -> Callable:
  def run(state, embeds, mask, key, knobs, table):
    return generate(nnx.merge(graphdef, state), embeds, mask, static, key, knobs, table)

  return jax.jit(run, compiler_options=dict(compiler_options) or None)


def jit_generate(llm, cfg: DecodeConfig, compiler_options: dict | None = None,
                 head_table: bool | None = None) -> Callable:
  """A jitted `fn(inputs_embeds, attention_mask, key=None) -> (ids, scores)` for fixed weights.

  The module is split once, so a call only pays for the compiled program (`nnx.jit` would walk
  the module graph on every call). Programs are shared between configs that differ only in
  `Knobs` fields. `compiler_options` are XLA options for `jax.jit` (tests lower the backend
  optimisation level to compile faster). `head_table` (default: on CPU) keeps a `(vocab,
  hidden)` copy of the LM head for the faster CPU matmul (one extra head-sized array).
  """
  from xblip_jax.decode.sampling import head_table as make_table, row_keys  # pylint: disable=C0415
  graphdef, state = nnx.split(llm)
  run = _compiled(graphdef, cfg.static_part(), tuple(sorted((compiler_options or {}).items())))
  knobs = cfg.knobs()
  use_table = jax.default_backend() == "cpu" if head_table is None else head_table
  table = jax.block_until_ready(jnp.array(make_table(llm))) if use_table else None

  def call(inputs_embeds, attention_mask, key=None):
    if key is not None and cfg.do_sample:  # one program for a single key and for row keys
      key = row_keys(key, inputs_embeds.shape[0])
    return run(state, inputs_embeds, attention_mask, key if cfg.do_sample else None, knobs,
               table)

  return call
