"""Image preprocessing ops, given in the config as a string or list of strings.

    "decode|resize(224)|flip_lr|value_range(-1,1)"
    ["decode", "random_resized_crop(64, scale=(0.8, 1))", "normalize('clip')"]

`parse_pp(spec, where)` checks names and arguments when the config is read and
raises ValueError naming the bad op, e.g.
    data.pp_train: unknown op 'flipp' at position 2; known ops: ...

An op works on one example dict: 'image' [H, W, 3] (uint8 until `value_range`
/ `normalize` turn it into float32), optional 'frames' [T, H, W, 3] (the same
geometric transform as the image), 'boxes' [K, 4] pixel [x0, y0, x1, y1], and
text fields. Images are decoded before the ops run, so `decode` is a no-op
accepted for readability. If no op makes floats, the pipeline outputs [0, 1].

Flipping and positions: `flip_lr` mirrors the image, frames and boxes and
swaps the words "left" and "right" in every text field, so "a red circle on
the left" stays true (rendered text in the image is mirrored, though: leave
`flip_lr` out of pipelines for text reading).

Ops: decode, resize, resize_small, center_crop, pad_to_square, random_crop, random_resized_crop,
flip_lr, rescale, value_range, normalize, random_aspect_pad, anyres, sample_frames (which frames of a
clip to keep: 'uniform', 'first' or 'random_stride'), and the augmentations of
vlm.data.augment (registered here when this module is imported):
    randaugment(num_ops=2, magnitude=9, ops=None, geometric=True, fill=128)   RandAugment, uint8;
        its geometric ops do not update 'boxes' (geometric=False for grounding)
    caption_dropout(p=0.1), word_dropout(p=0.1), synonyms(p=0.5, table='scenes'),
    template_caption(p=0.5, templates=None, class_names=None)   on ex['caption']
e.g. "decode|randaugment(2, 9)|resize(64)|synonyms(0.5)|value_range(-1, 1)". MixGen (image-text
mixup of pairs) is the example op `mixgen` (vlm.data.example_ops) of the key `data.mixgen`, off by
default.

Resizing: every resize op takes `method=` ('nearest', 'box', 'bilinear' (the default), 'hamming',
'bicubic', 'lanczos'), PIL's filter of that name applied to the uint8 image, as transformers' PIL
image processors do. Reference processors, reproduced pixel for pixel (REFERENCE_PP,
`reference_pp(name, size)`; measured in tests/test_preprocess_parity.py):

    CLIPImageProcessor      resize_small(224, method='bicubic')|center_crop(224)|rescale|normalize('clip')
    SiglipImageProcessor    resize(224, method='bicubic')|rescale|normalize('siglip')
    BlipImageProcessor      resize(224, method='bicubic')|rescale|normalize('clip')   (BLIP-2; also IDEFICS)
    LLaVA-1.5 (pad)         pad_to_square('clip')|resize_small(336, method='bicubic')|center_crop(336)|
                            rescale|normalize('clip')
    LLaVA-NeXT              anyres(...)|rescale|normalize('clip')   (CLIP processing of each 336 tile)
    ChameleonImageProcessor resize_small(512, method='lanczos')|center_crop(512)|rescale(0.0078)|
                            normalize(mean=1.0, std=1.0)

Against transformers' PIL-backend processors these give the same float32 values (difference 0 on
the test photos). `resize_small` truncates the longer side as transformers does (427 x 640 ->
224 x 335); `center_crop` zero-pads a side shorter than the crop. transformers 5's default
`AutoImageProcessor` is the torchvision ("fast") class when torchvision is installed: its resize
is not PIL's (measured: up to 2 levels of 1/255 apart, on under 1% of the values) and its centre
padding puts the odd pixel at the bottom / right instead of the top / left.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from vlm.data import anyres as ar  # LLaVA-NeXT views, matched to transformers

Example = dict[str, Any]
Op = Callable[[Example, np.random.Generator], Example]

STATS = {  # mean, std of images in [0, 1]
  # OpenAI CLIP (transformers OPENAI_CLIP_MEAN / _STD): CLIP, BLIP / BLIP-2, LLaVA, IDEFICS, Qwen-VL
  "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
  # 0.5 / 0.5, i.e. [-1, 1] (transformers IMAGENET_STANDARD_MEAN / _STD): SigLIP, Inception
  "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
  "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
  # torchvision's ImageNet statistics (transformers IMAGENET_DEFAULT_MEAN / _STD)
  "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# PIL filters for the `method=` of resize ops (PIL.Image.Resampling).
RESAMPLE = {
  "nearest": Image.Resampling.NEAREST,
  "box": Image.Resampling.BOX,
  "bilinear": Image.Resampling.BILINEAR,
  "hamming": Image.Resampling.HAMMING,
  "bicubic": Image.Resampling.BICUBIC,
  "lanczos": Image.Resampling.LANCZOS,
}
# pp strings (after "decode|") that reproduce transformers' reference image processors pixel for
# pixel (the PIL backend, the default without torchvision; tests/test_preprocess_parity.py).
REFERENCE_PP = {
  # CLIPImageProcessor(size={"shortest_edge": s}, crop_size=s): OpenAI CLIP, open_clip eval
  "clip": "resize_small({size}, method='bicubic')|center_crop({size})|rescale|normalize('clip')",
  # SiglipImageProcessor(size={"height": s, "width": s}): the aspect ratio is not kept
  "siglip": "resize({size}, method='bicubic')|rescale|normalize('siglip')",
  # BlipImageProcessor (BLIP-2's Blip2Processor at 224), IdeficsImageProcessor (224), Qwen-VL's transform (448)
  "blip": "resize({size}, method='bicubic')|rescale|normalize('clip')",
  # LLaVA-1.5 (image_aspect_ratio='pad'): expand2square with the CLIP mean, then CLIPImageProcessor at 336
  "llava": (
    "pad_to_square('clip')|resize_small({size}, method='bicubic')|center_crop({size})|rescale|normalize('clip')"
  ),
  # ChameleonImageProcessor: shortest side 512 lanczos, centre crop, x * 0.0078 - 1
  "chameleon": (
    "resize_small({size}, method='lanczos')|center_crop({size})|rescale(0.0078)|normalize(mean=1.0, std=1.0)"
  ),
}
REFERENCE_SIZE = {"clip": 224, "siglip": 224, "blip": 384, "llava": 336, "chameleon": 512}


def reference_pp(name: str, size: int | None = None) -> str:
  """The pp string (without "decode|") that reproduces a reference processor, e.g.
  reference_pp('clip', 336) == "resize_small(336, method='bicubic')|center_crop(336)|rescale|normalize('clip')"."""
  if name not in REFERENCE_PP:
    raise ValueError(f"unknown reference recipe {name!r}; known: {', '.join(REFERENCE_PP)}")
  return REFERENCE_PP[name].format(size=REFERENCE_SIZE[name] if size is None else size)


TEXT_FIELDS = ("caption", "caption_detailed", "questions", "answers")
_OPS: dict[str, Callable[..., Op]] = {}


def register(fn: Callable[..., Op]) -> Callable[..., Op]:
  """Registers an op factory: its arguments come from the pp string, it returns an Op."""
  _OPS[fn.__name__] = fn
  return fn


def known_ops() -> list[str]:
  return sorted(_OPS)


# ----------------------------------------------------------------- helpers


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(size, bool) or not (isinstance(size, int) or (isinstance(size, (tuple, list)) and len(size) == 2)):
    raise ValueError(f"size must be an int or (height, width), got {size!r}")
  h, w = (size, size) if isinstance(size, int) else size
  if not all(isinstance(v, int) and v > 0 for v in (h, w)):
    raise ValueError(f"size must be positive ints, got {size!r}")
  return h, w


def _range(value: Any, name: str, lo: float = 0.0) -> tuple[float, float]:
  if not (
    isinstance(value, (tuple, list))
    and len(value) == 2
    and all(isinstance(v, (int, float)) for v in value)
    and lo <= value[0] <= value[1]
  ):
    raise ValueError(f"{name} must be (min, max) with {lo} <= min <= max, got {value!r}")
  return float(value[0]), float(value[1])


def map_images(ex: Example, fn: Callable[[np.ndarray], np.ndarray]) -> Example:
  """Applies `fn` to the image and to every frame."""
  ex["image"] = fn(ex["image"])
  if "frames" in ex and len(ex["frames"]):
    ex["frames"] = np.stack([fn(f) for f in ex["frames"]])
  return ex


def _method(method: str) -> Image.Resampling:
  """The PIL filter named by a pp op's `method=` argument."""
  if method not in RESAMPLE:
    raise ValueError(f"method must be one of {', '.join(RESAMPLE)}, got {method!r}")
  return RESAMPLE[method]


