"""Boxes as text: Qwen-VL's `<ref>`/`<box>` markers in 0-1000 coordinates and Kosmos-2's patch-index
location tokens, grounding questions from the embedded scenes' boxes, and box IoU.

Qwen-VL (Bai et al. 2023, sec. 2.2): a box is normalised to [0, 1000) and written as
`<box>(x1,y1),(x2,y2)</box>` (top-left, bottom-right); the text it refers to is wrapped in
`<ref>...</ref>`. Kosmos-2 (Peng et al. 2023, sec. 2.1): the image is cut into P x P cells
(P = 32) and a box is `<object><patch_index_UL><patch_index_LR></object>` after its
`<phrase>...</phrase>`, UL / LR the cells of its top-left / bottom-right corners (4-digit indices);
`kosmos2_*` match transformers' Kosmos2Processor (tests/test_grounding.py checks it).

`grounding_pairs` turns an example's objects (pixel boxes [K, 4] of the preprocessed image,
class labels `box_labels`) into question/answer pairs for the pipeline's `data.grounding` option:
    refer     "where is the large red circle?"           -> "<box>(x1,y1),(x2,y2)</box>"
    region    "what colour is the object in <box>..</box>?" -> "red"   (and "what shape ...")
    grounded  "describe the image with boxes."           -> "<ref>a large red circle</ref><box>..</box>
               and <ref>a small blue star</ref><box>..</box>"
An object whose colour and shape another object shares (and size does not tell apart) is never
referred to, so every referring expression names exactly one box.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from vlm.data import scenes

Box = tuple[float, float, float, float]
GROUNDING_TASKS = ("refer", "region", "grounded")
_BOX = re.compile(r"<box>\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*,\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*</box>")


# ----------------------------------------------------------------- Qwen-VL text boxes


def to_1000(box: Sequence[float], width: float, height: float) -> tuple[int, int, int, int]:
  """Pixel box (x1, y1, x2, y2) -> integers in [0, 1000) (Qwen-VL's normalisation)."""
  x1, y1, x2, y2 = box
  scale = (1000 / width, 1000 / height, 1000 / width, 1000 / height)
  # (rounded to 1e-3 first: float32 and float64 copies of a box give the same integers)
  return tuple(int(min(999, max(0, math.floor(round(float(v) * s, 3))))) for v, s in zip((x1, y1, x2, y2), scale))


def box_text(box1000: Sequence[int]) -> str:
  x1, y1, x2, y2 = (int(v) for v in box1000)
  return f"<box>({x1},{y1}),({x2},{y2})</box>"


def ref_text(phrase: str, box1000: Sequence[int]) -> str:
  return f"<ref>{phrase}</ref>{box_text(box1000)}"


def parse_boxes(text: str) -> list[tuple[int, int, int, int]]:
  """Every well-formed `<box>(x1,y1),(x2,y2)</box>` in text, in order (0-1000 integers)."""
  return [tuple(int(g) for g in m.groups()) for m in _BOX.finditer(text)]


def iou(a: Sequence[float], b: Sequence[float]) -> float:
  """Intersection over union of two (x1, y1, x2, y2) boxes (0 for empty ones)."""
  ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = ix * iy
  area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])  # noqa: E731
  union = area(a) + area(b) - inter
  return inter / union if union > 0 else 0.0


# ----------------------------------------------------------------- Kosmos-2 location tokens


def kosmos2_patch_indices(box01: Box, num_patches_per_side: int = 32) -> tuple[int, int]:
  """Normalised (x1, y1, x2, y2) -> (upper-left, lower-right) cell indices (Kosmos-2)."""
  x1, y1, x2, y2 = box01
  if not (x2 > x1 and y2 > y1):
    raise ValueError(f"box {box01}: expected x2 > x1 and y2 > y1")
  p = num_patches_per_side
  ul = math.floor(y1 * p) * p + math.floor(x1 * p)
  lr = math.ceil(y2 * p - 1) * p + math.ceil(x2 * p - 1)
  return ul, lr


def kosmos2_box(ul: int, lr: int, num_patches_per_side: int = 32) -> Box:
  """Cell indices -> normalised box: cell centres, or whole cells when the two share a row or column."""
  p, cell = num_patches_per_side, 1.0 / num_patches_per_side
  (uy, ux), (ly, lx) = divmod(ul, p), divmod(lr, p)
  if ul == lr or ux == lx or uy == ly:
    return ux * cell, uy * cell, lx * cell + cell, ly * cell + cell
  half = cell / 2
  return ux * cell + half, uy * cell + half, lx * cell + half, ly * cell + half


