"""Early fusion (Chameleon Team 2024, "Chameleon: Mixed-Modal Early-Fusion Foundation Models").

Images become discrete tokens: the codes of a VQ image tokenizer (vlm.models.vq), shifted by
`image_token_offset`, share one vocabulary with the text and sit between begin- and end-of-image
markers. One decoder (DecoderLM, with Chameleon's qk-norm and z-loss options) models the whole
mixed-modal sequence left to right, so the same weights read images (captioning: text after the
image) and write them (generation: image tokens after the text, rendered by the tokenizer's
decoder).

Sequences built from an (image, caption) pair, each row in one of two orders:

  image first: [BOS, BOI, c_1 ... c_N, EOI, caption ..., EOS, PAD ...]
  text first:  [BOS, caption ..., BOI, c_1 ... c_N, EOI, EOS, PAD ...]

with N = (H / patch) * (W / patch) codes per image (K for a 1-D tokenizer: VQTokenizer's
latent_tokens). The tokenizer is trained separately (configs/vq_tokenizer.py) and frozen here:
its codes are stop-gradient'ed and configs freeze its parameters.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm.models import generation
from vlm.models.decoder import DecoderLM
from vlm.models.vq import VQTokenizer

_NEG = -1e9  # logit of a token a generation step may not emit


def concat_ragged(segments: list[tuple[jax.Array, jax.Array]], length: int) -> tuple[jax.Array, jax.Array]:
  """Concatenates per-row segments without gaps: [(ids [B, L_s] int, n [B] int), ...] -> (tokens
  [B, length] (the first n[b] ids of each segment in turn, then 0), mask [B, length] bool)."""
  b = segments[0][0].shape[0]
  out = jnp.zeros((b, length), jnp.int32)
  start = jnp.zeros((b,), jnp.int32)
  pos = jnp.arange(length)[None, :]
  for ids, n in segments:
    rel = pos - start[:, None]
    inside = (rel >= 0) & (rel < n[:, None])
    gathered = jnp.take_along_axis(ids.astype(jnp.int32), jnp.clip(rel, 0, ids.shape[1] - 1), axis=1)
    out = jnp.where(inside, gathered, out)
    start = start + n.astype(jnp.int32)
  return out, pos < start[:, None]


class EarlyFusionLM(nn.Module):
  """VQ tokenizer ('tokenizer') + one decoder ('lm') over a shared text + image-code vocabulary.

  lm: DecoderLM kwargs; its vocab_size must hold image_token_offset + the tokenizer's codebook.
  tokenizer: VQTokenizer kwargs. boi_id / eoi_id: the begin- / end-of-image markers; bos_id,
  eos_id, pad_id: the text tokenizer's.

  __call__(images [B,H,W,3], text [B,L], image_first [B] bool | None, train) -> (logits [B,T,V],
  tokens [B,T], mask [B,T]) with T = L + N + 3: the mixed-modal rows (module docstring) and the
  model's next-token logits on them. `text` is a tokenised caption; its pad / BOS / EOS are dropped.
  """

  lm: dict
  tokenizer: dict
  image_token_offset: int
  boi_id: int
  eoi_id: int
  bos_id: int = 3
  eos_id: int = 1
  pad_id: int = 0
  dtype: Any = None  # compute dtype of the decoder and the tokenizer (their own `dtype` keys win)

  def setup(self):
    codebook = self.codebook_size
    if self.lm["vocab_size"] < self.image_token_offset + codebook:
      raise ValueError(
        f"model.lm.vocab_size={self.lm['vocab_size']} cannot hold the image codes: "
        f"model.image_token_offset={self.image_token_offset} + codebook_size={codebook}"
      )
    for key in ("boi_id", "eoi_id"):
      if self.image_token_offset <= getattr(self, key) < self.image_token_offset + codebook:
        raise ValueError(
          f"model.{key}={getattr(self, key)} falls inside the image-code range "
          f"[{self.image_token_offset}, {self.image_token_offset + codebook})"
        )
    self.lm_model = DecoderLM(**{"dtype": self.dtype, **self.lm}, name="lm")
    self.vq = VQTokenizer(**{"dtype": self.dtype, **self.tokenizer}, name="tokenizer")

  @property
  def codebook_size(self) -> int:
    return self.tokenizer.get("codebook_size", VQTokenizer.codebook_size)

  def code_grid(self, image_hw: tuple[int, int]) -> tuple[int, int]:
    """The tokenizer's code grid for images of size image_hw: (H / p, W / p), or (1, K) for a 1-D
    (latent-token) tokenizer; usable on an unbound module."""
    return VQTokenizer(**self.tokenizer, parent=None).code_grid(image_hw)

  # ------------------------------------------------------------------------ images <-> tokens

  def image_tokens(self, images: jax.Array) -> jax.Array:
    """Images [B, H, W, 3] -> image token ids [B, N] (row-major codes + image_token_offset)."""
    codes = jax.lax.stop_gradient(self.vq.encode(images))
    return codes.reshape(codes.shape[0], -1) + self.image_token_offset

  def decode_image(self, ids: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Image token ids [B, gh * gw] -> pixels [B, gh * patch, gw * patch, 3] by the tokenizer's decoder."""
    codes = jnp.clip(ids - self.image_token_offset, 0, self.codebook_size - 1)
    return self.vq.decode(codes.reshape(ids.shape[0], *grid))

  def reconstruct(self, images: jax.Array) -> jax.Array:
    """Images [B, H, W, 3] -> what their image tokens render to, [B, H, W, 3] (the tokens' ceiling)."""
    return self.vq.decode(self.vq.encode(images))

  def is_image_token(self, ids: jax.Array) -> jax.Array:
    """Whether ids are image codes (usable on an unbound module)."""
    return (ids >= self.image_token_offset) & (ids < self.image_token_offset + self.codebook_size)

  def _image_block(self, images: jax.Array) -> jax.Array:
    codes = self.image_tokens(images)
    b = codes.shape[0]
    return jnp.concatenate(
      [jnp.full((b, 1), self.boi_id, jnp.int32), codes, jnp.full((b, 1), self.eoi_id, jnp.int32)], axis=1
    )

  def caption_tokens(self, text: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The caption's content tokens moved to the front of each row, and their count."""
    keep = (text != self.pad_id) & (text != self.bos_id) & (text != self.eos_id)
    order = jnp.argsort(~keep, axis=1, stable=True)
    return jnp.take_along_axis(text, order, axis=1), keep.sum(axis=1)

  def sequences(
    self, images: jax.Array, text: jax.Array, image_first: jax.Array | None = None
  ) -> tuple[jax.Array, jax.Array]:
    """Mixed-modal rows (module docstring) -> (tokens [B, L + N + 3], mask [B, L + N + 3])."""
    b = images.shape[0]
    if image_first is None:
      image_first = jnp.ones((b,), bool)
    img = self._image_block(images)
    cap, n_cap = self.caption_tokens(text)
    one = jnp.ones((b,), jnp.int32)
    zero = jnp.zeros((b,), jnp.int32)
    n_img = jnp.full((b,), img.shape[1], jnp.int32)
    bos = jnp.full((b, 1), self.bos_id, jnp.int32)
    eos = jnp.full((b, 1), self.eos_id, jnp.int32)
    first = image_first.astype(bool)
    length = text.shape[1] + img.shape[1] + 1
    # image first: BOS, image, caption, EOS. text first: BOS, caption, image, EOS.
    return concat_ragged(
      [
        (bos, one),
        (img, jnp.where(first, n_img, zero)),
        (cap, n_cap),
        (img, jnp.where(first, zero, n_img)),
        (eos, one),
      ],
      length,
    )

  # ------------------------------------------------------------------------ forward and decoding

  def __call__(
    self, images: jax.Array, text: jax.Array, image_first: jax.Array | None = None, train: bool = False
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    if self.is_initializing():
      self.vq(images)  # creates the tokenizer's decoder too (encoding alone does not touch it)
    tokens, mask = self.sequences(images, text, image_first)
    return self.lm_model(tokens, train=train, mask=mask), tokens, mask

  def caption_prompt(self, images: jax.Array) -> jax.Array:
    """The prompt of text-from-image generation: [BOS, BOI, codes, EOI], [B, N + 3]."""
    bos = jnp.full((images.shape[0], 1), self.bos_id, jnp.int32)
    return jnp.concatenate([bos, self._image_block(images)], axis=1)

  def decode_step(
    self, tokens: jax.Array, index: jax.Array | int, cache_len: int | None = None, mask: jax.Array | None = None
  ) -> jax.Array:
    """Cached text decoding (DecoderLM.decode_step) with image codes and markers masked out."""
    logits = self.lm_model.decode_step(tokens, index, cache_len, mask)
    vocab = jnp.arange(logits.shape[-1])
    banned = self.is_image_token(vocab) | (vocab == self.boi_id) | (vocab == self.eoi_id)
    return jnp.where(banned, _NEG, logits)

  def decode_image_step(
    self, tokens: jax.Array, index: jax.Array | int, cache_len: int | None = None, mask: jax.Array | None = None
  ) -> jax.Array:
    """Cached image decoding: logits of everything but the image codes masked out."""
    logits = self.lm_model.decode_step(tokens, index, cache_len, mask)
    return jnp.where(self.is_image_token(jnp.arange(logits.shape[-1])), logits, _NEG)


def generate_images(
  model: EarlyFusionLM,
  params: Any,
  text: jax.Array,
  grid: tuple[int, int],
  *,
  method: str = "greedy",
  rng: jax.Array | None = None,
  guidance: float = 1.0,
  **decode_kw,
) -> tuple[jax.Array, jax.Array]:
  """Text-to-image: prompts [BOS, caption, BOI] from tokenised captions text [B, L] (left-padded
  inside the cache), then gh * gw image tokens -> (ids [B, gh * gw], pixels [B, H, W, 3]).

  guidance > 1: classifier-free guidance (Ho & Salimans 2022; CM3Leon's decoding) with logits
  l_u + guidance * (l_c - l_u), where l_u continues the caption-free prompt [BOS, BOI] (the
  image-first rows of training teach that distribution); 'greedy' and 'sample' only.
  """
  from vlm import decoding

  cap, n = model.apply({"params": params}, text, method=model.caption_tokens)
  b, length = cap.shape
  # Left-pad: the caption ends right before BOI in every row.
  shift = length - n
  idx = jnp.arange(length)[None, :] - shift[:, None]
  body = jnp.where(idx >= 0, jnp.take_along_axis(cap, jnp.clip(idx, 0, length - 1), axis=1), model.pad_id)
  bos = jnp.full((b, 1), model.bos_id, jnp.int32)
  boi = jnp.full((b, 1), model.boi_id, jnp.int32)
  ones = jnp.ones((b, 1), bool)
  prompt = jnp.concatenate([bos, body.astype(jnp.int32), boi], axis=1)
  mask = jnp.concatenate([ones, idx >= 0, ones], axis=1)
  count = grid[0] * grid[1]
  cache_len = prompt.shape[1] + count

  def run(cache, tokens, index):
    logits, new = model.apply(
      {"params": params, "cache": cache}, tokens, index, method=model.decode_image_step, mutable=["cache"]
    )
    return logits, new["cache"]

  if guidance == 1.0:
    _, variables = model.apply(
      {"params": params}, prompt, 0, cache_len, mask, method=model.decode_image_step, mutable=["cache"]
    )
    cache, step_fn = variables["cache"], run
  else:
    if method not in ("greedy", "sample"):
      raise ValueError(f"classifier-free guidance decodes with 'greedy' or 'sample', not {method!r}")
    uncond = jnp.concatenate([bos, jnp.full_like(body, model.pad_id, dtype=jnp.int32), boi], axis=1)
    umask = jnp.concatenate([ones, jnp.zeros_like(mask[:, 1:-1]), ones], axis=1)
    _, variables = model.apply(
      {"params": params},
      jnp.concatenate([prompt, uncond]),
      0,
      cache_len,
      jnp.concatenate([mask, umask]),
      method=model.decode_image_step,
      mutable=["cache"],
    )
    cache, step_fn = decoding.guided_step_fn(
      run, variables["cache"], b, guidance, second=lambda t: uncond if t.shape[1] == prompt.shape[1] else t
    )  # the prefill feeds [BOS, BOI]

  out = decoding.generate(
    step_fn, cache, prompt, method=method, rng=rng, max_new_tokens=count, eos_id=-1, pad_id=model.pad_id, **decode_kw
  )
  pixels = model.apply({"params": params}, out.tokens, grid, method=model.decode_image)
  return out.tokens, pixels


def predict_fns(model: EarlyFusionLM) -> dict[str, Any]:
  """caption(params, images, *, eos_id, pad_id, max_len, method='greedy', rng=None, **decode_kw) ->
  DecodeOutput: the image is part of the prompt [BOS, BOI, codes, EOI] (caption_prompt; the model's
  own bos_id, a bos_id argument is ignored), then up to max_len - 1 text tokens.
  generate_images(params, text [B, L], image_hw, **kw) -> (ids, pixels [B, H, W, 3]): text-to-image
  (generate_images) for images of size image_hw. reconstruct(params, images) -> what the images' own
  tokens render to (the ceiling of generated images)."""

  def caption(params, images, *, eos_id: int, pad_id: int, max_len: int, bos_id: int | None = None, **kw):
    del bos_id
    prompt = model.apply({"params": params}, images, method=EarlyFusionLM.caption_prompt)
    return generation.generate(
      model,
      params,
      prompt,
      cache_len=prompt.shape[1] + max_len,
      max_new_tokens=max_len - 1,
      eos_id=eos_id,
      pad_id=pad_id,
      **kw,
    )

  def images(params, text, image_hw: tuple[int, int], **kw):
    return generate_images(model, params, text, model.code_grid(tuple(image_hw)), **kw)

  return {
    "caption": caption,
    "generate_images": images,
    "reconstruct": lambda params, x: model.apply({"params": params}, x, method=EarlyFusionLM.reconstruct),
  }