def _uint8(img: np.ndarray) -> np.ndarray:
  if img.dtype != np.uint8:
    raise ValueError("geometric ops must come before rescale/value_range/normalize (they need uint8 pixels)")
  return img


def _crop_resize(
  ex: Example, box: tuple[float, float, float, float], out_hw: tuple[int, int], method: str = "bilinear"
) -> Example:
  """Crops pixel box (x0, y0, x1, y1) and resizes it to out_hw with PIL's `method` filter; boxes follow.

  uint8 RGB through `PIL.Image.resize`, as the reference (slow) processors of transformers do, so
  the same filter and output size give the same pixels (PIL rounds its output to uint8).
  """
  x0, y0, x1, y1 = box
  oh, ow = out_hw
  resample = _method(method)

  def fn(img: np.ndarray) -> np.ndarray:
    _uint8(img)
    if (x0, y0, x1, y1) == (0, 0, img.shape[1], img.shape[0]) and img.shape[:2] == (oh, ow):
      return img
    pil = Image.fromarray(img).resize((ow, oh), resample, box=(x0, y0, x1, y1))
    return np.asarray(pil)

  ex = map_images(ex, fn)
  if "boxes" in ex and len(ex["boxes"]):
    sx, sy = ow / (x1 - x0), oh / (y1 - y0)
    b = (np.asarray(ex["boxes"], np.float32) - [x0, y0, x0, y0]) * [sx, sy, sx, sy]
    ex["boxes"] = np.clip(b, 0, [ow, oh, ow, oh]).astype(np.float32)
  return ex


