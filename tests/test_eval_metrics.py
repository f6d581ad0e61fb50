"""The evaluation scorers against hand-computed cases: VQA accuracy and its normalisation
quirks, GQA exact match, DisCRn on a small fixture, classification, COCO caption metrics, and
the Python PTB tokenizer against the Java one."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from xblip_jax.data.formats import discrn as discrn_format
from xblip_jax.eval import candidate_nll
from xblip_jax.eval import captioning, classification, discrn, ptb, scoring, tasks, vqa


def test_vqa_normalisation_rules():
  assert vqa.process_punctuation("hello-world") == "hello world"      # no space around: space
  assert vqa.process_punctuation("hello - world") == "hello  world"   # touches a space: deleted
  assert vqa.process_punctuation("1,000 yes-no") == "1000 yesno"      # digit,digit: all deleted
  assert vqa.process_punctuation("3.5 feet.") == "3.5 feet"           # only periods before digits stay
  assert vqa.normalize_answer(" Two Dogs.\n") == "2 dogs"
  assert vqa.normalize_answer("the dont") == "don't"
  assert vqa.normalize_answer("Im") == "im"  # capitalised keys of the official table never match


def test_vqa_accuracy_leave_one_out():
  # 3 of 10 humans said "yes": leaving out a "yes" leaves 2 matches (2/3), a "no" leaves 3 (1).
  assert vqa.vqa_accuracy("yes", ["yes"] * 3 + ["no"] * 7) == pytest.approx((3 * 2 / 3 + 7) / 10)
  assert vqa.vqa_accuracy("Two.", ["2"] * 10) == 1.0
  assert vqa.vqa_accuracy("cat", ["dog"] * 10) == 0.0
  # Disagreeing humans get the punctuation pass only: "two" stays "two", the prediction -> "2".
  assert vqa.vqa_accuracy("two", ["2"] * 2 + ["two"] * 8) == pytest.approx(
      (2 * (1 / 3) + 8 * (2 / 3)) / 10)
  # Agreeing humans get no pass at all: "red." never equals the normalised "red".
  assert vqa.vqa_accuracy("red", ["red."] * 10) == 0.0
  assert vqa.vqa_accuracy("red", ["red."] * 9 + ["red"]) == pytest.approx(1.0)


def test_gqa_match_normalises_both_sides():
  assert vqa.gqa_match("The Red.", "red") == 1.0
  assert vqa.gqa_match("three", "3") == 1.0
  assert vqa.gqa_match("red car", "red") == 0.0


def test_discrn_fixture():
  rows = [  # (modalities, label, prediction, correct)
      (("image", "pc"), 0, "The first one", True),      # "first 1": the word "first"
      (("image", "pc"), 0, "the image", True),           # the modality name
      (("image", "pc"), 1, "the 3d model", True),        # a pc synonym, as a word
      (("image", "pc"), 1, "first", False),
      (("video", "audio"), 1, "Option B", True),         # "b" as a word
      (("video", "audio"), 0, "A.", False),              # normalises to "" (article dropped)
      (("video", "audio"), 0, "(a)", False),             # so does "(a)"
      (("video", "audio"), 1, "the sound", True),        # audio synonym
      (("video", "audio"), 0, "left", True),
      (("video", "audio"), 0, "the video on the left", True),  # "video" comes first
  ]
  preds = [{"prediction": p, "answers": discrn_format.accepted_answers(label, m)}
           for m, label, p, _ in rows]
  got = [discrn.discrn_correct(p["prediction"], p["answers"]) for p in preds]
  assert got == [float(c) for *_, c in rows]
  assert discrn.resolve("the video on the left", preds[-1]["answers"]) == "video"
  metrics = scoring.score_set(tasks.TASKS["discrn_audio_video"], preds)
  assert metrics["discrn_acc"] == pytest.approx(7 / 10)
  assert [p["score"] for p in preds] == got
  with pytest.raises(ValueError):
    discrn_format.accepted_answers(0, ("image",))


def test_classification_methods():
  classes = ["dog barking", "dog", "rain"]
  assert classification.class_from_generation("A Dog barking.", classes) == "dog"
  assert classification.class_from_generation("thunder", classes) == ""
  losses = [[2.0, 1.5, 3.0], [0.1, 0.2, 0.1]]
  assert list(classification.rank_candidates(losses)) == [1, 0]
  assert classification.accuracy([1, 0], [1, 2]) == 0.5


def test_row_nll_sums_the_training_loss_per_row():
  from xblip_jax.models.assembly import causal_lm_loss  # pylint: disable=import-outside-toplevel
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  logits = jax.random.normal(k1, (3, 7, 11))
  labels = np.array(jax.random.randint(k2, (3, 7), 0, 11))
  labels[np.asarray(jax.random.bernoulli(k3, 0.4, (3, 7)))] = -100
  per_row = np.asarray(candidate_nll.row_nll(logits, labels))
  loss, count = causal_lm_loss(logits, labels)
  np.testing.assert_allclose(per_row.sum(), float(loss) * int(count), rtol=1e-5)
  one, n1 = causal_lm_loss(logits[1:2], labels[1:2])
  np.testing.assert_allclose(per_row[1], float(one) * int(n1), rtol=1e-5)


def test_task_registry_prompts_and_decoding():
  assert set(tasks.DEMO_SETS.values()) <= set(tasks.TASKS)
  okvqa = tasks.TASKS["okvqa"]
  assert okvqa.format_prompt("What is this?") == "based on the given the image respond to what is this?"
  assert (okvqa.decode.num_beams, okvqa.decode.max_new_tokens, okvqa.decode.length_penalty) == (
      5, 9, -1.0)
  cap = tasks.TASKS["coco_caption"]
  assert cap.format_prompt() == "a short description"
  assert (cap.decode.max_new_tokens, cap.decode.min_new_tokens,
          cap.decode.repetition_penalty) == (79, 9, 1.15)
  assert tasks.TASKS["cap3d"].decode.length_penalty == 0.0
  assert tasks.for_eval_set("discrn_image_pc").modalities == ("image", "pc")
  assert tasks.for_eval_set("anything", "esc50").candidates == "an audio of {}"
  with pytest.raises(KeyError):
    tasks.for_eval_set("unknown_set")
  assert scoring.postprocess(okvqa, "  ") == "unanswerable"


def test_caption_metrics_hand_computed():
  # One example, hypothesis "a b c d" vs reference "a b c e": n-gram precisions 3/4, 2/3, 1/2,
  # 0/1 at brevity 1; LCS 3 of 4 on both sides gives ROUGE-L 0.75.
  metrics, per = captioning.score_captions({"x": "a b c d"}, {"x": ["a b c e"]}, use_java=False)
  assert metrics["Bleu_1"] == pytest.approx(0.75, rel=1e-6)
  assert metrics["Bleu_2"] == pytest.approx((0.75 * 2 / 3) ** 0.5, rel=1e-6)
  assert metrics["Bleu_3"] == pytest.approx((0.75 * 2 / 3 * 0.5) ** (1 / 3), rel=1e-6)
  assert metrics["Bleu_4"] < 1e-3
  assert metrics["ROUGE_L"] == pytest.approx(0.75)
  assert "METEOR" not in metrics and per["x"]["ROUGE_L"] == pytest.approx(0.75)
  # Exact captions of 4+ words: every n-gram cosine is 1 and CIDEr-D scales by 10.
  refs = {"a": ["a man rides a wave on a surfboard"], "b": ["two dogs play in the snow"]}
  metrics, _ = captioning.score_captions({k: v[0].upper() + "." for k, v in refs.items()}, refs,
                                         use_java=False)
  assert metrics["CIDEr"] == pytest.approx(10.0)
  assert metrics["Bleu_4"] == pytest.approx(1.0)
  assert metrics["agg_metrics"] == pytest.approx(11.0)


CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs' toys aren't on the table, they're in the box!",
    "The U.S. flag flies over a building (in Washington) at 3:30 p.m.",
    "A black-and-white photo of a cat; it's sleeping...",
    '"Hello," she said -- and she can\'t stop; won\'t stop.',
    "A person's 1,000 dollars and 3.5% interest rate & $20 bill.",
    "a dog/cat sitting on a couch with Mr. Smith's hat at 10 o'clock",
    "A car engine revs up, then idles; a horn honks twice.",
    "I'm gonna watch T.V. at St. James's e-mail re: the 2nd floor?",
    "People are talking: \"wow!\" `quoted' and {braces} [brackets]",
    "Water is running while a woman speaks and a baby cries.",
    "A 3D model of a red chair with four legs",
]


@pytest.mark.skipif(not ptb.java_available(), reason="needs java for the Stanford tokenizer")
def test_python_tokenizer_matches_java_ptb():
  java = ptb.tokenize({i: [c] for i, c in enumerate(CAPTIONS)}, use_java=True)
  for i, caption in enumerate(CAPTIONS):
    assert ptb.python_tokenize(caption) == java[i][0], caption
  metrics, _ = captioning.score_captions({"0": CAPTIONS[0]}, {"0": [CAPTIONS[0].lower()]})
  assert metrics["METEOR"] == pytest.approx(1.0, abs=1e-3)
