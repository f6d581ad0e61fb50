"""VQA accuracy and GQA exact match, as LAVIS scores them (`lavis/common/vqa_tools/vqa_eval.py`,
`lavis/tasks/vqa.py::GQATask`).

Published VQA numbers depend on this normalisation's quirks, so they are kept on purpose:
- the prediction is always normalised (punctuation, then number words / articles /
  contractions); the human answers only get the punctuation pass, and only when they disagree;
- punctuation is deleted (not spaced) when it touches a space anywhere in the text or the text
  holds a digit-comma-digit group; periods not followed by a digit are deleted, at most 32 of
  them (the official code passes `re.UNICODE` as `re.sub`'s count);
- contraction keys that hold capitals ("Im", "Ive") can never match lower-cased words.
Accuracy is min(#matching humans / 3, 1) averaged over the leave-one-out subsets of the humans
(the 10-choose-9 average for VQAv2's ten answers). Values are fractions (LAVIS prints x100).
"""

from __future__ import annotations

import re
from typing import Sequence

# The official contraction table (missing-apostrophe spelling -> canonical), data verbatim.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
         "`", ",", "?", "!")
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
# The official pattern: `(?!<=\d)` is a look-ahead for the literal "<=d", so every period that
# is not followed by a digit goes.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_COUNT = int(re.UNICODE)  # the official call passes the flag as the count


def process_punctuation(text: str) -> str:
  delete = _DIGIT_COMMA.search(text) is not None
  out = text
  for p in PUNCT:
    out = out.replace(p, "" if delete or p + " " in text or " " + p in text else " ")
  return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
  words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def _clean(text: str) -> str:
  return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
  """The prediction side of both metrics."""
  return process_digit_article(process_punctuation(_clean(text)))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """VQA accuracy of one prediction against the human answers (any number >= 1)."""
  if not answers:
    raise ValueError("vqa_accuracy needs at least one human answer")
  pred = normalize_answer(prediction)
  gts = list(answers)  # LAVIS cleans only the prediction
  if len(set(gts)) > 1:
    gts = [process_punctuation(a) for a in gts]
  matches = [a == pred for a in gts]
  total = sum(matches)
  # Leave human i out: the others that match are total - matches[i].
  return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(gts)


def gqa_match(prediction: str, answer: str) -> float:
  """GQA-style exact match: both sides normalised, one ground truth."""
  return float(normalize_answer(prediction) == normalize_answer(answer))
