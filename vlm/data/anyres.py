"""LLaVA-NeXT "AnyRes" image views and token counts (Liu et al. 2024, LLaVA-NeXT / LLaVA-1.6).

An image of any size is shown to a fixed-resolution encoder (tile x tile pixels) as

    views[0]     the whole image squashed to tile x tile (the global view, FIRST as in HF)
    views[1:]    the image resized (aspect kept) into the best grid resolution of `grid_pinpoints`,
                 zero-padded centred, cut into rows x cols tiles in row-major order

`anyres_views` pads the tiles with zero views up to the most tiles any pinpoint gives, so every
example has the same shape [1 + max_tiles, tile, tile, C] (static shapes for jit); the model ignores
the padding views. The language model then sees (vlm.nn.anyres.pack_anyres_features)

    global view tokens (h*w) ;  the tiles' feature grid [rows*h, cols*w] with the padding rows or
    columns cut away ("unpad") and an `image_newline` embedding after each remaining row

`num_image_tokens` is that length: the number of `<image>` placeholders the data must emit.

Everything here matches transformers' implementation (the parity oracle, tests/test_anyres.py):
`select_best_resolution` (transformers/image_processing_utils.py), the resize size
(`get_patch_output_size`) and padding (`LlavaNextImageProcessor._get_padding_size`), the tile order
(`image_transforms.divide_to_patches`), the global view (`_get_image_patches`), and the unpadding
(`modeling_llava_next.unpad_image`, `LlavaNextProcessor._get_number_of_features`).
Run it on uint8 images before `value_range` / `normalize`: HF pads raw pixels with 0 (black).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

# LLaVA-NeXT's default pinpoints for a 336-pixel CLIP tile (HF LlavaNextImageProcessor), (height, width).
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
RESAMPLE = {
  "bicubic": Image.Resampling.BICUBIC,
  "bilinear": Image.Resampling.BILINEAR,
  "nearest": Image.Resampling.NEAREST,
}


# ----------------------------------------------------------------- argument checks


def _pos_int(v: object) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0


def _check_hw(hw: Sequence[int], name: str) -> tuple[int, int]:
  if not (isinstance(hw, (tuple, list, np.ndarray)) and len(hw) == 2 and all(_pos_int(v) for v in hw)):
    raise ValueError(f"{name} must be (height, width) of positive ints, got {hw!r}")
  return int(hw[0]), int(hw[1])


def check_pinpoints(grid_pinpoints: Sequence[Sequence[int]], tile_size: int | None = None) -> list[tuple[int, int]]:
  if isinstance(grid_pinpoints, (str, bytes)) or not isinstance(grid_pinpoints, Sequence) or not grid_pinpoints:
    raise ValueError(f"grid_pinpoints must be a non-empty list of (height, width), got {grid_pinpoints!r}")
  points = [_check_hw(p, "grid_pinpoints entry") for p in grid_pinpoints]
  if tile_size is not None:
    if not _pos_int(tile_size):
      raise ValueError(f"tile_size must be a positive int, got {tile_size!r}")
    bad = [p for p in points if p[0] % tile_size or p[1] % tile_size]
    if bad:
      raise ValueError(f"grid_pinpoints {bad} are not multiples of tile_size {tile_size}")
  return points


def check_patch_grid(patch_grid: int | Sequence[int]) -> tuple[int, int]:
  if _pos_int(patch_grid):
    return int(patch_grid), int(patch_grid)
  return _check_hw(patch_grid, "patch_grid")


# ----------------------------------------------------------------- grid choice


def select_best_resolution(image_hw: Sequence[int], grid_pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
  """The pinpoint (height, width) that keeps the most of the image's pixels, ties to the least padding.

  Same arithmetic (floats, int truncation, first-wins order) as HF's select_best_resolution: an
  image is downscaled to fit each candidate; the effective resolution is the fitted area capped
  at the original area (upscaling adds no information), the waste the rest of the candidate.
  """
  original_height, original_width = _check_hw(image_hw, "image_hw")
  best_fit = None
  max_effective, min_wasted = 0, float("inf")
  for height, width in check_pinpoints(grid_pinpoints):
    scale = min(width / original_width, height / original_height)
    down_w, down_h = int(original_width * scale), int(original_height * scale)
    effective = min(down_w * down_h, original_width * original_height)
    wasted = width * height - effective
    if effective > max_effective or (effective == max_effective and wasted < min_wasted):
      max_effective, min_wasted, best_fit = effective, wasted, (height, width)
  return best_fit


def anyres_grid_shape(
  image_hw: Sequence[int], grid_pinpoints: Sequence[Sequence[int]], tile_size: int
) -> tuple[int, int]:
  """(rows, cols) of tiles for an image of image_hw (HF get_anyres_image_grid_shape, (H, W) order)."""
  check_pinpoints(grid_pinpoints, tile_size)
  h, w = select_best_resolution(image_hw, grid_pinpoints)
  return h // tile_size, w // tile_size


def max_tiles(grid_pinpoints: Sequence[Sequence[int]], tile_size: int) -> int:
  """The most tiles any pinpoint gives: views per image = 1 + max_tiles (static shape)."""
  return max((h // tile_size) * (w // tile_size) for h, w in check_pinpoints(grid_pinpoints, tile_size))


# ----------------------------------------------------------------- pixels


def fit_size(image_hw: Sequence[int], target_hw: Sequence[int]) -> tuple[int, int]:
  """Size (h, w) of image_hw resized into target_hw with its aspect ratio kept (HF get_patch_output_size)."""
  oh, ow = _check_hw(image_hw, "image_hw")
  th, tw = _check_hw(target_hw, "target_hw")
  scale_w, scale_h = tw / ow, th / oh
  if scale_w < scale_h:
    return min(math.ceil(oh * scale_w), th), tw
  return th, min(math.ceil(ow * scale_h), tw)


def _resize(image: np.ndarray, hw: tuple[int, int], resample: str) -> np.ndarray:
  """image [H, W, C] -> [h, w, C] with PIL (uint8 as RGB/L like HF's PIL backend, floats per channel)."""
  if resample not in RESAMPLE:
    raise ValueError(f"resample must be one of {sorted(RESAMPLE)}, got {resample!r}")
  h, w = hw
  if image.shape[:2] == (h, w):
    return image.copy()
  mode = RESAMPLE[resample]
  if image.dtype == np.uint8 and image.shape[2] in (1, 3):
    pil = Image.fromarray(image if image.shape[2] == 3 else image[..., 0])
    out = np.asarray(pil.resize((w, h), mode))
    return out.reshape(h, w, image.shape[2])
  chans = [
    np.asarray(Image.fromarray(image[..., c].astype(np.float32), mode="F").resize((w, h), mode))
    for c in range(image.shape[2])
  ]
  return np.stack(chans, axis=-1).astype(image.dtype)


def _check_image(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim != 3 or min(image.shape) < 1:
    raise ValueError(f"image must be [H, W, C] with nonzero sizes, got shape {image.shape}")
  return image


def resize_and_pad(
  image: np.ndarray, target_hw: Sequence[int], resample: str = "bicubic", fill: float = 0
) -> np.ndarray:
  """image [H, W, C] -> [th, tw, C]: resized with its aspect kept (fit_size), padded centred with `fill`.

  An odd padding puts the extra pixel at the bottom / right (HF _get_padding_size).
  """
  image = _check_image(image)
  th, tw = _check_hw(target_hw, "target_hw")
  nh, nw = fit_size(image.shape[:2], (th, tw))
  resized = _resize(image, (nh, nw), resample)
  top, left = (th - nh) // 2, (tw - nw) // 2
  out = np.full((th, tw, image.shape[2]), fill, dtype=image.dtype)
  out[top : top + nh, left : left + nw] = resized
  return out


def divide_into_tiles(image: np.ndarray, tile_size: int) -> np.ndarray:
  """image [rows*tile, cols*tile, C] -> tiles [rows*cols, tile, tile, C], row-major (HF divide_to_patches)."""
  image = _check_image(image)
  if not _pos_int(tile_size):
    raise ValueError(f"tile_size must be a positive int, got {tile_size!r}")
  h, w, c = image.shape
  if h % tile_size or w % tile_size:
    raise ValueError(f"image of size {h}x{w} is not a whole number of tiles of tile_size {tile_size}")
  rows, cols = h // tile_size, w // tile_size
  tiles = image.reshape(rows, tile_size, cols, tile_size, c).transpose(0, 2, 1, 3, 4)
  return tiles.reshape(rows * cols, tile_size, tile_size, c)


def anyres_views(
  image: np.ndarray, grid_pinpoints: Sequence[Sequence[int]], tile_size: int, resample: str = "bicubic"
) -> tuple[np.ndarray, int, tuple[int, int]]:
  """image [H, W, C] -> (views [1 + max_tiles, tile, tile, C], num_tiles, (rows, cols)).

  views[0] is the whole image resized (squashed) to tile x tile, views[1:1 + num_tiles] the tiles of
  the resized-and-padded image in row-major order, the rest zeros (padding to max_tiles over the
  pinpoints so shapes are static). The model also needs the original size image.shape[:2].
  """
  image = _check_image(image)
  check_pinpoints(grid_pinpoints, tile_size)
  best = select_best_resolution(image.shape[:2], grid_pinpoints)
  tiles = divide_into_tiles(resize_and_pad(image, best, resample), tile_size)
  views = np.zeros((1 + max_tiles(grid_pinpoints, tile_size), tile_size, tile_size, image.shape[2]), image.dtype)
  views[0] = _resize(image, (tile_size, tile_size), resample)
  views[1 : 1 + len(tiles)] = tiles
  return views, len(tiles), (best[0] // tile_size, best[1] // tile_size)


# ----------------------------------------------------------------- token counts


def unpadded_shape(image_hw: Sequence[int], grid_hw: Sequence[int]) -> tuple[tuple[int, int], tuple[int, int]]:
  """The part of a [gh, gw] feature grid that holds the image (not padding): ((top, left), (height, width)).

  HF unpad_image: the side along which the image fills the grid is kept whole; on the other,
  (grid - round-down(image size scaled to the grid)) // 2 is cut from each end, so an odd
  remainder keeps one row / column more than the scaled image size.
  """
  oh, ow = _check_hw(image_hw, "image_hw")
  gh, gw = _check_hw(grid_hw, "grid_hw")
  if ow / oh > gw / gh:
    new_h = int(round(oh * (gw / ow), 7))
    pad = (gh - new_h) // 2
    return (pad, 0), (gh - 2 * pad, gw)
  new_w = int(round(ow * (gh / oh), 7))
  pad = (gw - new_w) // 2
  return (0, pad), (gh, gw - 2 * pad)


def num_image_tokens(
  image_hw: Sequence[int], grid_pinpoints: Sequence[Sequence[int]], tile_size: int, patch_grid: int | Sequence[int]
) -> int:
  """LM image tokens LLaVA-NeXT gives an image of image_hw: global view h*w + unpadded tiles + one
  newline per remaining row. patch_grid: the encoder's feature grid per tile, h or (h, w) (24 for
  CLIP-L/14 at 336, class token dropped)."""
  ph, pw = check_patch_grid(patch_grid)
  rows, cols = anyres_grid_shape(image_hw, grid_pinpoints, tile_size)
  _, (uh, uw) = unpadded_shape(image_hw, (rows * ph, cols * pw))
  return ph * pw + uh * (uw + 1)


def max_image_tokens(grid_pinpoints: Sequence[Sequence[int]], tile_size: int, patch_grid: int | Sequence[int]) -> int:
  """An upper bound of num_image_tokens over all image sizes (the static length of the packed
  tokens): h*w + max over pinpoints of rows*h * (cols*w + 1), reached by an image of a pinpoint's
  exact shape (2928 for LLaVA-NeXT's defaults with 24x24 features)."""
  ph, pw = check_patch_grid(patch_grid)
  points = check_pinpoints(grid_pinpoints, tile_size)
  return ph * pw + max((h // tile_size) * ph * ((w // tile_size) * pw + 1) for h, w in points)
