"""Rule-based filters (no model) and MetaCLIP-style concept balancing."""

from __future__ import annotations

import collections
import io
import re
import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

# Reasons in the order they are checked; an example is reported under its first failing rule.
REASONS = (
  "ok",
  "no_image",
  "bad_image",
  "image_too_small",
  "aspect_ratio",
  "too_few_words",
  "too_many_words",
  "char_repeat",
  "few_letters",
  "word_repeat",
  "url_or_markup",
)
_MARKUP = re.compile(r"(https?://|www\.|<[a-zA-Z/][^>]*>|&[a-z]+;|\S+@\S+\.\w+|\.(jpe?g|png|gif|webp)\b)", re.I)


def image_size(data: Any) -> tuple[int, int] | None:
  """(height, width) of encoded bytes (header only) or of an array; None if unreadable."""
  if isinstance(data, np.ndarray) and data.dtype != object:
    return int(data.shape[0]), int(data.shape[1])
  if isinstance(data, np.ndarray):
    data = data.item()
  if isinstance(data, str):  # a path (manifest sources)
    try:
      with Image.open(data) as im:
        return im.size[1], im.size[0]
    except Exception:  # noqa: BLE001
      return None
  if not data:
    return None
  try:
    with Image.open(io.BytesIO(data)) as im:
      return im.size[1], im.size[0]
  except Exception:  # noqa: BLE001  (PIL raises many types on bad data)
    return None


def caption_reason(
  caption: str,
  *,
  min_words: int = 2,
  max_words: int = 64,
  max_char_repeat: int = 5,
  min_letter_fraction: float = 0.5,
  max_word_share: float = 0.5,
) -> str:
  """The first junk rule `caption` fails, else 'ok'. Language-agnostic: words are whitespace
  separated runs, letters are any Unicode letter (so CJK, Cyrillic, ... pass the same rules)."""
  words = caption.split()
  if len(words) < min_words:
    return "too_few_words"
  if len(words) > max_words:
    return "too_many_words"
  if re.search(r"(.)\1{%d,}" % max_char_repeat, caption):
    return "char_repeat"
  chars = [ch for ch in caption if not ch.isspace()]
  letters = sum(unicodedata.category(ch).startswith("L") for ch in chars)
  if letters < min_letter_fraction * len(chars):
    return "few_letters"
  if len(words) >= 4 and collections.Counter(w.lower() for w in words).most_common(1)[0][1] > max_word_share * len(
    words
  ):
    return "word_repeat"
  if _MARKUP.search(caption):
    return "url_or_markup"
  return "ok"


def heuristic_reason(
  image: Any, caption: str, *, min_image_side: int = 16, max_aspect_ratio: float = 3.0, **caption_rules
) -> str:
  """The first rule an (encoded image, caption) pair fails, else 'ok' (one of REASONS)."""
  if image is None or (isinstance(image, (bytes, str)) and not image):
    return "no_image"
  hw = image_size(image)
  if hw is None:
    return "bad_image"
  if min(hw) < min_image_side:
    return "image_too_small"
  if max(hw) > max_aspect_ratio * min(hw):
    return "aspect_ratio"
  return caption_reason(caption, **caption_rules)


def find_concepts(captions: Sequence[str], concepts: Sequence[str]) -> list[list[int]]:
  """Indices of the concepts (words or phrases, matched on word boundaries, case-insensitive)
  that each caption mentions (MetaCLIP's sub-string matching, sec. 3.2)."""
  pattern = re.compile(
    r"\b(" + "|".join(re.escape(c.lower()) for c in sorted(concepts, key=len, reverse=True)) + r")\b"
  )
  index = {c.lower(): i for i, c in enumerate(concepts)}
  return [sorted({index[m] for m in pattern.findall(cap.lower())}) for cap in captions]


def balance(
  matches: Sequence[Sequence[int]], num_concepts: int, max_per_concept: int, seed: int = 0, keep_unmatched: bool = True
) -> tuple[np.ndarray, np.ndarray]:
  """MetaCLIP balancing (Xu et al. 2023, sec. 3.3 / Algorithm 1): an example is kept with
  probability max over its concepts c of min(1, t / count_c), t = max_per_concept; so a concept
  seen in fewer than t examples keeps them all, and a frequent one keeps about t in expectation.

  Returns (keep [N] bool, counts [num_concepts] before balancing). Deterministic for a seed.
  """
  counts = np.zeros(num_concepts, np.int64)
  for m in matches:
    counts[list(m)] += 1
  prob = np.minimum(1.0, max_per_concept / np.maximum(counts, 1))
  u = np.random.default_rng(seed).random(len(matches))
  keep = np.array([u[i] < max(prob[list(m)]) if len(m) else keep_unmatched for i, m in enumerate(matches)], bool)
  return keep, counts
