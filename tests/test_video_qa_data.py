"""Clips of events for video QA (vlm.data.scenes.sample_clip, data.builder.video_events): the answers are
what the rendered frames show, a single frame cannot give them, and the frames reach a VLM as images
interleaved with their subtitles (the example op frames_as_images)."""

import ml_collections
import numpy as np
import pytest

from vlm.data import conversation, embedded, example_ops, get_tokenizer, preprocess, scenes
from vlm.data.pipeline import check_config, get_default_config, load_split_numpy, make_source
from vlm.data.sources import TfdsSource

ALL = [(c, s) for c in scenes.COLOUR_NAMES for s in scenes.SHAPES]
CLIPS = dict(num_train=48, num_validation=8, num_test=24, image_size=32, num_frames=8, video_events=1)


def _centre(frame: np.ndarray, colour: str) -> tuple[float, float] | None:
  """Centroid (x, y) in pixels of the pixels within 40 levels of the colour; None when it is absent."""
  mask = np.abs(frame.astype(int) - np.asarray(scenes.COLOURS[colour])).max(-1) < 40
  if mask.sum() < 3:
    return None
  ys, xs = np.nonzero(mask)
  return float(xs.mean()), float(ys.mean())


@pytest.mark.parametrize("seed", range(6))
def test_the_frames_show_what_the_answers_say(seed):
  clip = scenes.sample_clip(np.random.default_rng(seed), ALL, 8)
  frames = scenes.render_clip(clip, 64)
  qs, ans = scenes.clip_questions(clip)
  assert len(qs) == len(ans) == len(scenes.CLIP_QUESTION_KINDS)
  names = {f"{o.colour} {o.shape}" for o in (clip.still, clip.mover, *clip.changes)}
  assert len(names) == 4 and len({o.colour for o in (clip.still, clip.mover, *clip.changes)}) == 4
  # The mover's centroid travels the answered direction; the still object stays put.
  mover = [_centre(f, clip.mover.colour) for f in frames]
  still = [_centre(f, clip.still.colour) for f in frames]
  dx, dy = np.subtract(mover[-1], mover[0])
  direction = {"left": (dx < -8), "right": (dx > 8), "up": (dy < -8), "down": (dy > 8)}
  assert direction[ans[0]] and sum(direction.values()) == 1, (ans[0], dx, dy)
  assert np.abs(np.subtract(still[-1], still[0])).max() < 0.5
  assert ans[1] == f"{clip.mover.colour} {clip.mover.shape}"
  # Each change object is absent before / present from its frame (appears) or the reverse.
  for i, obj in enumerate(clip.changes):
    seen = [_centre(f, obj.colour) is not None for f in frames]
    k = clip.frames[i]
    expect = [t >= k for t in range(8)] if clip.kinds[i] == 0 else [t < k for t in range(8)]
    assert seen == expect, (i, seen, k, clip.kinds[i])
  assert ans[2] == ("appear" if clip.kinds[0] == 0 else "disappear")
  first = clip.changes[int(np.argmin(clip.frames))]
  assert ans[3] == f"{first.colour} {first.shape}"
  subs = scenes.clip_subtitles(clip)
  assert subs[clip.frames[0]] == ans[4] == clip.words[0] and sum(bool(s) for s in subs) == 2
  assert ans[5] == clip.still.colour
  assert qs[0] == "which way does the moving object go?"  # the mover is not named where its name is an answer


def test_the_middle_frame_alone_does_not_tell_the_motion_or_the_change():
  """What the middle frame shows is independent of the multi-frame answers: the mover is at rest there
  (its place is the still object's distribution), and whether the first change object is there says
  nothing of appear / disappear, over many clips."""
  rng = np.random.default_rng(0)
  rows = []
  for _ in range(2000):
    clip = scenes.sample_clip(rng, ALL, 8)
    rows.append((clip.motion, clip.kinds[0], clip.visible(0, 4)))
    mover, still = clip.objects_at(4)[:2][::-1]
    assert (mover.cx, mover.cy) == (clip.mover.cx, clip.mover.cy) and still is clip.still
  rows = np.asarray(rows)
  # Whether the object is in the middle frame says nothing about appear vs disappear.
  for shown in (0, 1):
    kinds = rows[rows[:, 2] == shown, 1]
    assert 0.42 < kinds.mean() < 0.58, (shown, kinds.mean())
  assert np.allclose(np.bincount(rows[:, 0], minlength=4) / len(rows), 0.25, atol=0.03)


def test_clips_build_into_the_dataset_with_the_image_scenes_tokenizer(tmp_path):
  d = embedded.build(str(tmp_path), **CLIPS)
  image_scenes = embedded.build(str(tmp_path), **dict(CLIPS, num_frames=0, video_events=0))
  assert (d / "tokenizer.model").read_bytes() == (image_scenes / "tokenizer.model").read_bytes()
  src = TfdsSource(embedded.tfds_name(**CLIPS), "train", str(tmp_path))
  assert src.metadata["clip_question_kinds"] == list(scenes.CLIP_QUESTION_KINDS)
  ex = src[3]
  assert len(ex["frames"]) == 8 and len(ex["subtitles"]) == 8 and ex["image"] == ex["frames"][4]
  assert len(ex["questions"]) == 6 and bool(ex["seen"])
  assert all(bool(src[i]["seen"]) for i in range(len(src)))  # train clips hold only train combos
  test = TfdsSource(embedded.tfds_name(**CLIPS), "test", str(tmp_path))
  assert not all(bool(test[i]["seen"]) for i in range(len(test)))
  with pytest.raises(ValueError, match="video_events needs num_frames >= 3"):
    embedded.make_clip(embedded.BuildArgs(num_frames=2, video_events=1), "train", 0)