def _place(n_in: int, n_out: int) -> tuple[int, int, int]:
  """(source start, destination start, length) of a centred crop / zero-pad of n_in pixels to n_out.

  transformers' `image_transforms.center_crop`: crop start (n_in - n_out) // 2 (the odd pixel is cut
  at the bottom / right), pad start ceil((n_out - n_in) / 2) (the odd pixel of padding at the top /
  left); both are the shift ceil((n_out - n_in) / 2) = (n_out - n_in + 1) // 2.
  """
  shift = (n_out - n_in + 1) // 2
  src, dst = max(0, -shift), max(0, shift)
  return src, dst, min(n_in - src, n_out - dst)


def _shift_boxes(ex: Example, dx: int, dy: int, hw: tuple[int, int]) -> Example:
  if "boxes" in ex and len(ex["boxes"]):
    b = np.asarray(ex["boxes"], np.float32) + [dx, dy, dx, dy]
    ex["boxes"] = np.clip(b, 0, [hw[1], hw[0], hw[1], hw[0]]).astype(np.float32)
  return ex


def _fill(fill: Any) -> tuple[int, ...]:
  """A pad colour: an int, a tuple of ints per channel, or a STATS name (LLaVA: int(mean * 255))."""
  if isinstance(fill, str):
    if fill not in STATS:
      raise ValueError(f"fill must be an int, a tuple of ints or one of {sorted(STATS)}, got {fill!r}")
    return tuple(int(x * 255) for x in STATS[fill][0])
  vals = (fill,) if isinstance(fill, int) else fill
  if not (
    isinstance(vals, (tuple, list))
    and vals
    and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in vals)
  ):
    raise ValueError(f"fill must be an int in [0, 255], a tuple of them or one of {sorted(STATS)}, got {fill!r}")
  return tuple(vals)


def _rescale(img: np.ndarray, factor: float) -> np.ndarray:
  """transformers' `image_transforms.rescale`: float64 product, then float32."""
  return (img.astype(np.float64) * factor).astype(np.float32)


def _size(ex: Example) -> tuple[int, int]:
  return ex["image"].shape[0], ex["image"].shape[1]


# ----------------------------------------------------------------- ops


@register
def decode() -> Op:
  """No-op: images are decoded before the ops run."""
  return lambda ex, rng: ex


