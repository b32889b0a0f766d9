"""The pp op sample_frames: which frames of a clip a video model sees (vlm.data.preprocess.frame_indices)."""

import numpy as np
import pytest

from vlm.data import preprocess


def _clip(t: int) -> dict:
  """A clip whose frame i is filled with the value i (so kept frames can be read back)."""
  frames = np.stack([np.full((4, 4, 3), i, np.uint8) for i in range(t)])
  return {"image": frames[t // 2], "frames": frames, "motion": np.int32(2)}


def _kept(spec: str, t: int, seed: int = 0) -> list[int]:
  ex = preprocess.apply_ops(preprocess.parse_pp(spec, "data.pp_train"), _clip(t), np.random.default_rng(seed))
  return [int(f[0, 0, 0]) for f in ex["frames"]]


def test_uniform_spans_the_clip_and_first_takes_the_start():
  assert _kept("sample_frames(4)", 16) == [0, 5, 10, 15]
  assert _kept("sample_frames(1)", 16) == [0]
  assert _kept("sample_frames(8)", 3) == [0, 0, 1, 1, 1, 1, 2, 2]  # a short clip repeats frames, in order
  assert _kept("sample_frames(3, 'first')", 16) == [0, 1, 2]
  assert _kept("sample_frames(5, 'first')", 3) == [0, 1, 2, 2, 2]


def test_middle_keeps_the_frames_around_the_middle_one():
  assert _kept("sample_frames(1, 'middle')", 8) == [4]  # the clip's `image` (sources: frames[T // 2])
  assert _kept("sample_frames(1, 'middle')", 7) == [3]
  assert _kept("sample_frames(3, 'middle')", 8) == [3, 4, 5]
  assert _kept("sample_frames(4, 'middle')", 8) == [2, 3, 4, 5]
  assert _kept("sample_frames(5, 'middle')", 2) == [0, 0, 1, 1, 1]  # a short clip: clipped at its ends


def test_subtitles_follow_the_kept_frames_and_no_word_is_lost():
  subs = ["", "", "", "cat", "", "", "", "map"]
  ex = dict(_clip(8), subtitles=subs)
  keep = lambda spec: preprocess.apply_ops(preprocess.parse_pp(spec, "p"), dict(ex), None)["subtitles"]  # noqa: E731
  assert keep("sample_frames(8)") == subs
  assert keep("sample_frames(1, 'middle')") == ["cat map"]  # one frame holds every word, in time order
  assert keep("sample_frames(4)") == ["", "cat", "", "map"]  # kept frames 0, 2, 5, 7: 3 is nearest to 2
  assert keep("sample_frames(2, 'first')") == ["", "cat map"]
  # Every word reaches the kept frame nearest to when it was said, for any sampling.
  rng = np.random.default_rng(0)
  for _ in range(50):
    said = [str(t) if rng.random() < 0.4 else "" for t in range(12)]
    kept = np.sort(rng.choice(12, size=int(rng.integers(1, 12)), replace=False))
    out = preprocess.regroup_subtitles(said, kept)
    assert len(out) == len(kept) and " ".join(w for w in out if w).split() == [w for w in said if w]
    for k, words in enumerate(out):
      for w in words.split():
        assert np.abs(kept - int(w)).min() == abs(kept[k] - int(w))


def test_random_stride_keeps_an_in_order_run_at_one_stride_and_varies_with_the_draw():
  runs = [_kept("sample_frames(4, 'random_stride', max_stride=3)", 16, seed) for seed in range(40)]
  for run in runs:
    steps = np.diff(run)
    assert len(run) == 4 and len(set(steps)) == 1 and 1 <= steps[0] <= 3 and 0 <= run[0] and run[-1] < 16, run
  assert {r[1] - r[0] for r in runs} == {1, 2, 3}  # every stride is drawn
  assert len({r[0] for r in runs}) > 5  # and many starts
  assert runs[0] == _kept("sample_frames(4, 'random_stride', max_stride=3)", 16, 0)  # the draw is the rng's
  # A clip too short for the stride keeps the longest one it allows; one too short for the count, uniform.
  assert _kept("sample_frames(4, 'random_stride', max_stride=3)", 7, 1) in (
    [0, 2, 4, 6],
    *([s, s + 1, s + 2, s + 3] for s in range(4)),
  )
  assert _kept("sample_frames(4, 'random_stride')", 2) == [0, 0, 1, 1]


def test_examples_without_frames_and_the_rest_of_the_example_are_untouched():
  ex = preprocess.apply_ops(
    preprocess.parse_pp("sample_frames(2)", "p"), {"image": np.zeros((4, 4, 3), np.uint8)}, None
  )
  assert set(ex) == {"image"}
  ex = preprocess.apply_ops(preprocess.parse_pp("sample_frames(2)", "p"), _clip(6), None)
  assert ex["frames"].shape == (2, 4, 4, 3) and int(ex["motion"]) == 2 and int(ex["image"][0, 0, 0]) == 3


@pytest.mark.parametrize(
  "spec,match",
  [
    ("sample_frames(0)", "num_frames must be a positive int, got 0"),
    ("sample_frames(2, 'centre')", "mode must be one of uniform, first, random_stride, middle, got 'centre'"),
    ("sample_frames(2, 'random_stride', max_stride=0)", "max_stride must be a positive int"),
  ],
)
def test_bad_arguments_name_the_op_and_the_argument(spec, match):
  with pytest.raises(ValueError, match=r"data.pp_eval: bad argument for op 'sample_frames'.*" + match):
    preprocess.parse_pp(f"decode|{spec}", "data.pp_eval")
