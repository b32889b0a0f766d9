"""Vision-language models on a (pretrained) decoder-only LM: LLaVA, Frozen, BLIP-2 / MiniGPT-4 stage 2.

    images [B, M, H, W, 3] -> image encoder (features of a chosen layer, CLS kept or dropped)
      -> connector -> [B, M * N, D_lm]  written at the `image_token_id` placeholders of tokens [B, T]
      -> DecoderLM (vlm.models.decoder) -> logits [B, T, V]

The k-th placeholder of a row receives the k-th image token of that row (images in order, N per
image), so a row holds any number of images up to M and the data decides where they go
(vlm.data.conversation expands each `<image>` to N placeholders). Rows with fewer images leave
the surplus features unused; `images` [B, H, W, 3] means one image per row.

Packed rows (vlm.data.conversation.pack_examples): `segment_ids` [B, T] goes to the LM (attention
within each packed example, positions restarting per example); the row's images [B, k, H, W, 3]
are ordered as their placeholder runs appear in the row, so the in-order fill above puts each
example's image at its own placeholders; images of examples absent from the row are surplus.

Connectors (`connector`):
  'linear'  one Dense vision -> LM width (LLaVA v1, Liu et al. 2023 sec. 4; Frozen, Tsimpoukelli
            et al. 2021 sec. 3.1 maps the pooled feature to n prefix embeddings: 'linear' with
            `prefix_tokens` = n)
  'mlp'     Dense - GELU - Dense (LLaVA-1.5, Liu et al. 2023b sec. 3.2: "mlp2x_gelu")
  'none'    the encoder already outputs LM-width tokens (Fuyu: `vision_model='fuyu_patches'`, the image
            patches linearly projected, vlm.models.fuyu).
Q-Former connectors use `vision_model='blip2_qformer'` (its `query_features`, 32 query outputs)
followed by 'linear' (BLIP-2 sec. 3.3's fully-connected projection; MiniGPT-4's single layer).
Given `instruction` tokens [B, L] (data.conversation.instruction_length > 0), the Q-Former's
queries also attend to the instruction: BLIP-2's question-conditioned Q-Former for VQA (sec. 4.3),
InstructBLIP's instruction-aware Q-Former (Dai et al. 2023).

LLaVA-NeXT AnyRes (`anyres` = dict(grid_pinpoints, tile_size, patch_grid); Liu et al. 2024): an
image arrives as its views [B, 1 + max_tiles, tile, tile, 3] (the pp op `anyres`: global view, tiles
of the best-fitting grid, zero views) with `image_layout` [B, 4] (tile rows, cols, original height,
width). Every view goes through the encoder and connector as one batch; vlm.nn.anyres.AnyResPack
lays out [global tokens; unpadded tile grid with an `image_newline` after each row] and the row's
placeholders (as many as the data wrote for that image) receive them in order.

Video (LLaVA-NeXT-Video, Zhang et al. 2024; transformers' LlavaNextVideoForConditionalGeneration): `videos`
[B, F, H, W, 3], one clip of F frames per row, written at the `video_token_id` placeholders. Every frame
goes through the image encoder on its own (the same feature_layer / keep_cls as images), its patch grid
[g, g] is optionally pooled by `video_pool` = dict(mode='average' | 'max', stride=s) (a window and stride
of s, no padding: a remainder row / column is dropped, as LlavaNextVideoPooler's AvgPool2d / MaxPool2d;
floor(g / s)^2 = N' tokens per frame, row-major), then the connector; the row's F * N' tokens, frame by
frame, fill its video placeholders in order (the processor writes F * N' of them per video). Images
(plain or AnyRes) and videos may be in one call, each at its own placeholders. Video-LLaVA (Lin et al.
2023; transformers' VideoLlavaForConditionalGeneration) encodes frames with an encoder of its own
(`video_encoder='separate'`: a second ViT of the same vision_config, params video_vision/...; the shared
connector) and keeps every frame token, CLS included (`video_keep_cls=True`), whatever images drop.

Soft prompts (prompt tuning, Lester et al. 2021): `num_soft_prompts` learned vectors written at
`soft_prompt_token_id` placeholders, in order (the chat template puts them in the system turn).

Params: vision/..., [video_vision/...,] connector/..., lm/... (a DecoderLM tree: load a pretrained LM with
config.init mapping {'lm': ''}), soft_prompt [P, D].
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm import decoding
from vlm.data import anyres as anyres_data
from vlm.models import generation
from vlm.models.decoder import DecoderLM
from vlm.models.registry import MODELS
from vlm.models.vit import ViT
from vlm.nn.anyres import AnyResPack
from vlm.nn.mlp import dense
from vlm.nn.poolers import concat_adjacent_tokens

Dtype = Any


class Connector(nn.Module):
  """Image features [B, N, Dv] -> LM embeddings [B, N * prefix_tokens, D]."""

  kind: str
  width: int
  prefix_tokens: int = 1
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, _ = x.shape
    if self.kind == "none":
      if x.shape[-1] != self.width:
        raise ValueError(f"connector 'none': image features have width {x.shape[-1]}, the LM {self.width}")
      return x
    out = self.width * self.prefix_tokens
    if self.kind == "linear":
      x = dense(out, ("embed", "mlp"), use_bias=True, dtype=self.dtype, name="proj")(x)
    elif self.kind == "mlp":
      x = dense(self.width, ("embed", "mlp"), use_bias=True, dtype=self.dtype, name="fc1")(x)
      x = nn.gelu(x, approximate=False)
      x = dense(out, ("mlp", "embed"), use_bias=True, dtype=self.dtype, name="fc2")(x)
    else:
      raise ValueError(f"unknown connector {self.kind!r}; known: 'linear', 'mlp', 'none'")
    return x.reshape(b, n * self.prefix_tokens, self.width)


class VisionLanguageModel(nn.Module):
  """Image encoder + connector + DecoderLM. Logits [B, T, V] float32; position t predicts t+1.

  Attributes:
    lm_config: DecoderLM kwargs.
    vision_config: kwargs of the image encoder: a ViT (`vision_model='vit'`) or any registered
      model (e.g. 'blip2_qformer') whose `vision_method` returns [B, N, Dv].
    feature_layer: ViT only: None = the encoder's output after its final norm; -k = the output of
      the k-th block from the top, unnormed (HF's hidden_states[-k]; LLaVA takes -2).
    keep_cls: ViT only: keep the class token's feature (LLaVA drops it).
    pool: ViT only: None, or 'gap' / 'cls' / 'map' pooling to one feature (Frozen; with
      `prefix_tokens` it becomes a prefix of that many embeddings).
    connector, prefix_tokens: see Connector.
    image_token_id: the placeholder id; soft_prompt_token_id / num_soft_prompts: prompt tuning.
    anyres: None, or LLaVA-NeXT's dict(grid_pinpoints=((h, w), ...), tile_size=t, patch_grid=g): the
      same values as the data's pp op `anyres`; g = the encoder's feature grid per tile (t / patch).
    video_token_id: None (no video input), or the id of the video placeholders (HF's video_token_index).
    video_pool: None (every frame keeps its N features), or LLaVA-NeXT-Video's spatial pooling of each
      frame's square feature grid before the connector: dict(mode='average' | 'max', stride=s).
    video_encoder: 'shared' (frames through the image encoder: LLaVA-NeXT-Video) or 'separate' (a ViT of
      its own with the same vision_config: Video-LLaVA's video_tower; model.init creates its params only
      when given videos).
    video_keep_cls: None (as keep_cls) or whether frames keep the class token's feature (Video-LLaVA: True).
    video_method: None, or the method of a registered vision model (vision_model) that encodes a whole
      clip [B, F, H, W, 3] -> [B, N, Dv]: 'video_features' of vision_model='video_qformer'
      (vlm.models.video_llama.VideoQFormer, Video-LLaMA's per-frame and video Q-Formers).
    merge_tokens: k > 1 concatenates every k adjacent features of an image or frame into one before the
      connector ([N, Dv] -> [N / k, k * Dv]; vlm.nn.concat_adjacent_tokens): MiniGPT-v2's and
      MiniGPT4-Video's 4x fewer visual tokens (Ataallah et al. 2024, sec. 3.1). 1 (default): none.
  """

  lm_config: dict
  vision_config: dict
  vision_model: str = "vit"
  vision_method: str = "query_features"
  feature_layer: int | None = None
  keep_cls: bool = False
  pool: str | None = None
  connector_type: str = "mlp"
  prefix_tokens: int = 1
  image_token_id: int = 1000
  soft_prompt_token_id: int = 1004
  num_soft_prompts: int = 0
  anyres: dict | None = None
  video_token_id: int | None = None
  video_pool: dict | None = None
  video_encoder: str = "shared"
  video_keep_cls: bool | None = None
  merge_tokens: int = 1
  video_method: str | None = None
  dtype: Dtype = None

  def setup(self):
    if self.vision_model == "vit":
      kw = dict(self.vision_config)
      if self.pool is not None:
        kw.update(pool_type=self.pool)
      else:
        kw.update(pool_type="none", return_all_layers=self.feature_layer is not None)
      self.vision = ViT(**kw, dtype=self.dtype)
      if self.video_encoder == "separate":
        self.video_vision = ViT(**kw, dtype=self.dtype)
    else:
      self.vision = MODELS.get(self.vision_model)(**self.vision_config)
    self.lm = DecoderLM(**self.lm_config, dtype=self.dtype)
    self.connector = Connector(self.connector_type, self.lm_config["width"], self.prefix_tokens, self.dtype)
    if self.anyres is not None:
      if set(self.anyres) != {"grid_pinpoints", "tile_size", "patch_grid"}:
        raise ValueError(
          f"model.anyres: needs exactly grid_pinpoints, tile_size, patch_grid; got {sorted(self.anyres)}"
        )
      a = self.anyres
      self.anyres_pack = AnyResPack(
        self._patch_grid(),
        anyres_data.max_image_tokens(a["grid_pinpoints"], a["tile_size"], a["patch_grid"]),
        dtype=self.dtype,
        name="anyres",
      )
    if self.video_encoder not in ("shared", "separate"):
      raise ValueError(f"model.video_encoder {self.video_encoder!r}: 'shared' or 'separate'")
    if self.video_method is not None and self.vision_model == "vit":
      raise ValueError("model.video_method: a ViT encodes frames one by one; a clip-level method needs vision_model")
    if self.vision_model != "vit" and (self.video_encoder != "shared" or self.video_keep_cls is not None):
      raise ValueError(
        f"model.video_encoder / video_keep_cls: ViT options; vision_model {self.vision_model!r} "
        "encodes frames as it encodes images"
      )
    if self.video_token_id is not None and self.video_token_id in (self.image_token_id, self.soft_prompt_token_id):
      raise ValueError(
        f"model.video_token_id {self.video_token_id}: the same id as the image / soft prompt placeholders"
      )
    if self.video_pool is not None:
      if set(self.video_pool) != {"mode", "stride"}:
        raise ValueError(f"model.video_pool: needs exactly mode, stride; got {sorted(self.video_pool)}")
      if self.video_pool["mode"] not in ("average", "max"):
        raise ValueError(f"model.video_pool.mode {self.video_pool['mode']!r}: 'average' or 'max'")
      stride = self.video_pool["stride"]
      if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"model.video_pool.stride {stride!r}: a positive int")
    if isinstance(self.merge_tokens, bool) or not isinstance(self.merge_tokens, int) or self.merge_tokens < 1:
      raise ValueError(f"model.merge_tokens {self.merge_tokens!r}: a positive int (1: no merging)")
    if self.merge_tokens != 1 and self.anyres is not None:
      raise ValueError("model.merge_tokens: not with model.anyres (AnyRes lays out each tile's feature grid)")
    if self.num_soft_prompts:
      self.soft_prompt = self.param(
        "soft_prompt",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
        (self.num_soft_prompts, self.lm_config["width"]),
      )

  # ------------------------------------------------------------------------ images

  def image_features(self, images: jax.Array, train: bool = False, instruction: jax.Array | None = None) -> jax.Array:
    """images [B, H, W, 3] -> encoder features [B, N, Dv] (the chosen layer, CLS per keep_cls).

    instruction [B, L]: the vision model's text input (instruction-aware Q-Former:
    Blip2QFormer.query_features); only a vision model whose method takes `instruction` reads one.
    """
    if self.vision_model != "vit":
      if instruction is None:
        return getattr(self.vision, self.vision_method)(images)
      return getattr(self.vision, self.vision_method)(images, instruction=instruction)
    if instruction is not None:
      raise ValueError(
        "instruction: a ViT image encoder reads no text; an instruction-aware encoder is "
        "vision_model='blip2_qformer' (data.conversation.instruction_length > 0 feeds it)"
      )
    return self._vit_features(self.vision, images, train, self.keep_cls)

  def _vit_features(self, vit: nn.Module, images: jax.Array, train: bool, keep_cls: bool) -> jax.Array:
    """A ViT's features [B, N, Dv] of images [B, H, W, 3]: the feature_layer, the class token per keep_cls."""
    pooled, aux = vit(images, train=train)
    if self.pool is not None:
      return pooled[:, None]
    if self.feature_layer is None:
      feats = aux["encoded"]
    else:
      hidden = aux["hidden"]  # [depth, B, L, D]: every block's output
      if not -hidden.shape[0] <= self.feature_layer < 0:
        raise ValueError(f"feature_layer {self.feature_layer}: must be in [-{hidden.shape[0]}, -1] or None")
      feats = hidden[hidden.shape[0] + self.feature_layer]
    if self.vision_config.get("class_token") and not keep_cls:
      feats = feats[:, 1:]
    return feats

  def to_lm(self, feats: jax.Array) -> jax.Array:
    """Encoder features [N, L, Dv] of images or frames -> LM-width tokens [N, L / merge_tokens * prefix_tokens, D]:
    merge_tokens' concatenation, then the connector."""
    if self.merge_tokens != 1:
      feats = concat_adjacent_tokens(feats, self.merge_tokens)
    return self.connector(feats)

  def encode_images(self, images: jax.Array, train: bool = False, instruction: jax.Array | None = None) -> jax.Array:
    """images [B, H, W, 3] or [B, M, H, W, 3] -> LM-width image tokens [B, M * N, D].

    instruction [B, L] (optional): every image of row b is encoded with row b's instruction."""
    if images.ndim == 4:
      images = images[:, None]
    b, m = images.shape[:2]
    if instruction is not None:
      instruction = jnp.repeat(instruction, m, axis=0)
    feats = self.to_lm(self.image_features(images.reshape(b * m, *images.shape[2:]), train, instruction))
    return feats.reshape(b, m * feats.shape[1], feats.shape[2])

  def _patch_grid(self) -> tuple[int, int]:
    g = self.anyres["patch_grid"]
    return (int(g), int(g)) if isinstance(g, int) else (int(g[0]), int(g[1]))

  def encode_anyres(
    self, views: jax.Array, image_layout: jax.Array, train: bool = False
  ) -> tuple[jax.Array, jax.Array]:
    """LLaVA-NeXT: views [B, 1 + max_tiles, t, t, 3], image_layout [B, 4] (rows, cols, height, width)
    -> (tokens [B, max_tokens, D]: global view, then the unpadded tile grid with a newline per row,
    zeros after; count [B]: how many are valid). All views run through the encoder as one batch
    (the zero padding views too: static shapes)."""
    a = self.anyres
    views_per_image = 1 + anyres_data.max_tiles(a["grid_pinpoints"], a["tile_size"])
    if views.ndim != 5 or views.shape[1] != views_per_image or views.shape[2:4] != (a["tile_size"],) * 2:
      raise ValueError(
        f"model.anyres: images must be the pp op anyres's views [B, {views_per_image}, "
        f"{a['tile_size']}, {a['tile_size']}, C], got shape {views.shape}"
      )
    if image_layout is None or image_layout.shape != (views.shape[0], 4):
      raise ValueError(
        f"model.anyres: needs image_layout [B={views.shape[0]}, 4] (rows, cols, height, width; "
        f"the pp op anyres puts it in the batch), got "
        f"{None if image_layout is None else image_layout.shape}"
      )
    b, v = views.shape[:2]
    feats = self.connector(self.image_features(views.reshape(b * v, *views.shape[2:]), train))
    gh, gw = self._patch_grid()
    if feats.shape[1] != gh * gw:
      raise ValueError(
        f"model.anyres.patch_grid {(gh, gw)}: the encoder gives {feats.shape[1]} features per "
        f"{a['tile_size']} px tile, not {gh * gw}"
      )
    return self.anyres_pack(feats.reshape(b, v, *feats.shape[1:]), image_layout[:, :2], image_layout[:, 2:])

  # ------------------------------------------------------------------------ videos

  def pool_frames(self, feats: jax.Array) -> jax.Array:
    """LLaVA-NeXT-Video's spatial pooling (transformers' LlavaNextVideoPooler): per-frame features
    [N, g * g, Dv] (row-major grid) -> [N, floor(g / s)^2, Dv]: mean or max over s x s windows with
    stride s, no padding (a remainder row / column of the grid is dropped), flattened row-major."""
    if self.video_pool is None:
      return feats
    n, length, dim = feats.shape
    g = int(round(length**0.5))
    if g * g != length:
      raise ValueError(
        f"model.video_pool: pools a square grid of patch features, but a frame gives {length} features "
        "(a class token kept? keep_cls=False)"
      )
    s = self.video_pool["stride"]
    if s > g:
      raise ValueError(f"model.video_pool.stride {s}: larger than the frame's {g} x {g} feature grid")
    grid = feats.reshape(n, g, g, dim)
    window = dict(window_shape=(s, s), strides=(s, s), padding="VALID")
    pooled = nn.avg_pool(grid, **window) if self.video_pool["mode"] == "average" else nn.max_pool(grid, **window)
    return pooled.reshape(n, -1, dim)

  def frame_features(self, frames: jax.Array, train: bool = False) -> jax.Array:
    """frames [N, H, W, 3] -> encoder features [N, L, Dv]: the image encoder's (image_features), or with
    video_encoder='separate' the video encoder's; the class token per video_keep_cls (None: keep_cls)."""
    if self.vision_model != "vit":
      return self.image_features(frames, train)
    keep = self.keep_cls if self.video_keep_cls is None else self.video_keep_cls
    vit = self.video_vision if self.video_encoder == "separate" else self.vision
    return self._vit_features(vit, frames, train, keep)

  def encode_videos(self, videos: jax.Array, train: bool = False) -> jax.Array:
    """videos [B, F, H, W, 3] -> LM-width tokens [B, F * N', D], frame by frame: each frame through the
    encoder (frame_features), video_pool (LLaVA-NeXT-Video), then the connector. With video_method, the
    vision model encodes the whole clip, [B, N, Dv] (Video-LLaMA's video Q-Former), then the connector."""
    if videos.ndim != 5:
      raise ValueError(f"videos: expected [B, F, H, W, C] (one clip of F frames per row), got shape {videos.shape}")
    if self.video_method is not None:  # a clip-level encoder: [B, F, H, W, 3] -> [B, N, Dv]
      return self.to_lm(getattr(self.vision, self.video_method)(videos))
    b, f = videos.shape[:2]
    feats = self.to_lm(self.pool_frames(self.frame_features(videos.reshape(b * f, *videos.shape[2:]), train)))
    return feats.reshape(b, f * feats.shape[1], feats.shape[2])

  # ------------------------------------------------------------------------ sequence

  @staticmethod
  def _scatter(x: jax.Array, is_slot: jax.Array, values: jax.Array) -> jax.Array:
    """Writes values [B, K, D] (k-th to the k-th True of is_slot [B, T]) into x [B, T, D]."""
    idx = jnp.clip(jnp.cumsum(is_slot, axis=1) - 1, 0, values.shape[1] - 1)
    gathered = jnp.take_along_axis(values, idx[..., None], axis=1).astype(x.dtype)
    return jnp.where(is_slot[..., None], gathered, x)

  def embed(
    self,
    tokens: jax.Array,
    images: jax.Array | None = None,
    train: bool = False,
    stats: dict | None = None,
    surplus_images: bool = False,
    instruction: jax.Array | None = None,
    image_layout: jax.Array | None = None,
    videos: jax.Array | None = None,
  ) -> jax.Array:
    """tokens [B, T] -> LM input embeddings [B, T, D] with image / video tokens and soft prompts written in.
    stats: a dict that receives image_token_mismatch (see vlm.objectives.lm); surplus_images (packed
    rows, whose examples may be absent or have no image): a row may use any whole number of its
    images, so only a placeholder count that is not a multiple of one image's tokens, or exceeds
    all of them, counts as a mismatch. image_layout [B, 4]: with `anyres` (each row's image then
    has its own token count, which the placeholders must equal).

    videos [B, F, H, W, 3] (needs video_token_id): a row's video placeholders must be 0 or all F * N' of
    its video's tokens (encode_videos); concrete (unjitted) tokens with another count raise ValueError,
    under jit stats gets video_token_mismatch (the fraction of such rows)."""
    x = self.lm.embed(tokens)
    if videos is not None:
      if self.video_token_id is None:
        raise ValueError("videos: this model has no video_token_id (model.video_token_id = the video placeholder id)")
      vfeats = self.encode_videos(videos, train)
      is_vid = tokens == self.video_token_id
      found = jnp.sum(is_vid, axis=1)
      total = vfeats.shape[1]
      if not isinstance(found, jax.core.Tracer):
        bad_rows = [i for i, n in enumerate(jax.device_get(found).tolist()) if n not in (0, total)]
        if bad_rows:
          i = bad_rows[0]
          raise ValueError(
            f"videos: row {i} has {int(found[i])} video placeholders (video_token_id {self.video_token_id}); "
            f"its video gives {total} tokens ({videos.shape[1]} frames x {total // videos.shape[1]})"
          )
      x = self._scatter(x, is_vid, vfeats)
      if stats is not None:
        stats["video_token_mismatch"] = jnp.mean(((found != total) & (found > 0)).astype(jnp.float32))
    if images is not None:
      count = None
      if self.anyres is not None:
        if instruction is not None:
          raise ValueError("model.anyres: an instruction for the image encoder is not supported with AnyRes")
        feats, count = self.encode_anyres(images, image_layout, train)
      else:
        feats = self.encode_images(images, train, instruction)
      is_img = tokens == self.image_token_id
      x = self._scatter(x, is_img, feats)
      if stats is not None:
        found = jnp.sum(is_img, axis=1)
        total = feats.shape[1]
        if count is not None:
          bad = (found != count) & (found > 0)
        elif surplus_images:
          per_image = total // (images.shape[1] if images.ndim == 5 else 1)
          bad = (found % per_image != 0) | (found > total)
        else:
          bad = (found != total) & (found > 0)
        stats["image_token_mismatch"] = jnp.mean(bad.astype(jnp.float32))
    if self.num_soft_prompts:
      prompts = jnp.broadcast_to(self.soft_prompt[None], (tokens.shape[0], *self.soft_prompt.shape))
      x = self._scatter(x, tokens == self.soft_prompt_token_id, prompts)
    return x

  def __call__(
    self,
    images: jax.Array | None,
    tokens: jax.Array,
    instruction: jax.Array | None = None,
    image_layout: jax.Array | None = None,
    train: bool = False,
    mask: jax.Array | None = None,
    return_stats: bool = False,
    segment_ids: jax.Array | None = None,
    videos: jax.Array | None = None,
  ):
    """Logits [B, T, V] of tokens [B, T] with the images at their placeholders (mask: padding [B, T];
    segment_ids: packed rows [B, T], see DecoderLM; instruction [B, L]: the image encoder's text
    input, see encode_images; image_layout [B, 4]: AnyRes, see encode_anyres; videos [B, F, H, W, 3]:
    clips at the video_token_id placeholders (LLaVA-NeXT-Video, Video-LLaVA), see encode_videos); with return_stats also
    {'image_token_mismatch': fraction of rows whose placeholders do not match the images' token count
    (a row with one image must hold all its tokens; a row with several images, or a packed row, a whole
    number of images: documents may hold fewer images than the batch's M)}, and with videos
    'video_token_mismatch' (see embed)."""
    stats: dict = {}
    # Packed rows, and documents [B, M, ...] that may hold fewer than M images, use a whole number of theirs.
    surplus = segment_ids is not None or (images is not None and images.ndim == 5)
    x = self.embed(
      tokens,
      images,
      train,
      stats,
      surplus_images=surplus,
      instruction=instruction,
      image_layout=image_layout,
      videos=videos,
    )
    logits = self.lm(inputs_embeds=x, train=train, mask=mask, segment_ids=segment_ids)
    return (logits, stats) if return_stats else logits

  def decode_step(
    self,
    tokens: jax.Array,
    index: jax.Array | int,
    cache_len: int | None = None,
    mask: jax.Array | None = None,
    images: jax.Array | None = None,
    instruction: jax.Array | None = None,
    image_layout: jax.Array | None = None,
    videos: jax.Array | None = None,
  ) -> jax.Array:
    """DecoderLM.decode_step on embeddings: pass images (and instruction, image_layout) and videos
    [B, F, H, W, 3] with the prompt (prefill), not after."""
    x = self.embed(tokens, images, instruction=instruction, image_layout=image_layout, videos=videos)
    return self.lm.decode_step(None, index, cache_len, mask, inputs_embeds=x)


def predict_fns(model: VisionLanguageModel) -> dict[str, Any]:
  """generate(params, images, prompt, *, instruction=None, image_layout=None, videos=None, **kw) and
  generate_guided(..., contrast_images, crg_alpha=1.0, crg_plausibility=0.0): answers after prompt
  [B, P] (left-padded: pass `mask`) about images, with the KV cache (vlm.models.generation; kw are its
  max_new_tokens, eos_id, pad_id, mask, method, rng and decoding options). The prefill embeds the
  images (with `instruction` [B, L] for an instruction-aware image encoder, and `image_layout` [B, 4]
  for AnyRes views) and `videos` [B, F, H, W, 3] (LLaVA-NeXT-Video, Video-LLaVA; images may then be
  None); single-token steps do not.

  generate_guided: contrastive region guidance (Wan et al. 2024, eq. 1), no training: every step's
  logits are (1 + crg_alpha) l(images) - crg_alpha l(contrast_images), where contrast_images are the
  images with the asked-about regions masked (vlm.evals.grounding); evidence that comes from the
  region counts more, priors that survive its removal less. crg_plausibility > 0: only tokens within
  that factor of the plain model's most probable one may win (decoding.guided_step_fn).
  """

  def inputs(images, instruction, image_layout, videos) -> dict[str, Any]:
    return dict(images=images, instruction=instruction, image_layout=image_layout, videos=videos)

  def generate(
    params, images, prompt, *, instruction=None, image_layout=None, videos=None, **kw
  ) -> decoding.DecodeOutput:
    return generation.generate(
      model, params, prompt, prefill_inputs=inputs(images, instruction, image_layout, videos), **kw
    )

  def generate_guided(
    params,
    images,
    prompt,
    *,
    contrast_images,
    crg_alpha: float = 1.0,
    crg_plausibility: float = 0.0,
    instruction=None,
    image_layout=None,
    videos=None,
    **kw,
  ) -> decoding.DecodeOutput:
    if kw.get("method", "greedy") not in ("greedy", "sample"):
      raise ValueError(f"contrastive region guidance decodes with 'greedy' or 'sample', not {kw['method']!r}")
    return generation.generate(
      model,
      params,
      prompt,
      prefill_inputs=inputs(images, instruction, image_layout, videos),
      contrast_inputs={"images": contrast_images},
      guidance=1.0 + crg_alpha,
      plausibility=crg_plausibility,
      **kw,
    )

  return {"generate": generate, "generate_guided": generate_guided}