@register
def resize(size: int | Sequence[int], method: str = "bilinear") -> Op:
  """Resizes to size (int: square, the aspect ratio is not kept) with PIL's `method` filter.

  As transformers' processors with size {"height", "width"} (SigLIP, BLIP, IDEFICS: method='bicubic').
  """
  hw = _hw(size)
  _method(method)
  return lambda ex, rng: _crop_resize(ex, (0, 0, _size(ex)[1], _size(ex)[0]), hw, method)


def resize_small_hw(hw: Sequence[int], size: int, max_size: int | None = None) -> tuple[int, int]:
  """The (height, width) of resize_small: the shorter side becomes `size`, the longer one is truncated.

  transformers' `get_resize_output_image_size(size, default_to_square=False, max_size)`:
  long = int(size * long / short) (a 427 x 640 photo at 224 -> 224 x 335, not 336); a square stays
  square; max_size caps the longer side (short = int(max_size * size / long)).
  """
  h, w = hw
  short, long = (w, h) if w <= h else (h, w)
  new_short, new_long = size, int(size * long / short)
  if max_size is not None and new_long > max_size:
    new_short, new_long = int(max_size * new_short / new_long), max_size
  return (new_long, new_short) if w <= h else (new_short, new_long)


@register
def resize_small(size: int, method: str = "bilinear", max_size: int | None = None) -> Op:
  """Resizes so that the shorter side is `size`, keeping the aspect ratio (the longer side truncated).

  CLIPImageProcessor's {"shortest_edge": size} resize (resize_small_hw); max_size caps the longer side.
  """
  _hw(size)
  _method(method)
  if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, int) or max_size <= size):
    raise ValueError(f"max_size must be an int > size ({size}), got {max_size!r}")

  def op(ex, rng):
    h, w = _size(ex)
    nh, nw = resize_small_hw((h, w), size, max_size)
    return _crop_resize(ex, (0, 0, w, h), (max(1, nh), max(1, nw)), method)

  return op


@register
def center_crop(size: int | Sequence[int]) -> Op:
  """The central [size] window, no resize; a side shorter than the crop is zero-padded (centred).

  Exactly transformers' `image_transforms.center_crop` (CLIPImageProcessor's PIL backend): the crop
  starts at (H - h) // 2, (W - w) // 2, and padding puts its odd pixel at the top / left.
  """
  ch, cw = _hw(size)

  def op(ex, rng):
    h, w = _size(ex)
    if (h, w) == (ch, cw):
      return ex
    (sy, dy, ly), (sx, dx, lx) = _place(h, ch), _place(w, cw)

    def fn(img: np.ndarray) -> np.ndarray:
      out = np.zeros((ch, cw) + img.shape[2:], _uint8(img).dtype)
      out[dy : dy + ly, dx : dx + lx] = img[sy : sy + ly, sx : sx + lx]
      return out

    return _shift_boxes(map_images(ex, fn), dx - sx, dy - sy, (ch, cw))

  return op


@register
def pad_to_square(fill: int | Sequence[int] | str = 0) -> Op:
  """Pads the shorter side, centred, to a square of the longer side, with colour `fill`.

  LLaVA-1.5's `expand2square` (image_aspect_ratio='pad'; LlavaImageProcessor(do_pad=True)): the
  image at offset (long - short) // 2 (the odd row / column of padding at the bottom / right),
  fill = tuple(int(x * 255) for x in image_mean): pad_to_square('clip') is (122, 116, 104).
  """
  colour = _fill(fill)

  def op(ex, rng):
    h, w = _size(ex)
    if h == w:
      return ex
    n = max(h, w)
    top, left = (n - h) // 2, (n - w) // 2

    def fn(img: np.ndarray) -> np.ndarray:
      _uint8(img)
      if len(colour) not in (1, img.shape[-1]):
        raise ValueError(f"pad_to_square: fill {colour} does not match {img.shape[-1]} channels")
      out = np.empty((n, n) + img.shape[2:], img.dtype)
      out[...] = np.asarray(colour, img.dtype)
      out[top : top + h, left : left + w] = img
      return out

    return _shift_boxes(map_images(ex, fn), left, top, (n, n))

  return op


