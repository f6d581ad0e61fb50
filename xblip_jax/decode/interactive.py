"""`--mode generate`: answer one instruction about media files, printing tokens as they come.

    python -m xblip_jax.main --config configs/demo.py --workdir workdir/demo --mode generate \
        --media image=cat.png --media audio=meow.flac --instruction "what do you see and hear?"

The prompt is the one the reference's `generate()` builds (LAVIS `Blip2VicunaXInstruct`):
`[prefix][cue 1][soft tokens 1][" "]...[cue n][soft tokens n][" "][instruction + postfix]`, the
modalities in the order given on the command line; the first cue keeps its BOS only when
nothing precedes it (clean tokenisation), the `" "` token follows each modality only with
`generate.add_space`. With `generate.joint_video_audio` a video and an audio clip are
interleaved frame by clip, as the reference's joint audio-video captioning does. The Q-Former
sees the formatted instruction (or `generate.qformer_prompt`), left-truncated at
`text.qformer_max_len` as the reference's tokenizer truncates.

A prompt whose instruction does not fit the LLM's context (`max_position_embeddings`, keeping
room for `max_new_tokens` answer tokens) loses the START of the instruction, the reference
tokenizer's `truncation_side="left"` (the reference never cuts it, quirk Q49), and a warning says
so once.

Decoding follows the config's `generate` section: `preset` (greedy, sample, or a
`DecodeConfig` preset: reference, caption, vqa, demo) plus any `DecodeConfig` field. Greedy and
sampling stream (`decode/stream.py`); beam search prints the answer when the search ends.
"""

from __future__ import annotations

import dataclasses
import io
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jaxtyping import Array, Float, Int

from xblip_jax import config_utils
from xblip_jax.data import pipeline
from xblip_jax.data import text as text_lib
from xblip_jax.data.example import MODALITIES, Example, MediaError
from xblip_jax.decode.api import DecodeConfig, jit_generate
from xblip_jax.decode.stream import Streamer
from xblip_jax.models import assembly
from xblip_jax.train import step as step_lib

# Presets besides `DecodeConfig`'s: the reference's `generate()` defaults with one beam.
ONE_BEAM_PRESETS = {"greedy": dict(num_beams=1), "sample": dict(num_beams=1, do_sample=True)}
PRESETS = tuple(ONE_BEAM_PRESETS) + ("reference", "caption", "vqa", "demo")


class InputError(ValueError):
  """A bad `--media` / `--instruction` value; the message names it."""


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
  """How the prompt is built (the decoding fields of `generate` go to `DecodeConfig`).

  Attributes:
    prompt: the reference's model prompt; `{}` is replaced by the instruction.
    qformer_prompt: the reference's `special_qformer_input_prompt` ("" = the formatted prompt;
      `{}` is replaced by the instruction).
    add_space: one `" "` token after each modality's soft tokens (the reference's `add_space`,
      True in its eval configs; never seen in training, quirk Q05).
    joint_video_audio: interleave video frames and audio clips (needs exactly those two).
    seed: the sampling key and the point-cloud sampling.
  """

  prompt: str = "{}"
  qformer_prompt: str = ""
  add_space: bool = False
  joint_video_audio: bool = False
  seed: int = 0


