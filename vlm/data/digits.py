"""scikit-learn's handwritten digits (shipped inside sklearn): a small real-scan check.

1797 grey 8x8 scans, upsampled (bicubic) to `image_size` RGB, captioned "a
handwritten digit seven". Deterministic splits: train 1297 / validation 200 /
test 300 of a fixed permutation.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
  "a handwritten digit {}.",
  "a scan of the digit {}.",
  "the number {}, handwritten.",
  "a photo of a handwritten {}.",
)
SPLIT_SIZES = {"train": 1297, "validation": 200, "test": 300}


@functools.lru_cache(maxsize=4)
def _load(image_size: int) -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits

  d = load_digits()
  grey = np.clip(d.images * (255 / 16), 0, 255).astype(np.uint8)  # [N, 8, 8]
  images = np.stack(
    [np.asarray(Image.fromarray(g).resize((image_size, image_size), Image.Resampling.BICUBIC)) for g in grey]
  )
  return np.repeat(images[..., None], 3, axis=-1), d.target.astype(np.int32)


class DigitsSource:
  """One split of the digits, records like the embedded dataset's."""

  def __init__(self, split: str, image_size: int = 64):
    if split not in SPLIT_SIZES:
      raise ValueError(f"digits: unknown split {split!r}; known: {list(SPLIT_SIZES)}")
    images, labels = _load(image_size)
    perm = np.random.default_rng(0).permutation(len(labels))
    start = 0
    for name, n in SPLIT_SIZES.items():
      if name == split:
        self.index = perm[start : start + n]
      start += n
    self.split, self.image_size = split, image_size
    self.metadata = {"class_names": list(WORDS), "templates": list(TEMPLATES)}

  def __len__(self) -> int:
    return len(self.index)

  def __getitem__(self, i: int) -> dict:
    images, labels = _load(self.image_size)
    j = int(self.index[i])
    word = WORDS[labels[j]]
    return {
      "image": images[j],
      "caption": f"a handwritten digit {word}",
      "caption_detailed": f"a low resolution grey scan of a handwritten digit {word}",
      "label": labels[j],
      "seen": True,
      "questions": ["what digit is this?"],
      "answers": [word],
    }

  def describe(self, i: int) -> str:
    return f"digits[{self.split}][{i}]"