@register
def random_crop(size: int | Sequence[int], method: str = "bilinear") -> Op:
  """Crops a random [size] window (resizes up first, with `method`, if the image is smaller)."""
  ch, cw = _hw(size)
  _method(method)

  def op(ex, rng):
    h, w = _size(ex)
    y0, x0 = int(rng.integers(0, max(0, h - ch) + 1)), int(rng.integers(0, max(0, w - cw) + 1))
    return _crop_resize(ex, (x0, y0, x0 + min(cw, w), y0 + min(ch, h)), (ch, cw), method)

  return op


@register
def random_resized_crop(
  size: int | Sequence[int],
  scale: Sequence[float] = (0.08, 1.0),
  ratio: Sequence[float] = (3 / 4, 4 / 3),
  method: str = "bilinear",
) -> Op:
  """Inception-style crop: random area fraction `scale` and aspect `ratio`, resized to size with `method`.

  open_clip's and LAVIS's (BLIP-2) training crops use method='bicubic'.
  """
  hw = _hw(size)
  _method(method)
  smin, smax = _range(scale, "scale")
  if smax > 1:
    raise ValueError(f"scale must be within [0, 1], got {scale!r}")
  rmin, rmax = _range(ratio, "ratio", lo=1e-3)

  def op(ex, rng):
    h, w = _size(ex)
    for _ in range(10):
      area = h * w * rng.uniform(smin, smax)
      aspect = math.exp(rng.uniform(math.log(rmin), math.log(rmax)))
      cw, ch = math.sqrt(area * aspect), math.sqrt(area / aspect)
      if 0 < cw <= w and 0 < ch <= h:
        x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
        return _crop_resize(ex, (x0, y0, x0 + cw, y0 + ch), hw, method)
    return _crop_resize(ex, (0, 0, w, h), hw, method)

  return op


FRAME_SAMPLING = ("uniform", "first", "random_stride", "middle")


