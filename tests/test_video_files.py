"""Clips from files (vlm.data.video.read_video) and in manifests: a video file (PyAV), a gif and a directory
of frames, written here; the errors name the file."""

import json

import numpy as np
import pytest
from PIL import Image

from vlm.data import sources
from vlm.data.video import VideoTooLong, read_video

T, H, W = 6, 32, 48


def _frames() -> np.ndarray:
  """T frames whose brightness rises with time and with a square that moves right."""
  frames = np.zeros((T, H, W, 3), np.uint8)
  for t in range(T):
    frames[t] = 20 + 30 * t
    frames[t, 8:24, 4 + 6 * t : 20 + 6 * t] = 255
  return frames


def _write_mp4(path, frames) -> None:
  import av

  with av.open(str(path), "w") as out:
    stream = out.add_stream("mpeg4", rate=8)
    stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
    stream.options = {"qscale": "1"}
    for f in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
  root = tmp_path_factory.mktemp("clips")
  frames = _frames()
  _write_mp4(root / "clip.mp4", frames)
  Image.fromarray(frames[0]).save(
    root / "clip.gif", save_all=True, append_images=[Image.fromarray(f) for f in frames[1:]]
  )
  (root / "frames").mkdir()
  for t, f in enumerate(frames):
    Image.fromarray(f).save(root / "frames" / f"{t:03d}.png")
  return root, frames


def test_every_kind_of_clip_reads_back_its_frames_in_order(clips):
  root, frames = clips
  np.testing.assert_array_equal(read_video(str(root / "frames")), frames)  # lossless
  mp4 = read_video(str(root / "clip.mp4"))
  assert mp4.shape == frames.shape and mp4.dtype == np.uint8
  # Lossy MPEG-4 at the best quantiser: within a few levels on average, and frame t is nearest to frame t.
  err = np.abs(mp4.astype(int) - frames.astype(int)).mean(axis=(1, 2, 3))
  assert err.max() < 6, err
  nearest = [int(np.argmin([np.abs(m.astype(int) - f.astype(int)).mean() for f in frames])) for m in mp4]
  assert nearest == list(range(T))
  gif = read_video(str(root / "clip.gif"))  # a palette image: close, not exact
  assert gif.shape == frames.shape and np.abs(gif.astype(int) - frames.astype(int)).mean() < 8


def test_unreadable_missing_and_too_long_clips_name_the_file(clips, tmp_path):
  root, _ = clips
  with pytest.raises(VideoTooLong, match=r"clip.mp4: more than 4 frames \(data.max_video_frames\)"):
    read_video(str(root / "clip.mp4"), max_frames=4)
  with pytest.raises(VideoTooLong, match="frames: more than 5 frames"):
    read_video(str(root / "frames"), max_frames=5)
  bad = tmp_path / "bad.mp4"
  bad.write_bytes(b"not a video at all" * 10)
  with pytest.raises(ValueError, match="bad.mp4: cannot decode the video"):
    read_video(str(bad))
  with pytest.raises(ValueError, match="nope.mp4: no such video file"):
    read_video(str(tmp_path / "nope.mp4"))


def test_a_manifest_of_clips_gives_frames_and_the_middle_frame_as_image(clips, tmp_path):
  root, frames = clips
  manifest = root / "clips.jsonl"
  rows = [
    {"video": "frames", "caption": "a square moves right", "label": 1},
    {"video": "clip.mp4", "caption": "the same clip as mp4"},
    {"video": "missing.mp4", "caption": "gone"},
  ]
  manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
  src = sources.ManifestSource(str(manifest))
  ex = sources.decode_record(src[0])
  np.testing.assert_array_equal(ex["frames"], frames)
  np.testing.assert_array_equal(ex["image"], frames[T // 2])
  assert ex["caption"] == "a square moves right" and int(ex["label"]) == 1
  assert sources.decode_record(src[1])["frames"].shape == frames.shape
  with pytest.raises(sources.BadExample, match="no such video") as e:
    sources.decode_record(src[2])
  assert e.value.reason == "missing_image"
  with pytest.raises(sources.BadExample) as e:
    sources.decode_record(src[0], max_frames=3)
  assert e.value.reason == "too_large"
  outside = tmp_path / "outside.jsonl"
  outside.write_text(json.dumps({"video": "../elsewhere.mp4", "caption": "x"}) + "\n")
  with pytest.raises(ValueError, match=r"outside.jsonl:1: image path '../elsewhere.mp4' is outside the image root"):
    sources.ManifestSource(str(outside))


def test_manifest_clips_through_the_pipeline_are_sampled_batched_frames(clips, tmp_path):
  """data.source 'jsonl:' with video rows, data.with_frames and pp_eval's sample_frames: the batch holds
  each clip's uniformly chosen frames (0, 2 or 3, 5 of 6), resized, as float frames [B, 3, 16, 16, 3]."""
  from vlm.data import embedded, get_default_config, load_split_numpy

  root, frames = clips
  manifest = root / "pipeline.jsonl"
  manifest.write_text("".join(json.dumps({"video": "frames", "caption": f"clip {i}"}) + "\n" for i in range(4)))
  c = get_default_config()
  c.source = f"jsonl:{manifest}"
  c.tokenizer = embedded.tokenizer_path(
    str(tmp_path / "tok"), num_train=40, num_validation=4, num_test=4, image_size=16
  )
  c.with_frames = True
  c.text_length = 8
  c.pp_train = c.pp_eval = "sample_frames(3)|resize(16)|value_range(0, 1)"
  arrays, _ = load_split_numpy(c, "test")
  assert arrays["frames"].shape == (4, 3, 16, 16, 3)
  expect = [np.asarray(Image.fromarray(frames[t]).resize((16, 16), Image.BILINEAR)) / 255 for t in (0, 2, 5)]
  assert np.abs(arrays["frames"][0] - np.stack(expect)).max() < 1e-6
