"""Golden check of the BEATs front end (`beats_fbank_*` cases): waveform -> 128-bin log-mel.

Every `input/waveform_<j>` is run through `beats_features` (x 2**15, Kaldi fbank, BEATs
normalisation) and compared with `fbank_raw_<j>` (atol 1e-3) and `fbank_<j>` (atol 1e-4).
The sample rate, statistics and bin count come from the case (json and array shapes).
"""

from __future__ import annotations

import numpy as np

from xblip_jax.data.preprocess import audio_fbank
from xblip_jax.golden.case import Case, Comparison, compare

ATOL_RAW = 1e-3
ATOL_NORMALISED = 1e-4


def check(case: Case) -> list[Comparison]:
  meta = case.meta
  sample_rate = int(meta.get("sample_rate", 16000))
  mean = float(meta.get("fbank_mean", audio_fbank.FBANK_MEAN))
  std = float(meta.get("fbank_std", audio_fbank.FBANK_STD))
  if (mean, std) != (audio_fbank.FBANK_MEAN, audio_fbank.FBANK_STD):
    return [Comparison(f"fbank statistics {mean}/{std} differ from BEATs'", float("inf"),
                       0.0, 0.0, False)]
  results = []
  for key in sorted(k for k in case.inputs if k.startswith("waveform_")):
    j = key[len("waveform_"):]
    want_raw = case.outputs[f"fbank_raw_{j}"]
    scaled = np.asarray(case.inputs[key], np.float32) * np.float32(audio_fbank.WAVEFORM_SCALE)
    raw = audio_fbank.kaldi_fbank(scaled, sample_rate=sample_rate,
                                  num_mel_bins=want_raw.shape[-1])
    results.append(compare(f"fbank_raw_{j}", raw, want_raw, atol=ATOL_RAW, rtol=0.0))
    results.append(compare(f"fbank_{j}", audio_fbank.beats_normalize(raw),
                           case.outputs[f"fbank_{j}"], atol=ATOL_NORMALISED, rtol=0.0))
    if want_raw.shape[-1] == 128:  # the one-call pipeline LAVIS' processor runs
      results.append(compare(f"fbank_{j} (beats_features)",
                             audio_fbank.beats_features(case.inputs[key], sample_rate),
                             case.outputs[f"fbank_{j}"], atol=ATOL_NORMALISED, rtol=0.0))
  if not results:
    return [Comparison("no waveform_<j> inputs in case", float("inf"), 0.0, 0.0, False)]
  return results