def settings(section: Mapping[str, Any] | None, tokenizer) -> tuple[DecodeConfig, GenerateOptions]:
  """`(DecodeConfig, GenerateOptions)` of the config's `generate` section; unknown fields and
  presets are errors naming them. Token ids the section leaves out come from `tokenizer` (None:
  `DecodeConfig`'s Vicuna ids, to check a section before the model is loaded)."""
  section = dict(section or {})
  option_fields = {f.name for f in dataclasses.fields(GenerateOptions)}
  decode_fields = {f.name for f in dataclasses.fields(DecodeConfig)} | {"preset"}
  unknown = sorted(set(section) - option_fields - decode_fields)
  if unknown:
    raise config_utils.ConfigError(
        f"unknown config field generate.{unknown[0]}; known fields: "
        f"{', '.join(sorted(option_fields | decode_fields))}")
  opts = config_utils.build(GenerateOptions, {k: v for k, v in section.items()
                                              if k in option_fields}, "generate")
  if "{}" not in opts.prompt:
    raise config_utils.ConfigError(f"generate.prompt={opts.prompt!r} must hold {{}} (the "
                                   "instruction goes there)")
  fields = {k: v for k, v in section.items() if k in decode_fields}
  preset = fields.pop("preset", "greedy")
  if preset not in PRESETS:
    raise config_utils.ConfigError(f"unknown generate.preset={preset!r}; choose one of {PRESETS}")
  ids = {} if tokenizer is None else dict(
      eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
      bos_id=tokenizer.generation_bos_id)
  fields = {**{k: v for k, v in ids.items() if k not in fields}, **fields}
  if preset in ONE_BEAM_PRESETS:
    fields = {**ONE_BEAM_PRESETS[preset], **fields}
  else:
    fields["preset"] = preset
  try:
    return config_utils.build(DecodeConfig, fields, "generate"), opts
  except ValueError as e:
    if isinstance(e, config_utils.ConfigError):
      raise
    raise config_utils.ConfigError(f"generate: {e}") from e


def parse_media(items: Sequence[str], configured: Sequence[str]) -> list[tuple[str, Path]]:
  """`["image=a.png", ...]` -> `[("image", Path("a.png")), ...]`, checked, in the order given."""
  if not items:
    raise InputError("--media: give at least one modality=path "
                     f"(modality one of {', '.join(MODALITIES)})")
  out: list[tuple[str, Path]] = []
  for item in items:
    modality, sep, path = item.partition("=")
    modality = modality.strip()
    if not sep or not path:
      raise InputError(f"--media {item!r}: expected modality=path, e.g. image=photo.jpg")
    if modality not in MODALITIES:
      raise InputError(f"--media {item!r}: unknown modality {modality!r}; choose one of "
                       f"{', '.join(MODALITIES)}")
    if modality not in configured:
      raise InputError(f"--media {item!r}: this model has no {modality} branch "
                       f"(data.modalities={tuple(configured)})")
    if any(m == modality for m, _ in out):
      raise InputError(f"--media {item!r}: {modality} given twice; one file per modality")
    if not Path(path).is_file():
      raise InputError(f"--media {item!r}: no such file: {path}")
    out.append((modality, Path(path)))
  return out


def load_batch(media: Sequence[tuple[str, Path]], opts: pipeline.MediaOptions,
               seed: int) -> dict[str, np.ndarray]:
  """Every file preprocessed as its modality with the evaluation settings, batch of one."""
  example = Example(id="generate", modality=tuple(m for m, _ in media),
                    media=tuple(str(p) for _, p in media), task="qa")
  try:
    arrays = pipeline.load_media(example, np.random.default_rng(seed), train=False, opts=opts)
  except MediaError as e:
    modality = next((m for m, p in media if str(p) == e.path), "media")
    raise InputError(f"--media {modality}={e.path}: {e.reason}") from e
  return {k: v[None] for k, v in arrays.items()}


def space_ids(tokenizer) -> list[int]:
  """The reference's `llm_tokenizer(" ", add_special_tokens=False)`: its slow LLaMA tokenizer
  gives the lone `"▁"` piece (Vicuna: 29871), where SentencePiece's own encoder drops a bare
  space."""
  ids = tokenizer.encode(" ", add_bos=False)
  if ids:
    return ids
  piece = tokenizer.sp.piece_to_id("\u2581")
  if piece == tokenizer.sp.unk_id():
    raise config_utils.ConfigError("generate.add_space: the LLM tokenizer has no '\u2581' piece")
  return [piece]


