"""`--mode generate`: streamed tokens equal the batch decoder's, several modalities in one prompt,
clear errors for bad input, a too-long instruction cut from the left with one warning, and the
command line printing the answer.

The streaming checks run on a random tiny LLaMA whose LM head is scaled up (peaked next-token
distributions, no near-ties) and whose EOS row is boosted (rows end at different steps). The
end-to-end checks use the demo model shrunk to image + 3D, built once.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import subprocess
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from conftest import REPO
from xblip_jax import sharding
from xblip_jax.config_utils import ConfigError
from xblip_jax.data import demo
from xblip_jax.decode import interactive
from xblip_jax.decode.api import DecodeConfig, jit_generate
from xblip_jax.decode.stream import Streamer
from xblip_jax.models import assembly
from xblip_jax.models.layers import Precision
from xblip_jax.models.llm.llama import Llama, LlamaConfig
from xblip_jax.train import inputs as inputs_lib
from xblip_jax.train import model_init, restore

sys.path.insert(0, str(REPO / "configs"))
import demo as demo_config  # noqa: E402  pylint: disable=wrong-import-position

VOCAB, EOS, PAD, BOS, N_NEW, SEED = 48, 2, 0, 1, 10, 1
FAST = {"xla_backend_optimization_level": 0}


def _numpy_weights(abstract: nnx.State, seed: int) -> nnx.State:
  """Norm scales 1, biases 0, other weights normal with std 1/sqrt(leading dim)."""
  rng = np.random.default_rng(seed)
  out = []
  for path, var in nnx.to_flat_state(abstract):
    shape, dtype, name = var.value.shape, var.value.dtype, str(path[-1])
    if name == "scale":
      x = np.ones(shape)
    elif name == "bias":
      x = np.zeros(shape)
    else:
      x = rng.normal(size=shape) * (shape[0] ** -0.5 if len(shape) > 1 else 0.02)
    out.append((path, var.replace(jnp.asarray(x, dtype))))
  return nnx.from_flat_state(out)


@pytest.fixture(scope="module")
def llm():
  cfg = LlamaConfig.tiny(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_heads=4,
                         num_kv_heads=2)
  graphdef, abstract = nnx.split(nnx.eval_shape(
      lambda: Llama(cfg, precision=Precision(), rngs=nnx.Rngs(0))))
  model = nnx.merge(graphdef, _numpy_weights(abstract, SEED))
  kernel = model.lm_head.kernel[...] * 4.0
  model.lm_head.kernel[...] = kernel.at[:, EOS].multiply(2.0)
  return model


def _prompt(seed: int, b: int = 3, t: int = 7):
  """Random embeddings with padding after the first token (media, then a left-padded prompt)."""
  rng = np.random.default_rng(seed)
  emb = rng.normal(size=(b, t, 32)).astype(np.float32)
  mask = np.ones((b, t), np.int32)
  for i in range(1, b):
    mask[i, 1:1 + i] = 0
  return jnp.asarray(emb), jnp.asarray(mask)


def _streamed(llm, cfg, emb, mask, key=None) -> tuple[np.ndarray, int]:
  """The streamed tokens as a `(B, max_new_tokens)` array, and the number of steps taken."""
  steps = list(Streamer(llm, cfg, FAST)(emb, mask, key))
  out = np.full((emb.shape[0], cfg.max_new_tokens), cfg.pad_id, np.int32)
  out[:, :len(steps)] = np.stack(steps, axis=1)
  return out, len(steps)


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sample"])
def test_stream_equals_batch_decoding(llm, sample):
  cfg = DecodeConfig(num_beams=1, max_new_tokens=N_NEW, eos_id=EOS, pad_id=PAD, bos_id=BOS,
                     repetition_penalty=1.3, min_new_tokens=2, do_sample=sample, top_p=0.9,
                     temperature=1.3)
  emb, mask = _prompt(11)
  key = jax.random.key(11) if sample else None
  want = np.asarray(jit_generate(llm, cfg, FAST)(emb, mask, key)[0])
  got, steps = _streamed(llm, cfg, emb, mask, key)
  np.testing.assert_array_equal(got, want)
  ends = [int(np.flatnonzero(row == EOS)[0]) + 1 if (row == EOS).any() else N_NEW
          for row in want]
  assert steps == max(ends)  # the stream stops once every row has ended
  if not sample:  # this prompt's rows end at different steps, all before the limit
    assert len(set(ends)) == len(ends) and max(ends) < N_NEW
  else:  # another key draws another answer
    assert (_streamed(llm, cfg, emb, mask, jax.random.key(12))[0] != got).any()


def test_stream_refuses_beam_search(llm):
  with pytest.raises(ValueError, match="num_beams=5"):
    Streamer(llm, DecodeConfig(num_beams=5))


# --- end to end on a shrunken demo ---------------------------------------------------------
# The demo model shrunk to image + 3D, with weights drawn in numpy (compiling the model's random
# init takes ~35 s of CPU), saved as the pretrained towers and an `init_from` parameter tree:
# in-process tests use the model directly, the command line restores it as a real run does.

TINY_CONFIG = '''
import importlib.util

def get_config(arg=None):
  spec = importlib.util.spec_from_file_location("demo_config", {demo!r})
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.data.root = {root!r}
  c.data.modalities = ("image", "pc")
  c.data.train_datasets = ("image_qa", "pc_qa")
  c.data.train_ratios = ()
  c.data.eval_datasets = ()
  c.data.batch_size = 4
  c.model.llm_init = {llm!r}
  c.model.encoders_init = dict(image={image!r}, pc={pc!r})
  c.init_from = {params!r}
  c.generate.max_new_tokens = 6
  c.generate.min_new_tokens = 3   # a random bridge would often answer nothing at all
  return c
'''


def _load_config(path):
  spec = importlib.util.spec_from_file_location(f"cfg_{abs(hash(str(path)))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(config, config file, workdir, Loaded, image path, point-cloud path)."""
  base = tmp_path_factory.mktemp("generate")
  root = base / "demo_data"
  demo.write_demo_data(root, seed=0, sizes=demo.DemoSizes(
      image=(4, 2), video=(2, 1), audiocaps=(2, 1), clotho=(2, 1), pc=(4, 2), discrn=(2, 1)))
  dirs = {k: str(base / k) for k in ("llm", "image", "pc", "params")}
  config_file = base / "tiny.py"
  config_file.write_text(TINY_CONFIG.format(demo=str(REPO / "configs" / "demo.py"),
                                            root=str(root), **dirs))
  config, workdir = _load_config(config_file), base / "run"
  inputs = inputs_lib.build_inputs(config, workdir)
  mesh = sharding.make_mesh({"fsdp": -1})
  graphdef, params, rest, _, _ = model_init.abstract_state(
      config, inputs.modalities, inputs.llm_tokenizer.vocab_size, mesh)
  params, rest = _numpy_weights(params, 0), _numpy_weights(rest, 1)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(dirs["params"], nnx.to_pure_dict(params))
    ckptr.save(dirs["llm"], rest["llm"])
    for m in ("image", "pc"):
      ckptr.save(dirs[m], rest["encoders"][m])
  loaded = restore.Loaded(inputs=inputs, model=None, graphdef=graphdef, params=params, rest=rest,
                          mesh=mesh, source="init_from",
                          path=dirs["params"], step=None)
  manifest = demo.load_manifest(root)
  image = demo.read_demo(manifest["image_qa"]["val"])[0].media_paths[0]
  pc = demo.read_demo(manifest["pc_qa"]["val"])[0].media_paths[0]
  return config, config_file, workdir, loaded, image, pc


