"""Reference ("golden") cases produced by the LAVIS implementation, and their checkers.

A case is `<component>_<case>.npz` plus a `.json` sidecar (format: `../shared/golden/README.md`).
Each component has a module here exposing `check(case: Case) -> list[Comparison]`; the module is
picked by the file name's prefix.
"""

from xblip_jax.golden.case import Case, Comparison, compare, load_case  # noqa: F401

# File-name prefix -> checker module (imported lazily so one component's deps never block another).
CHECKERS: dict[str, str] = {
    "qformer": "xblip_jax.golden.qformer",
    "llm_assembly": "xblip_jax.golden.llm_assembly",
    "eva_vit": "xblip_jax.golden.eva_vit",
    "beats_fbank": "xblip_jax.golden.beats_fbank",
    "beats": "xblip_jax.golden.beats",
    "pointbert": "xblip_jax.golden.pointbert",
}


def checker_for(stem: str) -> str:
  """The checker module for a case file stem such as ``beats_fbank_a`` (longest prefix wins)."""
  matches = [p for p in CHECKERS if stem == p or stem.startswith(p + "_")]
  if not matches:
    raise ValueError(f"no golden checker for {stem!r}; known prefixes: {sorted(CHECKERS)}")
  return CHECKERS[max(matches, key=len)]