def media_layout(prompt: assembly.PromptIds, order: Sequence[str], soft: dict, *,
                 use_cues: bool, joint: bool, space: Float[Array, "1 S D"] | None,
                 num_query_tokens: int) -> tuple[assembly.PromptIds, tuple[str, ...], dict]:
  """The prompt ids, order and soft tokens that `assembly.assemble` turns into the reference's
  generation prefix (its layout "single" equals `generate()`'s cue rule).

  `add_space` rides on the soft tokens (a `" "` after each modality). The joint video-audio
  layout becomes one pseudo-modality per (frame, modality) with the cue the reference gives it:
  with clean tokenisation the BOS stays on the video cue of frames 0 and 1 (its test is
  `pos > 1`, quirk Q50) when no prefix precedes, and is dropped on every audio cue.
  """
  if space is not None:
    soft = {m: jnp.concatenate([x, jnp.broadcast_to(space, (x.shape[0],) + space.shape[1:])
                                .astype(x.dtype)], axis=1) for m, x in soft.items()}
  if not joint:
    return prompt, tuple(order), soft
  if sorted(order) != ["audio", "video"]:
    raise InputError(f"generate.joint_video_audio needs exactly a video and an audio file, "
                     f"got {tuple(order)}")
  q = num_query_tokens
  frames, clips = soft["video"].shape[1] // q, soft["audio"].shape[1] // q
  if clips < frames:
    raise InputError(f"generate.joint_video_audio: the audio gives {clips} clips, fewer than "
                     f"the video's {frames} frames (data.media.num_clips >= n_frms)")
  cues, pieces, names = [], {}, []
  for pos in range(frames):
    for m in ("video", "audio"):
      cue = prompt.cue(m) if use_cues else ()
      drop = prompt.clean_tokenization and (bool(prompt.prefix) or pos > 1 or m == "audio")
      name = f"{m}{pos}"
      cues.append((name, tuple(cue[1:] if drop else cue)))
      pieces[name] = soft[m][:, pos * q:(pos + 1) * q]
      names.append(name)
  fixed = assembly.PromptIds(prefix=prompt.prefix, cues=tuple(cues), clean_tokenization=False)
  return fixed, tuple(names), pieces


def fit_instruction(ids: list[int], fixed_len: int, max_new_tokens: int, context: int
                    ) -> list[int]:
  """The instruction ids that fit `context` after `fixed_len` media positions and room for the
  answer; an over-long instruction keeps its END (left truncation) and a warning says so."""
  room = context - fixed_len - max_new_tokens
  if room < 1:
    raise InputError(f"the media and cues take {fixed_len} positions and the answer up to "
                     f"{max_new_tokens} (generate.max_new_tokens): no room for the instruction "
                     f"in the LLM context of {context}; lower generate.max_new_tokens")
  if len(ids) > room:
    logging.warning("instruction of %d tokens cut to its last %d: the LLM context is %d "
                    "positions, %d for media and cues, %d kept for the answer", len(ids), room,
                    context, fixed_len, max_new_tokens)
    return ids[len(ids) - room:]
  return ids


@dataclasses.dataclass
class Prepared:
  """One prompt, ready to decode: embeddings `(1, T, D)`, mask, the LLM and settings."""

  embeds: Float[Array, "1 T D"]
  mask: Int[Array, "1 T"]
  llm: Any
  decode: DecodeConfig
  options: GenerateOptions
  tokenizer: Any
  instruction_ids: list[int]


def _soft_tokens(graphdef, params, rest, batch, order):
  model = nnx.merge(graphdef, params, rest)
  return step_lib.soft_tokens(model, batch, order, deterministic=True)


_soft_jit = jax.jit(_soft_tokens, static_argnums=(0, 4))


