"""Monkey's high-resolution image encoding (Li et al. 2024, "Monkey: Image Resolution and Text Label
Are Important Things for Large Multi-modal Models", sec. 3.1).

    image [B, H, W, 3] (H = W = 896)
      -> K windows of the encoder's native size w (448: 2 x 2, stride w, row-major) + the whole
         image resized to w (the global view)                       views [B, K + 1, w, w, 3]
      -> ONE shared (frozen) ViT over all B (K + 1) views as one batch; window k's view goes
         through the ViT with LoRA set k on its attention and MLP layers (ranks 16 and 32), the
         global view with none (lora_sets below: a per-example set index)
      -> the shared resampler (vlm.nn.resampler.QwenVLResampler, 256 queries) on every view
      -> [B, (K + 1) * Q, D]: window tokens in row order, then the global view's

It is a vision model for vlm.models.vision_lm.VisionLanguageModel (`vision_model='monkey'`,
`vision_method='view_features'`), whose LM reads those tokens at its `<image>` placeholders.
`windows=False` keeps only the global view (no LoRA): the same model at the encoder's native
resolution, the baseline of the paper's resolution ablation (sec. 4.4).

Parameters: img/... (the ViT; its LoRA sets `lora_sets_a` [K, in, r] / `lora_sets_b` [K, r, out]
sit beside the kernels of the targeted layers), resampler/... . Freeze the ViT but not its LoRA
sets with config.frozen = [r'vision/img/(?!.*lora_sets_).*'] (configs/monkey.py).
"""

import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm.models.vit import ViT
from vlm.nn.resampler import QwenVLResampler
from vlm.peft import LINEAR_TYPES, LORA_SET_PARAMS, lora_update

Dtype = Any

ATTN_TARGETS = r"attn/(query|key|value|out)"
MLP_TARGETS = r"mlp/(fc1|fc2)"


def lora_sets(targets: Sequence[tuple[str, int]], num_sets: int, set_index: jax.Array, alpha: float | None = None):
  """A context (`with lora_sets(...): y = module(x)`, inside a compact method) adding per-example
  LoRA sets (lora_update with num_sets) to the targeted linear layers that run inside it.

  targets: (regex, rank) pairs; a layer is targeted when a regex fullmatches a trailing part of its
  module path (r'attn/(query|key|value|out)' matches 'img/encoder/block_0/attn/query'); the
  first matching pair decides the rank. alpha: the LoRA scale numerator (alpha / rank; None: alpha = rank, scale 1).
  Parameters `lora_sets_a`, `lora_sets_b` [num_sets, ...] sit on the targeted layers (apart from
  config.peft's `lora_a` / `lora_b`, which may be added on top). A regex that matches no
  layer raises when the context exits.
  """
  compiled = [(re.compile(p), int(r)) for p, r in targets]
  hits = {p.pattern: 0 for p, _ in compiled}
  seen: list[str] = []

  def interceptor(next_fun, args, kwargs, context):
    m = context.module
    if context.method_name != "__call__" or not isinstance(m, LINEAR_TYPES):
      return next_fun(*args, **kwargs)
    path = "/".join(m.path)
    seen.append(path)
    match = next(
      ((r, rank) for r, rank in compiled if any(r.fullmatch("/".join(m.path[i:])) for i in range(len(m.path)))), None
    )
    out = next_fun(*args, **kwargs)
    if match is None:
      return out
    r, rank = match
    hits[r.pattern] += 1
    x = args[0] if args else next(iter(kwargs.values()))
    scale = (alpha if alpha is not None else rank) / rank
    return lora_update(m, out, x, rank=rank, scale=scale, names=LORA_SET_PARAMS, num_sets=num_sets, set_index=set_index)

  class _Ctx:
    def __enter__(self):
      self._cm = nn.intercept_methods(interceptor)
      self._cm.__enter__()

    def __exit__(self, exc_type, exc, tb):
      self._cm.__exit__(exc_type, exc, tb)
      if exc_type is None:
        missing = [p for p, n in hits.items() if n == 0]
        if missing:
          raise ValueError(f"LoRA set targets {missing} match no linear layer; layers are e.g. {seen[:6]}")
      return False

  return _Ctx()