def frame_indices(
  num_clip: int, num_frames: int, mode: str = "uniform", rng: np.random.Generator | None = None, max_stride: int = 4
) -> np.ndarray:
  """Indices int [num_frames] of the frames to keep from a clip of num_clip frames, in time order.

  'uniform': evenly spaced over the whole clip, both ends included (np.linspace rounded; frames repeat
  when the clip is shorter), the fixed-count sampling of video LMs (Video-LLaMA, LLaVA-NeXT-Video).
  'first': the first num_frames (the last frame repeated when the clip is shorter).
  'random_stride': a stride drawn from 1..max_stride (at most what the clip allows) and a random start,
  num_frames at that stride (training-time temporal jitter; 'uniform' when the clip is too short).
  'middle': num_frames consecutive frames around the clip's middle, frame num_clip // 2 the
  (num_frames // 2)-th of them (num_frames=1: the middle frame, a manifest clip's `image`; the
  single-frame baseline of video QA).
  """
  if num_clip < 1:
    raise ValueError("sample_frames: the clip has no frames")
  if mode == "first":
    return np.minimum(np.arange(num_frames), num_clip - 1)
  if mode == "middle":
    return np.clip(num_clip // 2 - num_frames // 2 + np.arange(num_frames), 0, num_clip - 1)
  if mode == "random_stride" and num_clip >= num_frames:
    if rng is None:
      raise ValueError("sample_frames: mode 'random_stride' needs a random generator")
    longest = 1 if num_frames == 1 else (num_clip - 1) // (num_frames - 1)
    stride = int(rng.integers(1, max(1, min(max_stride, longest)) + 1))
    start = int(rng.integers(0, num_clip - (num_frames - 1) * stride))
    return start + stride * np.arange(num_frames)
  if mode not in FRAME_SAMPLING:
    raise ValueError(f"sample_frames: mode must be one of {', '.join(FRAME_SAMPLING)}, got {mode!r}")
  return np.round(np.linspace(0, num_clip - 1, num_frames)).astype(np.int64)


@register
def sample_frames(num_frames: int, mode: str = "uniform", max_stride: int = 4) -> Op:
  """Keeps num_frames of the clip's 'frames' [T, H, W, 3] (frame_indices' modes: 'uniform', 'first',
  'random_stride' with strides up to max_stride); an example without frames is unchanged. Put it first
  in the pp string (later ops then touch only the kept frames), e.g. pp_train
  "sample_frames(8, 'random_stride')|resize(224)|..." and pp_eval "sample_frames(8)|resize(224)|...".
  Order is kept, so the clip's 'motion' stays true. The clip's 'subtitles' (one str per frame) follow:
  each frame's subtitle goes to the nearest kept frame (the earlier on a tie), joined by spaces in
  time order, so no word said is lost and each stays next to the frame closest to when it was said."""
  if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
    raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
  if mode not in FRAME_SAMPLING:
    raise ValueError(f"mode must be one of {', '.join(FRAME_SAMPLING)}, got {mode!r}")
  if isinstance(max_stride, bool) or not isinstance(max_stride, int) or max_stride < 1:
    raise ValueError(f"max_stride must be a positive int, got {max_stride!r}")

  def op(ex, rng):
    if "frames" not in ex or not len(ex["frames"]):
      return ex
    frames = np.asarray(ex["frames"])
    keep = frame_indices(len(frames), num_frames, mode, rng, max_stride)
    ex["frames"] = frames[keep]
    if "subtitles" in ex:
      ex["subtitles"] = regroup_subtitles(ex["subtitles"], keep)
    return ex

  return op


def regroup_subtitles(subtitles: Sequence[str], keep: np.ndarray) -> list[str]:
  """Per-frame subtitles [T] -> one per kept frame [len(keep)]: frame t's text goes to the kept frame
  nearest to t (the earlier on a tie; a frame kept twice gets it at its first copy)."""
  if len(subtitles) == 0:
    return [""] * len(keep)
  keep = np.asarray(keep)
  owner = np.argmin(np.abs(np.arange(len(subtitles))[:, None] - keep[None, :]), axis=1)
  out: list[list[str]] = [[] for _ in keep]
  for t, text in enumerate(subtitles):
    if text:
      out[int(owner[t])].append(str(text))
  return [" ".join(words) for words in out]


_LR = re.compile(r"\b(left|right)\b")


def _swap_lr(text: Any) -> Any:
  if isinstance(text, str):
    return _LR.sub(lambda m: "right" if m.group(1) == "left" else "left", text)
  if isinstance(text, (list, tuple)):
    return [_swap_lr(t) for t in text]
  return text


@register
def flip_lr(p: float = 0.5) -> Op:
  """Mirrors left/right with probability p; boxes follow and 'left'/'right' swap in texts."""
  if not isinstance(p, (int, float)) or not 0 <= p <= 1:
    raise ValueError(f"p must be in [0, 1], got {p!r}")

  def op(ex, rng):
    if rng.random() >= p:
      return ex
    w = _size(ex)[1]
    ex = map_images(ex, lambda img: np.ascontiguousarray(img[:, ::-1]))
    if "boxes" in ex and len(ex["boxes"]):
      b = np.asarray(ex["boxes"], np.float32)
      ex["boxes"] = np.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], axis=1)
    for k in TEXT_FIELDS:
      if k in ex:
        ex[k] = _swap_lr(ex[k])
    if int(ex.get("motion", -1)) in (0, 1):  # scenes.MOTIONS: left, right, up, down
      ex["motion"] = np.int32(1 - int(ex["motion"]))
    return ex

  return op


def _to_unit(img: np.ndarray) -> np.ndarray:
  if img.dtype == np.uint8:
    return img.astype(np.float32) * (1 / 255)
  return img.astype(np.float32)


@register
def value_range(vmin: float, vmax: float) -> Op:
  """Maps uint8 [0, 255] (or floats in [0, 1]) linearly to float32 [vmin, vmax]."""
  if not all(isinstance(v, (int, float)) for v in (vmin, vmax)) or vmin >= vmax:
    raise ValueError(f"need vmin < vmax, got ({vmin!r}, {vmax!r})")
  return lambda ex, rng: map_images(ex, lambda img: _to_unit(img) * (vmax - vmin) + vmin)


@register
def rescale(factor: float = 1 / 255) -> Op:
  """uint8 pixels -> float32 pixels * factor (default 1/255: [0, 1]), as transformers' `rescale`.

  The product is taken in float64 and cast to float32, as the reference processors do. Chameleon's
  processor uses factor 0.0078 (then normalize(mean=1.0, std=1.0)).
  """
  if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
    raise ValueError(f"factor must be a positive number, got {factor!r}")

  def fn(img: np.ndarray) -> np.ndarray:
    if img.dtype != np.uint8:
      raise ValueError(f"rescale needs uint8 pixels, got {img.dtype} (rescaled twice?)")
    return _rescale(img, factor)

  return lambda ex, rng: map_images(ex, fn)