def _until_eos(ids, eos) -> list[int]:
  ids = [int(i) for i in ids]
  return ids[:ids.index(eos)] if eos in ids else ids


QUESTION = "which shape is it?"


def test_two_modalities_in_the_order_given_streamed_as_batch(tiny):
  config, _, workdir, loaded, image, pc = tiny
  media, instruction = [f"pc={pc}", f"image={image}"], QUESTION
  prep = interactive.prepare(config, workdir, media, instruction, loaded)
  # [3d cue with BOS][Q soft][image cue without BOS][Q soft][instruction], in the order given.
  tok, q = prep.tokenizer, int(config.model.bridge.num_query_tokens)
  pc_cue = tok.encode("3d: ", add_bos=True)
  image_cue = tok.encode("image: ", add_bos=True)[1:]
  embed = lambda ids: np.asarray(prep.llm.embed(jnp.asarray([ids], jnp.int32)))[0]
  got = np.asarray(prep.embeds)[0]
  assert got.shape[0] == len(pc_cue) + q + len(image_cue) + q + len(prep.instruction_ids)
  start = len(pc_cue) + q
  np.testing.assert_array_equal(got[:len(pc_cue)], embed(pc_cue))
  np.testing.assert_array_equal(got[start:start + len(image_cue)], embed(image_cue))
  np.testing.assert_array_equal(got[-len(prep.instruction_ids):], embed(prep.instruction_ids))
  assert prep.instruction_ids == tok.encode(instruction, add_bos=False)
  assert np.asarray(prep.mask).all()
  # What is printed, as it is produced, is the batch decoder's answer token for token.
  batch = np.asarray(jit_generate(prep.llm, prep.decode)(prep.embeds, prep.mask)[0])[0]
  want = _until_eos(batch, prep.decode.eos_id)
  assert len(want) >= config.generate.min_new_tokens
  out = io.StringIO()
  assert interactive.answer_ids(prep, out) == want
  assert out.getvalue() == tok.decode(want).strip() + "\n"


