"""BEATs front end: waveform -> Kaldi log-mel fbank -> normalisation -> 512-frame clips."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import golden_cases
from xblip_jax.data.preprocess import audio_fbank as af
from xblip_jax.golden import beats_fbank, load_case

LOG_EPS = float(np.log(np.finfo(np.float32).eps))  # -15.9424


@pytest.mark.parametrize("path", golden_cases("beats_fbank"), ids=lambda p: p.stem)
def test_golden(path):
  results = beats_fbank.check(load_case(path))
  assert results and all(r.ok for r in results), "\n".join(r.line() for r in results)


def _noise(seed: int, n: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  t = np.arange(n) / 16000.0
  tone = 0.3 * np.sin(2 * np.pi * 440.0 * t) + 0.1 * np.sin(2 * np.pi * 3000.0 * t)
  return (tone + 0.05 * rng.standard_normal(n)).astype(np.float32)


def test_frame_count_and_short_input():
  for n in (400, 401, 559, 560, 16000):
    assert af.kaldi_fbank(_noise(0, n)).shape == (1 + (n - 400) // 160, 128)
  with pytest.raises(ValueError, match="shorter"):
    af.kaldi_fbank(np.zeros(399, np.float32))
  with pytest.raises(ValueError, match="mono"):
    af.kaldi_fbank(np.zeros((2, 800), np.float32))
  wav = _noise(0, 800)
  np.testing.assert_array_equal(af.kaldi_fbank(wav[None]), af.kaldi_fbank(wav))


def test_empty_mel_bin_is_log_eps():
  banks = af.mel_filterbank(128, 512, 16000.0)
  assert banks.shape == (128, 257)
  empty = np.flatnonzero(banks.sum(axis=1) == 0)
  assert empty.tolist() == [3]
  fb = af.kaldi_fbank(_noise(1, 8000) * 2**15)
  np.testing.assert_array_equal(fb[:, 3], np.float32(LOG_EPS))
  np.testing.assert_allclose(af.beats_normalize(fb)[:, 3], -2.3917, atol=1e-4)
  assert np.all(banks[:, -1] == 0)  # the Nyquist column never contributes


def test_beats_features_scales_by_2_pow_15():
  wav = _noise(2, 6000)
  want = (af.kaldi_fbank(wav * np.float32(2**15)) - 15.41663) / (2 * 6.55582)
  np.testing.assert_allclose(af.beats_features(wav), want, atol=1e-6)
  # The scaling is a constant log offset wherever the eps floor does not bind.
  shift = af.kaldi_fbank(wav * np.float32(2**15)) - af.kaldi_fbank(wav)
  live = np.ones(128, bool)
  live[3] = False
  np.testing.assert_allclose(shift[:, live], 30 * np.log(2.0), atol=2e-3)


def test_matches_kaldi_native_fbank_at_80_bins():
  knf = pytest.importorskip("kaldi_native_fbank")
  wav = _noise(3, 12345) * np.float32(2**15)
  opts = knf.FbankOptions()
  opts.frame_opts.dither = 0.0
  opts.frame_opts.samp_freq = 16000
  opts.mel_opts.num_bins = 80
  online = knf.OnlineFbank(opts)
  online.accept_waveform(16000, wav.tolist())
  online.input_finished()
  want = np.stack([online.get_frame(i) for i in range(online.num_frames_ready)])
  got = af.kaldi_fbank(wav, num_mel_bins=80)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)


def test_split_clips_pads_short_audio():
  fb = np.random.default_rng(0).standard_normal((700, 128)).astype(np.float32)
  clips, mask = af.split_clips(fb, frames_per_clip=512, num_clips=2)
  assert clips.shape == (2, 512, 128) and mask.shape == (2, 512)
  np.testing.assert_array_equal(clips.reshape(1024, 128)[:700], fb)
  assert np.all(clips.reshape(1024, 128)[700:] == 0)
  assert not mask[0].any()
  assert mask[1].tolist() == [False] * 188 + [True] * 324


def test_split_clips_crops_long_audio():
  fb = np.random.default_rng(1).standard_normal((1500, 128)).astype(np.float32)
  clips, mask = af.split_clips(fb)
  np.testing.assert_array_equal(clips.reshape(1024, 128), fb[:1024])
  assert not mask.any()


def test_split_clips_eval_keeps_the_reference_padding():
  fb = np.ones((700, 8), np.float32)
  # 700 % 512 = 188 rows are added (not 324), so 888 rows give one clip and the tail is dropped.
  clips, mask = af.split_clips_eval(fb, frames_per_clip=512)
  assert clips.shape == (1, 512, 8) and not mask.any()
  # 1000 % 512 = 488 rows are added: 1488 rows, two clips, the second with 24 padded rows.
  clips, mask = af.split_clips_eval(np.ones((1000, 8), np.float32), frames_per_clip=512)
  assert clips.shape == (2, 512, 8) and int(mask[1].sum()) == 24 and not mask[0].any()
  clips, mask = af.split_clips_eval(np.ones((300, 8), np.float32), frames_per_clip=512)
  assert clips.shape == (1, 512, 8)
  assert mask[0].tolist() == [False] * 300 + [True] * 212
