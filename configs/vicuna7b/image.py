"""X-InstructBLIP Vicuna-7B image Q-Former (LAVIS `train/vicuna7b/`); see `configs/common.py`.

    python -m xblip_jax.main --config configs/vicuna7b/image.py:h100x8 --workdir DIR
    python -m xblip_jax.main --config configs/vicuna7b/image.py:v5e-64 --workdir DIR \\
        --config.mode=plan
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402  pylint: disable=wrong-import-position


def get_config(target=None):
  return common.get_config("7b", "image", target)