def cut_windows(images: jax.Array, window: int) -> jax.Array:
  """images [B, H, W, C] -> non-overlapping windows [B, (H / w) * (W / w), w, w, C], row-major."""
  b, h, w, c = images.shape
  if h % window or w % window:
    raise ValueError(
      f"Monkey: the image size {h}x{w} is not a multiple of window_size={window}; resize the "
      f"input to a multiple of it (data.pp_train / pp_eval)"
    )
  rows, cols = h // window, w // window
  x = images.reshape(b, rows, window, cols, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, rows * cols, window, window, c)


def merge_windows(windows: jax.Array, rows: int, cols: int) -> jax.Array:
  """The inverse of cut_windows: [B, rows * cols, w, w, C] -> [B, rows * w, cols * w, C]."""
  b, k, w, _, c = windows.shape
  if k != rows * cols:
    raise ValueError(f"merge_windows: {k} windows for a {rows}x{cols} grid")
  x = windows.reshape(b, rows, cols, w, w, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, rows * w, cols * w, c)


class Monkey(nn.Module):
  """Windows + global view -> shared ViT with per-window LoRA -> shared resampler.

  Attributes:
    image: ViT kwargs (vlm.models.vit.ViT; its own input size is window_size).
    resampler: QwenVLResampler kwargs (num_queries, num_heads, width, out_dim).
    window_size: w, the encoder's native size (448); the input is a multiple of it (896: 2 x 2).
    lora_attn_rank, lora_mlp_rank: ranks of the per-window LoRA sets (sec. 3.1: 16 and 32).
    windows: False = the global view only (the resolution ablation's baseline).
  """

  image: dict
  resampler: dict
  window_size: int = 448
  lora_attn_rank: int = 16
  lora_mlp_rank: int = 32
  windows: bool = True
  dtype: Dtype = None

  def setup(self):
    self.img = ViT(**dict(self.image, pool_type="none"), dtype=self.dtype)
    self.resampler_module = QwenVLResampler(**self.resampler, dtype=self.dtype, name="resampler")

  def views(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, 3] -> [B, K + 1, w, w, 3]: the K windows (row-major), then the global view
    (the whole image resized to w with antialiasing); [B, 1, w, w, 3] with windows=False."""
    b, _, _, c = images.shape
    w = self.window_size
    glob = jax.image.resize(images, (b, w, w, c), method="linear", antialias=True)[:, None]
    if not self.windows:
      return glob
    return jnp.concatenate([cut_windows(images, w), glob.astype(images.dtype)], axis=1)

  def view_features(self, images: jax.Array, train: bool = False) -> jax.Array:
    """images [B, H, W, 3] -> resampled view tokens [B, (K + 1) * Q, D] (windows, then global)."""
    views = self.views(images)
    b, v = views.shape[:2]
    flat = views.reshape((b * v,) + views.shape[2:])
    k = v - 1 if self.windows else 0
    if k:
      # View j of every image uses LoRA set j; the global view (j = K) none. One batched ViT call.
      set_index = jnp.tile(jnp.append(jnp.arange(k), -1), b)
      targets = [(ATTN_TARGETS, self.lora_attn_rank), (MLP_TARGETS, self.lora_mlp_rank)]
      with lora_sets(targets, k, set_index):
        _, aux = self.img(flat, train=train)
    else:
      _, aux = self.img(flat, train=train)
    feats = aux["encoded"]
    if self.image.get("class_token"):
      feats = feats[:, 1:]
    out = self.resampler_module(feats)
    return out.reshape(b, v * out.shape[1], out.shape[2])
