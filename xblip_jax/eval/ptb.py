"""Caption tokenisation for the COCO caption metrics: Stanford's PTBTokenizer, or a stand-in.

`pycocoevalcap` tokenises references and candidates with the Stanford PTBTokenizer (Java,
`-preserveLines -lowerCase`) and then drops punctuation tokens. Where Java is missing,
`python_tokenize` reproduces what that does to captions: clitics split off ("it's" -> "it 's",
"can't" -> "ca n't", "gonna" -> "gon na"), punctuation split and dropped, brackets kept as the
lower-cased PTB escapes ("-lrb-": `-lowerCase` turns "-LRB-" into a token the drop list no
longer matches), dotted abbreviations ("u.s.", "p.m."), numbers ("1,000", "3:30"), hyphenated
and slashed words kept whole. `tests/test_eval_metrics.py` checks it against the Java tokenizer.
"""

from __future__ import annotations

import functools
import re
import shutil
from typing import Mapping, Sequence

from absl import logging

# pycocoevalcap's drop list (after tokenisation).
PUNCTUATIONS = frozenset({"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?",
                          "!", ",", ":", "-", "--", "...", ";"})
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-",
             "]": "-rsb-"}
# Words PTB splits in two.
_SPLITS = {"gonna": "gon na", "gotta": "got ta", "wanna": "wan na", "lemme": "lem me",
           "gimme": "gim me", "cannot": "can not"}
_TOKEN = re.compile(r"""
    (?:mr|mrs|ms|dr|st|jr|sr|vs|etc|mt|prof|inc|ltd|co)\.(?!\w)   # titles keep their period
  | (?:[a-z]\.){2,}                      # u.s.  p.m.  t.v.
  | \d+(?:[.,:/]\d+)+                    # 1,000  3.5  3:30  1/2
  | \w+(?:['’]\w+|[-/&]\w+)*'?       # words, hyphenated or slashed; clitics split below
  | <[a-z][^<>\s]*>                      # SGML-like tags stay whole
  | \.\.\.|--|``|''
  | \S                                   # any other single character
""", re.VERBOSE)
_CLITIC = re.compile(r"^(.+?)('s|'re|'ve|'ll|'d|'m|n't)$")


def _split_word(token: str) -> list[str]:
  if token in _SPLITS:
    return _SPLITS[token].split()
  if token.endswith("'"):  # plural possessive: "dogs'" -> dogs '
    return [token[:-1], "'"]
  m = _CLITIC.match(token)
  if m and "'" not in m.group(1):
    return [m.group(1), m.group(2)]
  return [token]


def python_tokenize(text: str) -> str:
  """One caption, tokenised and with punctuation dropped, as pycocoevalcap's PTB path does."""
  out: list[str] = []
  for tok in _TOKEN.findall(text.replace("\n", " ").lower()):
    if tok == '"':  # PTB turns it into `` or '', both dropped
      continue
    if tok in _BRACKETS:
      out.append(_BRACKETS[tok])
    elif tok[0].isalnum() or tok[0] == "_":
      out.extend(_split_word(tok))
    else:
      out.append(tok)
  return " ".join(t for t in out if t not in PUNCTUATIONS)


@functools.cache
def java_available() -> bool:
  return shutil.which("java") is not None


def tokenize(captions: Mapping[object, Sequence[str]], *, use_java: bool | None = None
             ) -> dict[object, list[str]]:
  """`{key: [caption, ...]}` -> `{key: [tokenised caption, ...]}` (keys and order kept)."""
  use_java = java_available() if use_java is None else use_java
  if use_java:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # pylint: disable=C0415

    out = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    return {k: out.get(k, []) for k in captions}
  return {k: [python_tokenize(c) for c in v] for k, v in captions.items()}


@functools.cache
def warn_no_java() -> None:
  logging.warning("java not found: captions are tokenised by the Python PTB stand-in and "
                  "METEOR (a Java program) is not reported")