def kosmos2_text(phrase: str, boxes01: Sequence[Box], num_patches_per_side: int = 32) -> str:
  """`<phrase>p</phrase><object> <patch_index_UL> <patch_index_LR> </object>` (several boxes joined
  by `</delimiter_of_multi_objects/>`), as Kosmos2Processor writes a phrase and its boxes."""
  locs = []
  for b in boxes01:
    ul, lr = kosmos2_patch_indices(b, num_patches_per_side)
    locs.append(f"<patch_index_{ul:04d}> <patch_index_{lr:04d}>")
  return f"<phrase>{phrase}</phrase><object> {' </delimiter_of_multi_objects/> '.join(locs)} </object>"


_K2 = re.compile(
  r"(?:<phrase>([^<]+)</phrase>)?\s*<object>((?:\s*<patch_index_\d+>\s*<patch_index_\d+>\s*"
  r"</delimiter_of_multi_objects/>)*\s*<patch_index_\d+>\s*<patch_index_\d+>\s*)</object>"
)


def kosmos2_entities(text: str, num_patches_per_side: int = 32) -> list[tuple[str | None, list[Box]]]:
  """(phrase or None, normalised boxes) for every `<object>` in Kosmos-2 text."""
  out = []
  for m in _K2.finditer(text):
    pairs = re.findall(r"<patch_index_(\d+)>\s*<patch_index_(\d+)>", m.group(2))
    phrase = m.group(1).strip() if m.group(1) else None
    out.append((phrase, [kosmos2_box(int(a), int(b), num_patches_per_side) for a, b in pairs]))
  return out


# ----------------------------------------------------------------- questions from the scenes' boxes


def object_phrases(ex: dict) -> list[str | None]:
  """A unique referring phrase per box ('large red circle'), None where two objects would share
  it. Size from the box: the scenes' large objects span over 0.45 of the width (radius >= 0.26),
  small ones under 0.4 (vlm.data.scenes.sample_scene)."""
  labels = [int(v) for v in np.asarray(ex.get("box_labels", []))]
  width = np.asarray(ex["image"]).shape[-2]
  boxes = np.asarray(ex.get("boxes", np.zeros((0, 4))), np.float64)
  phrases = []
  for label, box in zip(labels, boxes):
    colour, shape = scenes.colour_shape(label)
    size = "large" if (box[2] - box[0]) > 0.45 * width else "small"
    phrases.append(f"{size} {colour} {shape}")
  return [p if phrases.count(p) == 1 else None for p in phrases]


def check_tasks(tasks: Sequence[str]) -> None:
  """ValueError naming data.grounding.tasks unless it is a non-empty subset of GROUNDING_TASKS."""
  bad = [t for t in tasks if t not in GROUNDING_TASKS]
  if bad or not tasks:
    raise ValueError(f"data.grounding.tasks: {tuple(tasks)!r}; expected a non-empty subset of {GROUNDING_TASKS}")


def grounding_pairs(ex: dict, tasks: Sequence[str] = GROUNDING_TASKS) -> tuple[list[str], list[str]]:
  """Grounding question/answer pairs of an example with 'image' (preprocessed, [H, W, C]), 'boxes'
  (pixels of that image) and 'box_labels'; see the module docstring."""
  check_tasks(tasks)
  h, w = np.asarray(ex["image"]).shape[-3:-1]
  boxes = [to_1000(b, w, h) for b in np.asarray(ex.get("boxes", np.zeros((0, 4))), np.float64)]
  phrases = object_phrases(ex)
  labels = [int(v) for v in np.asarray(ex.get("box_labels", []))]
  qs, ans = [], []
  for k, (box, phrase) in enumerate(zip(boxes, phrases)):
    if phrase is None:
      continue
    colour, shape = scenes.colour_shape(labels[k])
    if "refer" in tasks:
      qs.append(f"where is the {phrase}?")
      ans.append(box_text(box))
    if "region" in tasks:
      qs += [f"what colour is the object in {box_text(box)}?", f"what shape is the object in {box_text(box)}?"]
      ans += [colour, shape]
  if "grounded" in tasks and any(p is not None for p in phrases):
    parts = [ref_text(f"a {p}", b) for p, b in zip(phrases, boxes) if p is not None]
    qs.append("describe the image with boxes.")
    ans.append(" and ".join(parts))
  return qs, ans
