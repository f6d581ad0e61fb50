"""LLM input assembly and tokenisation against the reference rules and the LAVIS goldens."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import golden_cases
from xblip_jax.data import text as text_lib
from xblip_jax.data.tokenizers import LlmTokenizer
from xblip_jax.golden import load_case
from xblip_jax.models import assembly

CASES = golden_cases("llm_assembly")


def _prompt_ids(case) -> assembly.PromptIds:
  order = case.meta["config"]["modalities_order"]
  return assembly.PromptIds(
      prefix=tuple(case.inputs["prefix_input_ids"][0].tolist()),
      cues=tuple((m, tuple(case.inputs[f"cue_{m}_input_ids"][0].tolist())) for m in order),
      clean_tokenization=case.meta["config"]["clean_tokenization"])


def _soft(case) -> dict[str, np.ndarray]:
  """<m>_llm_proj(query output), regrouped per sample (clip-major), as the reference."""
  cfg = case.meta["config"]
  nq = cfg["num_query_token"]
  batch = case.inputs["text_input_ids"].shape[0]
  out = {}
  for m in cfg["modalities_order"]:
    rows = case.inputs[f"{m}_qformer_last_hidden_state"][:, :nq]
    proj = rows @ case.params[f"{m}_llm_proj.weight"].T + case.params[f"{m}_llm_proj.bias"]
    out[m] = proj.reshape(batch, -1, proj.shape[-1])
  return out


def _text_block(case):
  pad = case.meta["config"]["len_llm_tokenizer"] - 1  # [PAD] is the last id
  ins, outs = case.inputs["text_input_ids"], case.inputs["text_output_ids"]
  ins_m, outs_m = case.inputs["text_input_attention_mask"], case.inputs["text_output_attention_mask"]
  rows = [text_lib.llm_text_block(list(ins[b][ins_m[b] == 1]), list(outs[b][outs_m[b] == 1][1:]),
                                  ins.shape[1] + outs.shape[1] - 1, pad)
          for b in range(ins.shape[0])]
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
@pytest.mark.parametrize("layout,prefix", [("reference_forward", ""), ("single", "fixed_")])
def test_assembly_matches_golden(path, layout, prefix):
  case = load_case(path)
  table = case.params["llm_model.model.embed_tokens.weight"]
  soft = _soft(case)
  for m in soft:
    np.testing.assert_allclose(soft[m], case.outputs[f"inputs_llm_{m}"], atol=1e-5, rtol=1e-5)
  block = _text_block(case)
  np.testing.assert_array_equal(block["llm_text_ids"], case.outputs["llm_tokens_input_ids"])
  np.testing.assert_array_equal(block["llm_text_mask"], case.outputs["llm_tokens_attention_mask"])
  embeds, mask, labels = assembly.assemble(
      lambda ids: table[np.asarray(ids)], soft, block["llm_text_ids"], block["llm_text_mask"],
      block["llm_text_labels"], _prompt_ids(case), case.meta["config"]["modalities_order"],
      layout=layout)
  np.testing.assert_array_equal(np.asarray(mask), case.outputs[prefix + "attention_mask"])
  np.testing.assert_array_equal(np.asarray(labels), case.outputs[prefix + "labels"])
  np.testing.assert_allclose(np.asarray(embeds), case.outputs[prefix + "inputs_embeds"],
                             atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_llm_tokenizer_reproduces_reference_ids(path):
  case = load_case(path)
  cfg = case.meta["config"]
  tok = LlmTokenizer(case.inputs["tokenizer_model_bytes"].tobytes())
  assert tok.vocab_size == cfg["len_llm_tokenizer"]
  tcfg = text_lib.TextConfig(prefix=cfg["prefix"], postfix=cfg["postfix"],
                             clean_tokenization=cfg["clean_tokenization"],
                             max_txt_len=cfg["max_txt_len"],
                             max_output_txt_len=cfg["max_output_txt_len"])
  assert tok.encode(cfg["prefix"], add_bos=True) == case.inputs["prefix_input_ids"][0].tolist()
  for m, cue in cfg["MODALITY_TO_CUE_after_init"].items():
    key = f"cue_{m}_input_ids"
    if key in case.inputs:
      assert tok.encode(cue, add_bos=True) == case.inputs[key][0].tolist()
  for b, (ti, to) in enumerate(zip(cfg["text_input"], cfg["text_output"])):
    ins = case.inputs["text_input_ids"][b][case.inputs["text_input_attention_mask"][b] == 1]
    outs = case.inputs["text_output_ids"][b][case.inputs["text_output_attention_mask"][b] == 1]
    assert text_lib.encode_instruction(tok, ti, tcfg) == ins.tolist()
    assert text_lib.encode_answer(tok, to, tcfg) == outs[1:].tolist()


def test_truncation_keeps_labels_aligned():
  instruction, answer = list(range(10, 30)), list(range(100, 110))
  block = text_lib.llm_text_block(instruction, answer, length=16, pad_id=0)
  ids, labels, mask = block["llm_text_ids"], block["llm_text_labels"], block["llm_text_mask"]
  assert mask.sum() == 16
  supervised = labels != text_lib.IGNORE
  np.testing.assert_array_equal(ids[supervised], labels[supervised])
  np.testing.assert_array_equal(ids[:6], instruction[-6:])  # instruction keeps its end
  np.testing.assert_array_equal(labels[6:], answer)


def test_single_layout_drops_bos_where_generate_does():
  prompt = assembly.PromptIds(prefix=(), cues=(("image", (2, 7, 8)), ("pc", (2, 9))),
                              clean_tokenization=True)
  segs = assembly.segments(prompt, ["image", "pc"], "single")
  assert segs == [("ids", (2, 7, 8)), ("soft", "image"), ("ids", (9,)), ("soft", "pc")]
  with pytest.raises(ValueError, match="layout"):
    assembly.segments(prompt, ["image"], "bogus")
