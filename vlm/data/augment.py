"""Augmentation pp ops: RandAugment for images, dropout / synonyms / templates for captions.

Registered in the pp op registry of `vlm.data.preprocess` (which imports this module), so
they are used in pp strings like any other op:

    "decode|randaugment(2, 9)|resize(64)|caption_dropout(0.1)|synonyms(0.5)|value_range(-1, 1)"

Image ops (uint8 images, before `value_range` / `normalize`):
    randaugment(num_ops=2, magnitude=9, ops=None, geometric=True, fill=128)
Text ops (on ex['caption'], the record's `data.caption_key` text that the pipeline tokenizes into
'text'; `key='caption_detailed'` edits the detailed caption instead):
    caption_dropout(p=0.1), word_dropout(p=0.1), synonyms(p=0.5, table='scenes'),
    template_caption(p=0.5, templates=None, class_names=None)
A text op with p=0 draws nothing, so adding it leaves every other op's draws as they were.

The image-text "mixup of pairs" (MixGen) is not a pp op (it needs a second example): it is the
example op `mixgen` of `vlm.data.example_ops`, turned on by the data config key `data.mixgen` (off
by default).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from vlm.data import scenes
from vlm.data.preprocess import Example, Op, map_images, register

# ----------------------------------------------------------------- RandAugment

MAX_MAGNITUDE = 10.0  # RandAugment sec. 3: every op on one integer scale 0..10, 10 = strongest.
# Strength at magnitude 10, as in the TF TPU / big_vision AutoAugment code that RandAugment uses
# (rotate 30 degrees, shear 0.3, translate 100 px of 224 ~ 0.45 of the size, enhance factor 1 +- 0.9)
# and timm's `rand-inc` ops (`_RAND_INCREASING_TRANSFORMS`): every op grows stronger with the
# magnitude and is the identity at 0 (the TF code's solarize / posterize / enhance get weaker with it).
MAX_ROTATE = 30.0  # degrees, random sign
MAX_SHEAR = 0.3  # random sign, about the top-left corner as in the references
MAX_TRANSLATE = 0.45  # fraction of the image width / height, random sign
MAX_ENHANCE = 0.9  # color / contrast / brightness / sharpness factor 1 +- 0.9 (random sign)
MAX_POSTERIZE = 4  # bits removed: 8 bits kept at magnitude 0, 4 at 10 (AutoAugment's range)
RA_OPS: tuple[str, ...] = (
  "identity",
  "autocontrast",
  "equalize",
  "rotate",
  "solarize",
  "color",
  "posterize",
  "contrast",
  "brightness",
  "sharpness",
  "shear_x",
  "shear_y",
  "translate_x",
  "translate_y",
)
GEOMETRIC_OPS: tuple[str, ...] = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
_ENHANCE = {
  "color": ImageEnhance.Color,
  "contrast": ImageEnhance.Contrast,
  "brightness": ImageEnhance.Brightness,
  "sharpness": ImageEnhance.Sharpness,
}


def _affine(img: np.ndarray, matrix: tuple[float, ...], fill: int) -> np.ndarray:
  """PIL affine warp (output pixel (x, y) reads input (a x + b y + c, d x + e y + f)), bilinear."""
  pil = Image.fromarray(img)
  out = pil.transform(
    pil.size, Image.Transform.AFFINE, matrix, Image.Resampling.BILINEAR, fillcolor=(fill,) * img.shape[-1]
  )
  return np.asarray(out)


def ra_image_fn(name: str, magnitude: float, sign: float, fill: int = 128) -> Callable[[np.ndarray], np.ndarray]:
  """The image function of RandAugment op `name` at `magnitude` (0..10), `sign` +-1 for the
  signed ops; uint8 [H, W, 3] -> uint8 [H, W, 3]. The identity at magnitude 0 for every op
  except autocontrast and equalize (which have no magnitude)."""
  level = magnitude / MAX_MAGNITUDE
  if name == "autocontrast":
    return lambda img: np.asarray(ImageOps.autocontrast(Image.fromarray(img)))
  if name == "equalize":
    return lambda img: np.asarray(ImageOps.equalize(Image.fromarray(img)))
  if name == "solarize":  # invert pixels >= threshold: 256 (none) at magnitude 0, 0 (all) at 10
    threshold = 256 - int(level * 256)
    return lambda img: np.where(img >= threshold, 255 - img, img).astype(np.uint8)
  if name == "posterize":
    bits = 8 - int(level * MAX_POSTERIZE)
    mask = np.uint8((0xFF << (8 - bits)) & 0xFF)
    return lambda img: img & mask
  if name in _ENHANCE:
    factor = 1.0 + sign * level * MAX_ENHANCE
    if factor == 1.0:
      return lambda img: img
    return lambda img: np.asarray(_ENHANCE[name](Image.fromarray(img)).enhance(factor))
  if name in GEOMETRIC_OPS and level == 0:
    return lambda img: img
  if name == "rotate":  # counter-clockwise about the centre
    angle = sign * level * MAX_ROTATE
    return lambda img: np.asarray(
      Image.fromarray(img).rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=(fill,) * img.shape[-1])
    )
  if name == "shear_x":
    s = sign * level * MAX_SHEAR
    return lambda img: _affine(img, (1, s, 0, 0, 1, 0), fill)
  if name == "shear_y":
    s = sign * level * MAX_SHEAR
    return lambda img: _affine(img, (1, 0, 0, s, 1, 0), fill)
  if name == "translate_x":
    t = sign * level * MAX_TRANSLATE
    return lambda img: _affine(img, (1, 0, t * img.shape[1], 0, 1, 0), fill)
  if name == "translate_y":
    t = sign * level * MAX_TRANSLATE
    return lambda img: _affine(img, (1, 0, 0, 0, 1, t * img.shape[0]), fill)
  if name == "identity":
    return lambda img: img
  raise ValueError(f"unknown RandAugment op {name!r}; known: {', '.join(RA_OPS)}")


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_p(p: Any, op: str) -> float:
  if not _is_number(p) or not 0 <= p <= 1:
    raise ValueError(f"{op}: p must be a probability in [0, 1], got {p!r}")
  return float(p)


@register
def randaugment(
  num_ops: int = 2, magnitude: float = 9, ops: Sequence[str] | None = None, geometric: bool = True, fill: int = 128
) -> Op:
  """RandAugment (Cubuk et al. 2020, "RandAugment: Practical automated data augmentation with a
  reduced search space", sec. 3): each call draws `num_ops` ops uniformly (with replacement)
  from the 14 ops of the paper (RA_OPS, or the subset `ops`) and applies each at the shared
  `magnitude` on the 0..10 scale (10 = strongest, as in the paper, big_vision and timm; the
  strengths at 10 are MAX_* above). Signed ops (rotate, shear, translate, the enhance ops) draw
  their sign per call. The image and every frame get the same ops with the same parameters.

  Works on uint8 images (after decode, before value_range / normalize), with PIL; magnitude 0 is
  the identity for every op but autocontrast and equalize. Geometric ops fill with grey `fill`.

  Boxes: the geometric ops (rotate, shear_x/y, translate_x/y) move the objects but do NOT
  update 'boxes', and they can falsify position words in captions ("on the left"). For
  grounding or position-sensitive text use `geometric=False` (photometric ops only).
  """
  if isinstance(num_ops, bool) or not isinstance(num_ops, int) or num_ops < 0:
    raise ValueError(f"randaugment: num_ops must be an int >= 0, got {num_ops!r}")
  if not _is_number(magnitude) or not 0 <= magnitude <= MAX_MAGNITUDE:
    raise ValueError(
      f"randaugment: magnitude must be in [0, {MAX_MAGNITUDE:g}] (RandAugment's scale, "
      f"10 = strongest), got {magnitude!r}"
    )
  if not isinstance(geometric, bool):
    raise ValueError(f"randaugment: geometric must be True or False, got {geometric!r}")
  if isinstance(fill, bool) or not isinstance(fill, int) or not 0 <= fill <= 255:
    raise ValueError(f"randaugment: fill must be an int in [0, 255], got {fill!r}")
  if ops is None:
    names = list(RA_OPS)
  elif isinstance(ops, str) or not isinstance(ops, Sequence) or not ops:
    raise ValueError(f"randaugment: ops must be a non-empty list of op names from {RA_OPS}, got {ops!r}")
  else:
    names = list(ops)
    bad = [n for n in names if n not in RA_OPS]
    if bad:
      raise ValueError(f"randaugment: unknown ops {bad}; known: {', '.join(RA_OPS)}")
  if not geometric:
    names = [n for n in names if n not in GEOMETRIC_OPS]
    if not names:
      raise ValueError("randaugment: geometric=False leaves no ops of `ops`")
  mag = float(magnitude)

  def op(ex: Example, rng: np.random.Generator) -> Example:
    if ex["image"].dtype != np.uint8:
      raise ValueError("randaugment works on uint8 images: put it before value_range / normalize")
    for k in rng.integers(len(names), size=num_ops):
      sign = 1.0 if rng.random() < 0.5 else -1.0
      ex = map_images(ex, ra_image_fn(names[int(k)], mag, sign, fill))
    return ex

  return op


# ----------------------------------------------------------------- text ops

_TEXT_KEYS = ("caption", "caption_detailed")
_WORD = re.compile(r"[A-Za-z]+")

# Synonyms of the embedded scenes' caption words (vlm.data.scenes) that keep a caption true. Shape
# and most colour words have none that would stay unambiguous; "box" is left out (a rendered word).
SCENES_SYNONYMS: dict[str, list[str]] = {
  "large": ["big"],
  "small": ["little", "tiny"],
  "photo": ["picture", "photograph", "image"],
  "picture": ["photo", "image"],
  "drawing": ["sketch", "illustration"],
  "rendering": ["render", "illustration"],
  "plain": ["uniform", "simple"],
  "background": ["backdrop"],
  "grey": ["gray"],
  "center": ["centre", "middle"],
  "circle": ["disc", "disk"],
  "cross": ["plus sign"],
  "diamond": ["rhombus"],
  "purple": ["violet"],
  "cyan": ["aqua"],
  "says": ["reads"],
  "moves": ["goes", "travels"],
}
SYNONYM_TABLES: dict[str, dict[str, list[str]]] = {"scenes": SCENES_SYNONYMS}


def _check_key(key: Any, op: str) -> str:
  if key not in _TEXT_KEYS:
    raise ValueError(f"{op}: key must be one of {_TEXT_KEYS}, got {key!r}")
  return key


def _check_table(table: Any, where: str) -> dict[str, list[str]]:
  if not isinstance(table, Mapping) or not all(
    isinstance(w, str) and w and isinstance(s, (list, tuple)) and s and all(isinstance(x, str) and x for x in s)
    for w, s in table.items()
  ):
    raise ValueError(
      f'synonyms: table {where} must map words to non-empty lists of synonyms, {{"word": ["synonym", ...]}}'
    )
  return {w.lower(): list(s) for w, s in table.items()}


def load_synonyms(table: str | Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
  """A synonym table: a built-in name (SYNONYM_TABLES: 'scenes'), a dict, or a JSON file path."""
  if isinstance(table, Mapping):
    return _check_table(table, "(dict)")
  if not isinstance(table, str):
    raise ValueError(f"synonyms: table must be a name ({', '.join(SYNONYM_TABLES)}) or a JSON file path, got {table!r}")
  if table in SYNONYM_TABLES:
    return _check_table(SYNONYM_TABLES[table], repr(table))
  if not os.path.isfile(table):
    raise ValueError(
      f"synonyms: unknown table {table!r}: not a built-in table ({', '.join(SYNONYM_TABLES)}) "
      "nor a JSON file {word: [synonyms]}"
    )
  try:
    with open(table, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"synonyms: cannot read table {table!r}: {e}") from None
  return _check_table(data, repr(table))


@register
def caption_dropout(p: float = 0.1, key: str = "caption") -> Op:
  """With probability p the caption becomes the empty string (the text condition dropped, as for
  classifier-free guidance, Ho & Salimans 2022; or robustness to missing text). The pipeline then
  tokenizes "" (just EOS / BOS if configured)."""
  p, key = _check_p(p, "caption_dropout"), _check_key(key, "caption_dropout")

  def op(ex: Example, rng: np.random.Generator) -> Example:
    if p > 0 and key in ex and rng.random() < p:
      ex[key] = ""
    return ex

  return op


@register
def word_dropout(p: float = 0.1, key: str = "caption") -> Op:
  """Drops each word of the caption independently with probability p, never all of them (one
  random word is kept if every draw dropped; p=1 keeps exactly one word). Words are split on
  whitespace, so punctuation goes with its word."""
  p, key = _check_p(p, "word_dropout"), _check_key(key, "word_dropout")

  def op(ex: Example, rng: np.random.Generator) -> Example:
    if p == 0 or not ex.get(key):
      return ex
    words = ex[key].split()
    keep = rng.random(len(words)) >= p
    if not keep.any():
      keep[int(rng.integers(len(words)))] = True
    ex[key] = " ".join(w for w, k in zip(words, keep) if k)
    return ex

  return op


@register
def synonyms(p: float = 0.5, table: str | Mapping[str, Sequence[str]] = "scenes", key: str = "caption") -> Op:
  """Replaces each caption word found in `table` (case-insensitively; a capital first letter is
  kept) with probability p by one of its synonyms, drawn uniformly. `table`: 'scenes' (the
  built-in SCENES_SYNONYMS for the embedded scenes' words), a dict, or a path to a JSON file
  {word: [synonyms]} (read when the pp string is parsed). Synonyms may be several words.

  The embedded dataset's SentencePiece tokenizer was trained on its fixed captions: synonyms
  outside that corpus (e.g. "rhombus") tokenize into several pieces, which is fine but longer.
  """
  p, key = _check_p(p, "synonyms"), _check_key(key, "synonyms")
  words = load_synonyms(table)

  def replace(m: re.Match, rng: np.random.Generator) -> str:
    word = m.group(0)
    choices = words.get(word.lower())
    if not choices or rng.random() >= p:
      return word
    new = choices[int(rng.integers(len(choices)))]
    return new[:1].upper() + new[1:] if word[:1].isupper() else new

  def op(ex: Example, rng: np.random.Generator) -> Example:
    if p > 0 and ex.get(key):
      ex[key] = _WORD.sub(lambda m: replace(m, rng), ex[key])
    return ex

  return op


@register
def template_caption(
  p: float = 0.5, templates: Sequence[str] | None = None, class_names: Sequence[str] | None = None, key: str = "caption"
) -> Op:
  """With probability p the caption becomes a random prompt template filled with the class name
  of the example's label, e.g. "a photo of a red circle." (CLIP-style prompts, Radford et al.
  2021 sec. 3.1.4: puts the zero-shot prompts in the training distribution). Examples without a
  label (label < 0) are left unchanged.

  Ops do not see the source metadata, so `templates` (each with one '{}') and `class_names`
  (indexed by label) default to the embedded scenes' (vlm.data.scenes.TEMPLATES and
  scenes.class_names(), as in its metadata); pass both for another source, whose labels would
  otherwise name the wrong classes. A label beyond class_names raises ValueError.
  """
  p, key = _check_p(p, "template_caption"), _check_key(key, "template_caption")
  templates = scenes.TEMPLATES if templates is None else templates
  if (
    isinstance(templates, str)
    or not isinstance(templates, Sequence)
    or not templates
    or not all(isinstance(t, str) and t.count("{}") == 1 for t in templates)
  ):
    raise ValueError(
      f"template_caption: templates must be a non-empty list of strings with one '{{}}' each, got {templates!r}"
    )
  templates = list(templates)
  names = scenes.class_names() if class_names is None else class_names
  if (
    isinstance(names, str) or not isinstance(names, Sequence) or not names or not all(isinstance(n, str) for n in names)
  ):
    raise ValueError(f"template_caption: class_names must be a non-empty list of strings, got {class_names!r}")
  names = list(names)

  def op(ex: Example, rng: np.random.Generator) -> Example:
    label = int(ex.get("label", -1))
    if p == 0 or label < 0 or key not in ex:
      return ex
    if label >= len(names):
      raise ValueError(
        f"template_caption: label {label} has no class name ({len(names)} class_names); "
        "pass class_names=[...] for this source"
      )
    if rng.random() < p:
      ex[key] = templates[int(rng.integers(len(templates)))].format(names[label])
    return ex

  return op