def _clip_config(data_dir, subtitles=True, pp="decode|sample_frames(4)|value_range(-1, 1)"):
  c = get_default_config()
  c.data_dir = str(data_dir)
  c.builder.update(CLIPS)
  c.pp_train = c.pp_eval = pp
  c.extra_text_keys = ("question", "answer")
  c.frames_as_images = True
  c.subtitles = subtitles
  c.conversation = ml_collections.ConfigDict(dict(tasks=("qa",), image_tokens=2, length=96, prompt_length=64))
  check_config(c)
  return c


def test_frames_reach_the_conversation_as_images_each_with_its_subtitle(tmp_path):
  c = _clip_config(tmp_path)
  source = make_source(c, "test")
  ops = example_ops.make_ops(c, c.pp_eval, tokenizer=get_tokenizer(c), source=source)
  assert "frames_as_images" in example_ops.op_names(ops)
  rec = source[0]
  out = example_ops.run_ops(ops, rec, 0, 0)
  assert out["image"].shape == (4, 32, 32, 3)
  tok = get_tokenizer(c)
  said = [s.decode() if isinstance(s, bytes) else s for s in rec["subtitles"]]
  owned = preprocess.regroup_subtitles(said, preprocess.frame_indices(8, 4))  # kept frames 0, 2, 5, 7
  prompt = out["prompt"][out["prompt_mask"] > 0].tolist()
  assert prompt.count(1000) == 8  # 4 frames x image_tokens placeholders
  for j, words in enumerate(owned):  # each word follows the placeholders of the kept frame nearest to it
    for w in words.split():
      ids = tok.encode(w, 16, False, False)
      ids = ids[ids != tok.pad_id].tolist()
      at = next(i for i in range(len(prompt)) if prompt[i : i + len(ids)] == ids and prompt[i - 1] != 0)
      assert prompt[:at].count(1000) == 2 * (j + 1), (w, j)
  assert sum(len(w.split()) for w in owned) == 2
  # The eval's arrays are the ops' outputs, batched.
  arrays, _ = load_split_numpy(c, "test", max_examples=2, chunk=2)
  np.testing.assert_array_equal(arrays["image"][0], out["image"])
  np.testing.assert_array_equal(arrays["prompt"][0], out["prompt"])
  # Without subtitles the frames alone; a clip-less record is a bad example, counted and skipped.
  quiet = example_ops.run_ops(
    example_ops.make_ops(_clip_config(tmp_path, False), c.pp_eval, tokenizer=tok, source=source), rec, 0, 0
  )
  assert (quiet["prompt"] == 1000).sum() == 8 and len(quiet["prompt"][quiet["prompt_mask"] > 0]) < len(prompt)
  from vlm.data.sources import BadExample

  with pytest.raises(BadExample, match="bad_clip"):
    example_ops.run_ops(ops, dict(rec, frames=[]), 0, 0)
  with pytest.raises(BadExample, match="bad_clip: 3 subtitles for 4 frames"):
    example_ops.run_ops(
      example_ops.make_ops(
        _clip_config(tmp_path, pp="decode|value_range(-1, 1)"), "decode", tokenizer=tok, source=source
      ),
      dict(rec, frames=rec["frames"][:4], subtitles=rec["subtitles"][:3]),
      0,
      0,
    )


def test_frames_as_images_refuses_interleaved_documents():
  c = get_default_config()
  c.frames_as_images = True
  c.interleaved_images = 2
  with pytest.raises(ValueError, match="data.frames_as_images: a clip's frames are its images"):
    example_ops.get_op("frames_as_images").check(c)


def test_a_video_placeholder_takes_the_whole_clip_and_the_batch_keeps_its_frames(tmp_path):
  """data.conversation.video_tokens (LLaVA-NeXT-Video's `<video>`): the user's turn opens with that many
  placeholders of the `<video>` id, no image placeholder, and data.with_frames gives the clip."""
  c = _clip_config(tmp_path, subtitles=False)
  c.frames_as_images = False
  c.with_frames = True
  c.conversation.specials = dict(conversation.DEFAULT_SPECIALS, **{"<video>": 1006})
  c.conversation.video_tokens = 16
  check_config(c)
  arrays, _ = load_split_numpy(c, "test", max_examples=3, chunk=3)
  assert arrays["frames"].shape == (3, 4, 32, 32, 3) and arrays["image"].shape == (3, 32, 32, 3)
  for key in ("prompt", "tokens"):
    assert ((arrays[key] == 1006).sum(1) == 16).all() and not (arrays[key] == 1000).any(), key
  assert not (arrays["loss_mask"][arrays["tokens"] == 1006]).any()
  chat = conversation.chat_tokenizer_from_config(c.conversation, get_tokenizer(c))
  with pytest.raises(ValueError, match="data.conversation.length=10 cuts a video's 16 placeholder tokens"):
    chat.pad(chat.encode_text("<video>x") * 2, None, 10, where="data.conversation.length")
  c.conversation.specials = dict(conversation.DEFAULT_SPECIALS)
  with pytest.raises(ValueError, match="data.conversation.video_tokens needs an id for '<video>'"):
    check_config(c)
