"""Discrete image tokenizer in the style of ViT-VQGAN (Yu et al. 2022, "Vector-quantized Image
Modeling with Improved VQGAN").

Encoder and decoder are ViTs over non-overlapping patches (sec. 3.1), one code per patch, so the
code grid lines up with a ViT of the same patch size (the MIM target of BEiT/FLAVA, or the image
tokens of an early-fusion LM). Codebook learning follows sec. 3.2: the encoder output is projected
to a low-dimensional code space ("factorized codes", e.g. 32-d) and both it and the codebook are
l2-normalised, so the nearest code is the one of largest cosine. Both measures keep a large
codebook in use without restarting dead codes.

  encoder: patches -> PatchEmbed(width) + learned positions -> Encoder(depth) -> LayerNorm
           -> Dense(width) -> tanh -> Dense(code_dim) -> l2-normalise                      = z
  quantise: q = normalised codebook[argmax_k <z, c_k / |c_k|>], straight-through z + sg(q - z)
  decoder: Dense(width) + learned positions -> Encoder(depth) -> LayerNorm
           -> Dense(width) -> tanh -> Dense(p * p * 3) -> un-patchify                      = images

(The paper puts a two-layer feed-forward network with a tanh in the middle after the transformer
blocks of both encoder and decoder, and no activation on either output.) The perceptual,
adversarial and logit-Laplace terms of the paper's stage-1 loss are not part of this module; the
VQ-VAE loss lives in vlm.objectives.vq.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm.models.two_tower import l2_normalize
from vlm.nn import Encoder, LearnedPosEmb, PatchEmbed, make_norm
from vlm.nn.mlp import dense


class _Tower(nn.Module):
  """Tokens [B, gh, gw, width] + learned positions -> Encoder -> LayerNorm -> Dense -> tanh -> Dense(out_dim)."""

  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  out_dim: int
  out_axis: str | None = "proj"
  norm_eps: float = 1e-6
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d)
    x = LearnedPosEmb(gh * gw, stddev=1 / d**0.5, name="pos_embedding")(x)
    x = Encoder(
      depth=self.depth,
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      norm_eps=self.norm_eps,
      dtype=self.dtype,
      name="encoder",
    )(x, deterministic=True)
    x = make_norm("layer", self.norm_eps, self.dtype, name="norm")(x)
    x = jnp.tanh(dense(self.width, ("embed", "mlp"), use_bias=True, dtype=self.dtype, name="head_hidden")(x))
    x = dense(self.out_dim, ("mlp", self.out_axis), use_bias=True, dtype=self.dtype, name="head_out")(x)
    return x.reshape(b, gh, gw, self.out_dim)


class VQTokenizer(nn.Module):
  """Images [B, H, W, 3] in [-1, 1] <-> codes int32 [B, H/patch_size, W/patch_size] (or [B, 1, K] with
  latent_tokens = K: a 1-D tokenizer, TiTok).

  Methods (each usable as `model.apply({'params': p}, x, method=VQTokenizer.<name>)`):
    encode(images) -> codes [B, gh, gw] int32
    decode(codes) -> images [B, gh * patch_size, gw * patch_size, 3]
    __call__(images, train=False) -> (recon [B, H, W, 3], aux): aux['codes'] [B, gh, gw],
      aux['codebook_loss'] = mean (sg(z) - q)^2, aux['commit_loss'] = mean (z - sg(q))^2 (means
      over tokens and code dimensions, of the l2-normalised vectors); the decoder sees
      z + sg(q - z), so reconstruction gradients pass straight through to the encoder;
      aux['similarity'] [B, gh, gw, codebook_size] holds the cosines (for a codebook-usage loss).
    embed(images) -> unit latents z [B, gh, gw, code_dim]; lookup(codes) -> unit code vectors.
  __call__ creates every parameter. The learned position grids are sized by the first input
  (init) and fixed afterwards. Parameters: 'embedding' (patches), 'encoder', 'codebook'
  [codebook_size, code_dim], 'decoder_in', 'decoder' (and 'latents', 'mask_token' with latent_tokens).
  """

  width: int
  depth: int  # of the encoder and of the decoder
  num_heads: int
  mlp_dim: int
  patch_size: int = 8
  codebook_size: int = 8192
  code_dim: int = 32
  # TiTok (Yu et al. 2024, "An Image is Worth 32 Tokens for Reconstruction and Generation", sec. 3.2):
  # latent_tokens = K > 0 quantises K learned latent tokens read out of the encoder instead of one code
  # per patch; the decoder fills (image_size / patch_size)^2 mask tokens from them. Codes are then a
  # 1-D sequence, [B, 1, K], not tied to image positions. image_size is required with it.
  latent_tokens: int = 0
  image_size: int | None = None
  norm_eps: float = 1e-6
  dtype: Any = None

  def setup(self):
    p = self.patch_size
    tower = dict(
      width=self.width,
      depth=self.depth,
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      norm_eps=self.norm_eps,
      dtype=self.dtype,
    )
    self.embedding = PatchEmbed(self.width, (p, p), dtype=self.dtype)
    self.encoder = _Tower(out_dim=self.code_dim, **tower)
    # Normal init (sec. 3.2); only directions matter, as codes are compared by cosine.
    self.codebook = self.param(
      "codebook",
      nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "proj")),
      (self.codebook_size, self.code_dim),
    )
    self.decoder_in = dense(self.width, ("proj", "embed"), use_bias=True, dtype=self.dtype, name=None)
    self.decoder = _Tower(out_dim=p * p * 3, **tower)
    if self.latent_tokens:
      if not self.image_size or self.image_size % p:
        raise ValueError(
          f"VQTokenizer(latent_tokens={self.latent_tokens}) needs image_size divisible by "
          f"patch_size={p}, got image_size={self.image_size}"
        )
      init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed"))
      self.latents = self.param("latents", init, (self.latent_tokens, self.width))
      self.mask_token = self.param("mask_token", init, (1, self.width))

  def code_grid(self, image_hw: tuple[int, int]) -> tuple[int, int]:
    """Shape of the code grid of images of size image_hw: (H / p, W / p), or (1, K) with latent tokens."""
    if self.latent_tokens:
      return 1, self.latent_tokens
    return image_hw[0] // self.patch_size, image_hw[1] // self.patch_size

  def _check(self, images: jax.Array) -> None:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"VQTokenizer expects images [B, H, W, 3], got shape {images.shape}")
    h, w = images.shape[1:3]
    if h % self.patch_size or w % self.patch_size:
      raise ValueError(f"image size {(h, w)} is not divisible by patch_size {self.patch_size}")

  def embed(self, images: jax.Array) -> jax.Array:
    """l2-normalised low-dimensional latents z [B, gh, gw, code_dim] (float32) of images."""
    self._check(images)
    x = self.embedding(jnp.asarray(images, self.dtype or jnp.float32))
    if self.latent_tokens:  # [patches; latents] through the encoder, the latents' outputs kept
      b, gh, gw, d = x.shape
      if (gh * self.patch_size, gw * self.patch_size) != (self.image_size,) * 2:
        raise ValueError(f"VQTokenizer(image_size={self.image_size}) got images of size {images.shape[1:3]}")
      lat = jnp.broadcast_to(self.latents.astype(x.dtype), (b, self.latent_tokens, d))
      x = jnp.concatenate([x.reshape(b, gh * gw, d), lat], axis=1)[:, None]
      return l2_normalize(self.encoder(x)[:, :, gh * gw :].astype(jnp.float32))
    return l2_normalize(self.encoder(x).astype(jnp.float32))

  def normalized_codebook(self) -> jax.Array:
    """The codebook with unit rows, [codebook_size, code_dim] float32."""
    return l2_normalize(self.codebook.astype(jnp.float32))

  def similarity(self, z: jax.Array) -> jax.Array:
    """Cosines [..., codebook_size] between unit latents z [..., code_dim] and the codebook."""
    return jnp.einsum("...d,kd->...k", z, self.normalized_codebook())

  def nearest(self, z: jax.Array) -> jax.Array:
    """Index of the largest cosine between unit latents z [..., code_dim] and the codebook, int32 [...]."""
    return jnp.argmax(self.similarity(z), axis=-1).astype(jnp.int32)

  def encode(self, images: jax.Array) -> jax.Array:
    """Images [B, H, W, 3] -> codes int32 [B, H/patch_size, W/patch_size]."""
    return self.nearest(self.embed(images))

  def lookup(self, codes: jax.Array) -> jax.Array:
    """Codes int [...] -> unit code vectors [..., code_dim]."""
    return jnp.take(self.normalized_codebook(), codes, axis=0)

  def render(self, q: jax.Array) -> jax.Array:
    """Code vectors [B, gh, gw, code_dim] -> images [B, gh * p, gw * p, 3] (with latent tokens: [B, 1,
    K, code_dim] -> [B, image_size, image_size, 3])."""
    x = self.decoder_in(q.astype(self.dtype or jnp.float32))
    p = self.patch_size
    if self.latent_tokens:  # [mask tokens; latents] through the decoder, the mask tokens' outputs kept
      b, g = x.shape[0], self.image_size // p
      masks = jnp.broadcast_to(self.mask_token.astype(x.dtype), (b, g * g, x.shape[-1]))
      x = jnp.concatenate([masks, x.reshape(b, -1, x.shape[-1])], axis=1)[:, None]
      x = self.decoder(x)[:, 0, : g * g].reshape(b, g, g, -1)
    else:
      x = self.decoder(x)
    b, gh, gw, _ = x.shape
    x = x.reshape(b, gh, gw, p, p, 3).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, gh * p, gw * p, 3).astype(jnp.float32)

  def decode(self, codes: jax.Array) -> jax.Array:
    """Codes int [B, gh, gw] -> images [B, gh * patch_size, gw * patch_size, 3]."""
    if codes.ndim != 3:
      raise ValueError(f"VQTokenizer.decode expects codes [B, gh, gw], got shape {codes.shape}")
    return self.render(self.lookup(codes))

  def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    del train  # no dropout; kept for the trainer's calling convention
    z = self.embed(images)
    sims = self.similarity(z)
    codes = jnp.argmax(sims, axis=-1).astype(jnp.int32)
    q = self.lookup(codes)
    codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(z) - q))
    commit_loss = jnp.mean(jnp.square(z - jax.lax.stop_gradient(q)))
    q_st = z + jax.lax.stop_gradient(q - z)  # straight-through estimator
    recon = self.render(q_st)
    return recon, {"codes": codes, "codebook_loss": codebook_loss, "commit_loss": commit_loss, "similarity": sims}


def predict_fns(model: VQTokenizer) -> dict[str, Any]:
  """autoencode(params, images [B, H, W, 3]) -> (reconstruction, codes [B, gh, gw]);
  codebook_size() -> the number of codes."""

  def autoencode(params, images):
    recon, aux = model.apply({"params": params}, images, train=False)
    return recon, aux["codes"]

  return {"autoencode": autoencode, "codebook_size": lambda: int(model.codebook_size)}
