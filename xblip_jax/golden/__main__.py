"""`python -m xblip_jax.golden FILE.npz [FILE.npz ...]`: check reference cases.

Prints one line per file with its largest absolute error (and one indented line per output
compared), and exits non-zero when any file misses its tolerance.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from xblip_jax.golden import checker_for, load_case


def main(argv: list[str]) -> int:
  if not argv:
    print(__doc__.strip(), file=sys.stderr)
    return 2
  failed = 0
  for arg in argv:
    path = Path(arg)
    try:
      module = importlib.import_module(checker_for(path.stem))
      comparisons = module.check(load_case(path))
    except Exception as e:  # one bad file must not hide the others' results
      print(f"{path.name}: ERROR {type(e).__name__}: {e}")
      failed += 1
      continue
    ok = all(c.ok for c in comparisons)
    worst = max((c.max_abs for c in comparisons), default=0.0)
    print(f"{path.name}: {'PASS' if ok else 'FAIL'} max_abs_err={worst:.3g} ({len(comparisons)} outputs)")
    for c in comparisons:
      print(f"  {c.line()}")
    failed += not ok
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