def test_long_instruction_cut_from_the_left_once(tiny, caplog):
  config, _, workdir, loaded, image, pc = tiny
  words = " ".join(["red circle square"] * 200) + " " + QUESTION
  with caplog.at_level(logging.WARNING):
    prep = interactive.prepare(config, workdir, [f"pc={pc}", f"image={image}"], words, loaded)
  context = prep.llm.cfg.max_position_embeddings
  assert prep.embeds.shape[1] == context - prep.decode.max_new_tokens
  full = prep.tokenizer.encode(words, add_bos=False)
  assert len(prep.instruction_ids) < len(full)
  assert prep.instruction_ids == full[len(full) - len(prep.instruction_ids):]
  assert len([r for r in caplog.records if "cut to its last" in r.getMessage()]) == 1


def test_command_line_prints_the_answer(tiny):
  config, config_file, workdir, loaded, image, pc = tiny
  media = [f"pc={pc}", f"image={image}"]  # as above: the compiled programs are reused
  want = interactive.run_generate(config, workdir, media=media, instruction=QUESTION,
                                  out=io.StringIO(), loaded=loaded)
  main = [sys.executable, "-m", "xblip_jax.main", "--config", str(config_file), "--workdir",
          str(workdir), "--mode", "generate"]
  proc = subprocess.run(main + ["--media", media[0], "--media", media[1], "--instruction",
                                QUESTION], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert want and proc.stdout.splitlines()[-1] == want
  bad = subprocess.run(main + ["--media", "image=/no/such.png", "--instruction", "x"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "no such file: /no/such.png" in bad.stderr


BAD_INPUT = {
    "missing_file": (["image={missing}"], "why?", "no such file: .*nope.png"),
    "unknown_modality": (["smell=x.txt"], "why?", "unknown modality 'smell'"),
    "not_configured": (["audio={exists}"], "why?", "no audio branch"),
    "no_equals": (["{exists}"], "why?", "expected modality=path"),
    "twice": (["image={exists}", "image={exists}"], "why?", "image given twice"),
    "no_media": ([], "why?", "at least one"),
    "empty_instruction": (["image={exists}"], "   ", "--instruction is empty"),
}


@pytest.mark.parametrize("name", list(BAD_INPUT))
def test_bad_input_is_named_before_loading(tmp_path, name):
  media, instruction, message = BAD_INPUT[name]
  exists = tmp_path / "a.png"
  exists.write_bytes(b"")
  media = [m.format(missing=tmp_path / "nope.png", exists=exists) for m in media]
  config = demo_config.get_config()
  config.data.modalities = ("image", "pc")
  with pytest.raises(interactive.InputError, match=message):
    interactive.prepare(config, tmp_path / "never_read", media, instruction)


def test_unreadable_media_names_the_file(tiny, tmp_path):
  config, _, workdir, loaded, _, _ = tiny
  broken = tmp_path / "broken.png"
  broken.write_bytes(b"not a png")
  with pytest.raises(interactive.InputError, match=r"--media image=.*broken.png"):
    interactive.prepare(config, workdir, [f"image={broken}"], "why?", loaded)


def test_fit_instruction():
  ids = list(range(50))
  assert interactive.fit_instruction(ids, 10, 5, 100) == ids
  assert interactive.fit_instruction(ids, 10, 5, 40) == ids[25:]
  with pytest.raises(interactive.InputError, match="max_new_tokens"):
    interactive.fit_instruction(ids, 30, 10, 40)


def test_settings_name_bad_fields():
  tok = mock.Mock(eos_id=2, pad_id=99, sp=mock.Mock(piece_to_id=lambda piece: 1))
  cfg, opts = interactive.settings(dict(preset="sample", temperature=0.7, seed=3), tok)
  assert (cfg.num_beams, cfg.do_sample, cfg.temperature, cfg.eos_id, cfg.pad_id) == (
      1, True, 0.7, 2, 99)
  assert opts.seed == 3 and cfg.repetition_penalty == DecodeConfig.reference().repetition_penalty
  assert interactive.settings(dict(preset="demo"), tok)[0].num_beams == 5
  with pytest.raises(ConfigError, match="generate.tempreature"):
    interactive.settings(dict(tempreature=0.7), tok)
  with pytest.raises(ConfigError, match="generate.preset='fast'"):
    interactive.settings(dict(preset="fast"), tok)
  with pytest.raises(ConfigError, match="generate.top_p"):
    interactive.settings(dict(top_p="high"), tok)
  config = demo_config.get_config()
  config.generate.preset = "fast"
  with pytest.raises(ConfigError, match="generate.preset='fast'"):  # before any model loads
    interactive.prepare(config, "/never/read", [f"image={REPO / 'README.md'}"], "why?")


def _sequence(prompt, order, soft, use_cues=True) -> list[float]:
  """The assembled prefix as numbers: token ids as themselves, soft tokens as their values."""
  embed = lambda ids: ids[..., None].astype(jnp.float32)
  text = jnp.asarray([[99]], jnp.int32)
  x, _, _ = assembly.assemble(embed, soft, text, jnp.ones_like(text), None, prompt, order,
                              use_cues=use_cues)
  return np.asarray(x)[0, :, 0].tolist()


CUE_PROMPT = assembly.PromptIds(cues=(("video", (2, 10, 11)), ("audio", (2, 20))),
                                clean_tokenization=True)


def test_media_layout_add_space_and_order():
  soft = {"audio": jnp.full((1, 2, 1), -2.0), "video": jnp.full((1, 2, 1), -1.0)}
  space = jnp.full((1, 1, 1), 7.0)
  prompt, order, pieces = interactive.media_layout(
      CUE_PROMPT, ("audio", "video"), soft, use_cues=True, joint=False, space=space,
      num_query_tokens=2)
  # The first cue keeps its BOS, later ones lose it; a " " after each modality's soft tokens.
  assert _sequence(prompt, order, pieces) == [2, 20, -2, -2, 7, 10, 11, -1, -1, 7, 99]
  prompt, order, pieces = interactive.media_layout(
      CUE_PROMPT, ("video", "audio"), soft, use_cues=False, joint=False, space=None,
      num_query_tokens=2)
  assert _sequence(prompt, order, pieces, use_cues=False) == [-1, -1, -2, -2, 99]


def test_media_layout_joint_video_audio():
  q, frames = 2, 3
  video = jnp.asarray([[[-(10 + i // q)] for i in range(frames * q)]], jnp.float32)
  audio = jnp.asarray([[[-(20 + i // q)] for i in range(4 * q)]], jnp.float32)  # 4 clips
  soft = {"video": video, "audio": audio}
  prompt, order, pieces = interactive.media_layout(
      CUE_PROMPT, ("video", "audio"), soft, use_cues=True, joint=True, space=None,
      num_query_tokens=q)
  # Frame by clip; the reference keeps the video cue's BOS for frames 0 and 1 (`pos > 1`).
  assert _sequence(prompt, order, pieces) == [
      2, 10, 11, -10, -10, 20, -20, -20,
      2, 10, 11, -11, -11, 20, -21, -21,
      10, 11, -12, -12, 20, -22, -22, 99]
  with pytest.raises(interactive.InputError, match="2 clips, fewer than the video's 3"):
    interactive.media_layout(CUE_PROMPT, ("video", "audio"),
                             {"video": video, "audio": audio[:, :2 * q]}, use_cues=True,
                             joint=True, space=None, num_query_tokens=q)
  with pytest.raises(interactive.InputError, match="exactly a video and an audio"):
    interactive.media_layout(CUE_PROMPT, ("video",), {"video": video}, use_cues=True,
                             joint=True, space=None, num_query_tokens=q)


def test_space_token_is_the_lone_word_boundary_piece(tiny):
  tok = tiny[3].inputs.llm_tokenizer
  (space,) = interactive.space_ids(tok)
  assert tok.sp.id_to_piece(space) == "\u2581"


def test_beam_search_prints_the_best_hypothesis_at_the_end(llm, tiny):
  tok = tiny[3].inputs.llm_tokenizer
  cfg = DecodeConfig(num_beams=2, max_new_tokens=6, eos_id=EOS, pad_id=PAD, bos_id=BOS)
  emb, mask = _prompt(11, b=1)
  prep = interactive.Prepared(embeds=emb, mask=mask, llm=llm, decode=cfg,
                              options=interactive.GenerateOptions(), tokenizer=tok,
                              instruction_ids=[])
  want = _until_eos(np.asarray(jit_generate(llm, cfg)(emb, mask)[0])[0], EOS)
  out = io.StringIO()
  assert interactive.answer_ids(prep, out) == want and want
  assert out.getvalue() == tok.decode(want).strip() + "\n"