def _stat(v: Any, name: str) -> np.ndarray:
  vals = (v,) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
  if not (
    isinstance(vals, (tuple, list))
    and vals
    and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals)
  ):
    raise ValueError(f"{name} must be a number or a tuple of numbers, got {v!r}")
  return np.asarray(vals, np.float32)


@register
def normalize(
  stats: str | None = None, mean: float | Sequence[float] | None = None, std: float | Sequence[float] | None = None
) -> Op:
  """(x - mean) / std in float32, x in [0, 1]: named `stats` (STATS: 'clip', 'siglip' / 'inception',
  'imagenet'; default 'clip') or explicit mean=..., std=... (a number or one per channel).

  On uint8 pixels it first rescales by 1/255 (the `rescale` op), so "rescale|normalize('clip')" and
  "normalize('clip')" are the same; on floats (after `rescale`) it only normalises. Order and dtypes
  are the reference processors': rescale to float32, then normalise in float32 with float32 stats.
  """
  if mean is None and std is None:
    stats = "clip" if stats is None else stats
    if stats not in STATS:
      raise ValueError(f"stats must be one of {sorted(STATS)}, got {stats!r}")
    mean, std = STATS[stats]
  elif stats is not None or mean is None or std is None:
    raise ValueError("give either named stats or both mean= and std=")
  m, s = _stat(mean, "mean"), _stat(std, "std")
  if len(m) != len(s) or not np.all(s > 0):
    raise ValueError(f"mean and std need the same length and std > 0, got {mean!r}, {std!r}")

  def fn(img: np.ndarray) -> np.ndarray:
    x = _rescale(img, 1 / 255) if img.dtype == np.uint8 else img.astype(np.float32)
    if len(m) not in (1, x.shape[-1]):
      raise ValueError(f"normalize: {len(m)} mean values for {x.shape[-1]} channels")
    return (x - m) / s

  return lambda ex, rng: map_images(ex, fn)


@register
def random_aspect_pad(ratios: Sequence[float] = (0.5, 1.0, 2.0)) -> Op:
  """Pads the image (centred, replicating its border) to a width / height ratio drawn from `ratios`.

  Makes non-square images from square ones (the embedded scenes, whose background is uniform) to
  train and test aspect-ratio handling (`anyres`). Centred, so 'left' / 'right' of the centre stay
  true; boxes move with the image. A ratio the image already has leaves it unchanged.
  """
  if (
    isinstance(ratios, (str, bytes))
    or not isinstance(ratios, Sequence)
    or not ratios
    or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0 for r in ratios)
  ):
    raise ValueError(f"ratios must be a non-empty list of positive width/height ratios, got {ratios!r}")

  def op(ex, rng):
    r = float(ratios[int(rng.integers(len(ratios)))])
    h, w = _size(ex)
    th, tw = (h, max(w, round(h * r))) if r >= w / h else (max(h, round(w / r)), w)
    top, left = (th - h) // 2, (tw - w) // 2
    if (th, tw) == (h, w):
      return ex
    pad = ((top, th - h - top), (left, tw - w - left), (0, 0))
    ex = map_images(ex, lambda img: np.pad(img, pad, mode="edge"))
    if "boxes" in ex and len(ex["boxes"]):
      ex["boxes"] = (np.asarray(ex["boxes"], np.float32) + [left, top, left, top]).astype(np.float32)
    return ex

  return op