def prepare(config, workdir: str | Path, media: Sequence[str], instruction: str,
            loaded=None) -> Prepared:
  """Checks the inputs (before any model is loaded), then builds the prompt embeddings.

  `loaded`: a `train.restore.Loaded` to use instead of loading the workdir's model.
  """
  if not instruction or not instruction.strip():
    raise InputError("--instruction is empty: say what to do with the media")
  configured = tuple(config.data.modalities)
  items = parse_media(media, configured)
  settings(config.get("generate", None), None)  # a bad section fails before the slow load
  if loaded is None:
    from xblip_jax.train.restore import load_for_inference  # pylint: disable=C0415

    loaded = load_for_inference(config, workdir)
  inputs = loaded.inputs
  tok = inputs.llm_tokenizer
  cfg, opts = settings(config.get("generate", None), tok)
  order = tuple(m for m, _ in items)
  prompt = opts.prompt.format(instruction)
  qtext = opts.qformer_prompt.format(instruction) if opts.qformer_prompt else prompt
  batch = load_batch(items, inputs.media, opts.seed)
  batch.update({k: v[None] for k, v in text_lib.qformer_text(
      inputs.qformer_tokenizer, qtext, inputs.text_cfg.qformer_max_len).items()})
  with jax.set_mesh(loaded.mesh):
    soft = _soft_jit(loaded.graphdef, loaded.params, loaded.rest, batch, order)
  model = loaded.merge()
  text_cfg = inputs.text_cfg
  space = (model.llm.embed(jnp.asarray([space_ids(tok)], jnp.int32)) if opts.add_space
           else None)
  ids, order, soft = media_layout(inputs.prompt_ids, order, soft, use_cues=model.cfg.use_cues,
                                  joint=opts.joint_video_audio, space=space,
                                  num_query_tokens=model.cfg.num_query_tokens)
  use_cues = model.cfg.use_cues or opts.joint_video_audio  # joint cues are set (or empty) above
  fixed = sum(len(v) if kind == "ids" else soft[v].shape[1]
              for kind, v in assembly.segments(ids, order, "single", use_cues))
  text = tok.encode(prompt.strip() + text_cfg.postfix, add_bos=not text_cfg.clean_tokenization)
  text = fit_instruction(text, fixed, cfg.max_new_tokens, model.llm.cfg.max_position_embeddings)
  text_ids = jnp.asarray([text], jnp.int32)
  embeds, mask, _ = assembly.assemble(model.llm.embed, soft, text_ids, jnp.ones_like(text_ids),
                                      None, ids, order, layout="single", use_cues=use_cues)
  return Prepared(embeds=embeds, mask=mask, llm=model.llm, decode=cfg, options=opts,
                  tokenizer=tok, instruction_ids=text)


class TextStream:
  """Writes the decoded answer as tokens arrive (decoding the whole prefix each time, so
  SentencePiece spacing and multi-byte characters come out right), stripped as the reference
  strips its answers."""

  def __init__(self, tokenizer, out: TextIO):
    self.tok, self.out = tokenizer, out
    self.ids: list[int] = []
    self.shown = ""

  def push(self, token: int) -> None:
    self.ids.append(int(token))
    text = self.tok.decode(self.ids).strip()
    if text.startswith(self.shown) and not text.endswith("\ufffd"):  # not mid-character
      self.out.write(text[len(self.shown):])
      self.out.flush()
      self.shown = text

  def close(self) -> str:
    text = self.tok.decode(self.ids).strip()
    self.out.write(text[len(self.shown):] if text.startswith(self.shown) else "")
    self.out.write("\n")
    self.out.flush()
    return text


def answer_ids(prepared: Prepared, out: TextIO) -> list[int]:
  """Decodes `prepared`, streaming (one beam) or at the end (beam search); the ids before EOS."""
  cfg = prepared.decode
  key = jax.random.key(prepared.options.seed) if cfg.do_sample else None
  stream = TextStream(prepared.tokenizer, out)
  if cfg.num_beams == 1:
    for tokens in Streamer(prepared.llm, cfg)(prepared.embeds, prepared.mask, key):
      if int(tokens[0]) == cfg.eos_id:
        break
      stream.push(int(tokens[0]))
  else:
    row = np.asarray(jit_generate(prepared.llm, cfg)(prepared.embeds, prepared.mask, key)[0])[0]
    for t in row:
      if int(t) == cfg.eos_id:
        break
      stream.ids.append(int(t))
  stream.close()
  return stream.ids


def run_generate(config, workdir: str | Path, *, media: Sequence[str], instruction: str,
                 out: TextIO | None = None, loaded=None) -> str:
  """Prints the answer to `instruction` about `media` (`modality=path` strings) and returns it.

  Bad input ends the program with its message alone (no traceback, no flag listing); with
  several processes only process 0 prints.
  """
  try:
    prepared = prepare(config, workdir, media, instruction, loaded)
  except InputError as e:
    raise SystemExit(f"generate: {e}") from e
  if out is None:
    out = sys.stdout if jax.process_index() == 0 else io.StringIO()
  ids = answer_ids(prepared, out)
  return prepared.tokenizer.decode(ids).strip()
