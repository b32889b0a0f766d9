"""Reading video clips into frames: uint8 [T, H, W, 3], in time order.

`read_video(path)` takes
- a video file (mp4, webm, mkv, avi, mov, ...), decoded with PyAV (`av`, FFmpeg's decoders; every frame of
  the first video stream, converted to RGB);
- an animated image (gif, or an animated png / webp), decoded with PIL frame by frame;
- a directory of frame images (jpg, jpeg, png, webp), read in sorted file-name order.

Which frames a model then sees is the pp op `sample_frames` (vlm.data.preprocess). A clip longer than
`max_frames` is an error (a data source counts it as BadExample 'too_large' and skips it), so one long
file cannot fill the host's memory: raise data.max_video_frames for long clips.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageSequence

FRAME_EXTS = ("jpg", "jpeg", "png", "webp")
ANIMATED_EXTS = ("gif",)
MAX_VIDEO_FRAMES = 1024  # data.max_video_frames' default: 1024 frames of 224 x 224 RGB are 154 MB


class VideoTooLong(ValueError):
  """A clip with more frames than the reader's max_frames."""


def _too_long(path: str, max_frames: int) -> VideoTooLong:
  return VideoTooLong(f"{path}: more than {max_frames} frames (data.max_video_frames); raise it for long clips")


def _rgb(img: Image.Image) -> np.ndarray:
  return np.asarray(img.convert("RGB"), np.uint8)


def _stack(path: str, frames: list[np.ndarray]) -> np.ndarray:
  if not frames:
    raise ValueError(f"{path}: no frames")
  shapes = {f.shape for f in frames}
  if len(shapes) > 1:
    raise ValueError(f"{path}: frames of different sizes {sorted(shapes)}")
  return np.stack(frames)


def _read_dir(path: str, max_frames: int) -> np.ndarray:
  names = sorted(n for n in os.listdir(path) if n.lower().rsplit(".", 1)[-1] in FRAME_EXTS)
  if len(names) > max_frames:
    raise _too_long(path, max_frames)
  frames = []
  for name in names:
    try:
      with Image.open(os.path.join(path, name)) as img:
        frames.append(_rgb(img))
    except OSError as e:
      raise ValueError(f"{os.path.join(path, name)}: cannot read the frame: {e}") from None
  return _stack(path, frames)


def _read_animated(path: str, max_frames: int) -> np.ndarray:
  frames = []
  with Image.open(path) as img:
    for frame in ImageSequence.Iterator(img):
      if len(frames) == max_frames:
        raise _too_long(path, max_frames)
      frames.append(_rgb(frame))
  return _stack(path, frames)


def _read_container(path: str, max_frames: int) -> np.ndarray:
  try:
    import av
  except ImportError:  # pragma: no cover (a dependency of vlm)
    raise ValueError(f"{path}: reading video files needs PyAV (pip install av)") from None
  frames = []
  try:
    with av.open(path) as container:
      if not container.streams.video:
        raise ValueError(f"{path}: no video stream")
      for frame in container.decode(video=0):
        if len(frames) == max_frames:
          raise _too_long(path, max_frames)
        frames.append(frame.to_ndarray(format="rgb24"))
  except av.FFmpegError as e:
    raise ValueError(f"{path}: cannot decode the video: {e}") from None
  return _stack(path, frames)


def read_video(path: str, max_frames: int = MAX_VIDEO_FRAMES) -> np.ndarray:
  """Every frame of the clip at `path` (module docstring), uint8 [T, H, W, 3]; ValueError naming the
  path for what cannot be read (VideoTooLong beyond max_frames)."""
  if os.path.isdir(path):
    return _read_dir(path, max_frames)
  if not os.path.exists(path):
    raise ValueError(f"{path}: no such video file or frame directory")
  if path.lower().rsplit(".", 1)[-1] in ANIMATED_EXTS:
    return _read_animated(path, max_frames)
  try:  # an animated png / webp is read by PIL; anything PIL cannot open goes to FFmpeg
    with Image.open(path) as img:
      if getattr(img, "n_frames", 1) > 1:
        return _read_animated(path, max_frames)
  except OSError:
    pass
  return _read_container(path, max_frames)