@register
def anyres(
  grid_pinpoints: Sequence[Sequence[int]], tile_size: int, patch_grid: int | Sequence[int], resample: str = "bicubic"
) -> Op:
  """LLaVA-NeXT AnyRes views (vlm.data.anyres): 'image' [H, W, 3] -> [1 + max_tiles, tile, tile, 3].

  The global view, then the tiles of the best-fitting grid of `grid_pinpoints` ((height, width)
  pixels, multiples of tile_size), then zero views up to the most tiles any pinpoint gives. Adds
  'image_layout' int32 [4] = (rows, cols, height, width): the tile grid and the image's size
  before this op (the model's unpadding needs both), and 'image_tokens': how many `<image>`
  placeholders the conversation writes (vlm.data.anyres.num_image_tokens with the encoder's
  `patch_grid` features per tile). Runs on uint8 pixels; only value_range / normalize may follow.
  """
  points = ar.check_pinpoints(grid_pinpoints, tile_size)
  ar.check_patch_grid(patch_grid)
  if resample not in ar.RESAMPLE:
    raise ValueError(f"resample must be one of {sorted(ar.RESAMPLE)}, got {resample!r}")

  def op(ex, rng):
    image = ex["image"]
    if image.dtype != np.uint8 or image.ndim != 3:
      raise ValueError(
        f"anyres needs one uint8 image [H, W, 3] (before value_range / normalize), got {image.dtype} {image.shape}"
      )
    if "frames" in ex and len(ex["frames"]):
      raise ValueError("anyres: examples with frames are not supported")
    views, _, (rows, cols) = ar.anyres_views(image, points, tile_size, resample)
    h, w = image.shape[:2]
    ex["image"] = views
    ex["image_layout"] = np.asarray([rows, cols, h, w], np.int32)
    ex["image_tokens"] = ar.num_image_tokens((h, w), points, tile_size, patch_grid)
    return ex

  return op


# Ops that may follow `anyres` (they act on pixel values, not geometry).
_AFTER_ANYRES = ("decode", "rescale", "value_range", "normalize")


# ----------------------------------------------------------------- parsing


def _parse_one(text: str) -> tuple[str, list, dict]:
  tree = ast.parse(text.strip(), mode="eval").body
  if isinstance(tree, ast.Name):
    return tree.id, [], {}
  if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name)):
    raise ValueError("expected name or name(args)")
  args = [ast.literal_eval(a) for a in tree.args]
  kwargs = {k.arg: ast.literal_eval(k.value) for k in tree.keywords}
  return tree.func.id, args, kwargs


def _split(spec: str | Sequence[str]) -> list[str]:
  if isinstance(spec, str):
    parts = spec.split("|")
  else:
    parts = [p for item in spec for p in str(item).split("|")]
  return [p.strip() for p in parts if p.strip()]


def parse_pp(spec: str | Sequence[str], where: str = "pp") -> list[Op]:
  """Parses and checks a pp spec; ValueError names the bad op (1-based position)."""
  ops, anyres_at = [], None
  for pos, text in enumerate(_split(spec), start=1):
    try:
      name, args, kwargs = _parse_one(text)
    except (SyntaxError, ValueError) as e:
      raise ValueError(f"{where}: cannot parse op {text!r} at position {pos}: {e}") from None
    if name not in _OPS:
      raise ValueError(f"{where}: unknown op {name!r} at position {pos}; known ops: {', '.join(known_ops())}")
    if anyres_at is not None and name not in _AFTER_ANYRES:
      raise ValueError(
        f"{where}: op {name!r} at position {pos} comes after 'anyres' (position {anyres_at}), "
        f"which turns the image into tiles; only {', '.join(_AFTER_ANYRES)} may follow it"
      )
    if name == "anyres":
      anyres_at = pos
    factory = _OPS[name]
    try:
      inspect.signature(factory).bind(*args, **kwargs)
      ops.append(factory(*args, **kwargs))
    except (TypeError, ValueError) as e:
      raise ValueError(
        f"{where}: bad argument for op {name!r} at position {pos} "
        f"({text!r}): {e}; signature {name}{inspect.signature(factory)}"
      ) from None
  return ops


def op_names(spec: str | Sequence[str]) -> list[str]:
  """The op names of a pp spec, in order (parse_pp checks them)."""
  return [_parse_one(text)[0] for text in _split(spec)]


def apply_ops(ops: Sequence[Op], ex: Example, rng: np.random.Generator) -> Example:
  for op in ops:
    ex = op(ex, rng)
  return ex


def eval_images(images: Sequence[np.ndarray], pp: str | Sequence[str]) -> np.ndarray:
  """uint8 images [H, W, 3] -> float32 [N, ...] through a pp string with a fixed rng (as pp_eval)."""
  ops = parse_pp(pp, where="pp_eval")
  rng = np.random.default_rng(0)
  return np.stack([apply_ops(ops, {"image": img}, rng)["image"] for img in images]).astype(np.float32)


# The augmentation ops register themselves in _OPS (imported last: vlm.data.augment imports this module).
importlib.import_module("vlm.data.augment")
