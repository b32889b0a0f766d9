"""FLAVA pretraining objective on one paired batch (Singh et al. 2022, sec. 3.3).

    L = w_con * L_con + w_mlm * L_MLM + w_mim * L_MIM + w_mmm_t * L_MMM-text + w_mmm_i * L_MMM-image
        + w_itm * L_ITM,            every weight 1 in the paper

- global contrastive (L_con): CLIP's softmax loss on the unmasked image and text ([CLS_I], [CLS_T]
  projections), over every device's examples (sec. 3.3: "global", gathered across GPUs);
- MLM: the text encoder on BERT-masked text (15%: 80% [MASK], 10% random, 10% kept) predicts the
  chosen tokens;
- MIM: the image encoder on the masked image (about 40% of patches, BEiT's blockwise masking, or
  random) predicts the frozen tokenizer's codes at the masked patches;
- MMM: the multimodal encoder on the same masked image and masked text predicts both the masked
  tokens and the masked patches' codes;
- ITM: the multimodal encoder classifies matched pairs against one negative text and one negative
  image per pair, drawn across all devices from the softmax of the contrastive similarities
  (hard negatives, as VLMo / ALBEF; `itm_hard_negatives=False` draws them uniformly). As in FLAVA,
  ITM shares the masked multimodal pass with MMM (the positives' rows give both).

FLAVA-full applies MLM and MIM to unimodal corpora (CCNews/BookCorpus, ImageNet-1k) and the three
multimodal terms to image-text pairs; here every term is computed on the paired batch. A weight of 0
skips its term (and, for MIM / MMM-image, the need for a tokenizer).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from vlm.losses import (
  blockwise_patch_mask,
  hard_negative_indices,
  itm_loss,
  mask_tokens,
  masked_prediction_loss,
  random_patch_mask,
  take_rows,
)
from vlm.objectives.base import OBJECTIVES, check_choice, check_contrastive
from vlm.objectives.contrastive import contrastive_term

MASKINGS = ("blockwise", "random")


@OBJECTIVES.register("flava")
@dataclasses.dataclass(frozen=True)
class FlavaObjective:
  """FLAVA's six losses; see the module docstring. batch: 'image' [B,H,W,3], 'text' [B,L] ([BOS] first).

  mask_id: the [MASK] token id, < the model's text vocabulary (the embedded dataset's tokenizer has
    1000 pieces and no [MASK], so its models use vocab 1001 and mask_id 1000).
  random_vocab: random MLM replacements are drawn from [0, random_vocab); None: mask_id when it is
    the last row of the embedding (a row appended for [MASK]), else the whole vocabulary.
  special_ids: never masked (pad 0, eos 1, bos 3 of the embedded tokenizer).
  mim_ratio / mim_masking: fraction of patches masked (BEiT: 40%) and 'blockwise' or 'random'.
  """

  contrastive_weight: float = 1.0
  mlm_weight: float = 1.0
  mim_weight: float = 1.0
  mmm_text_weight: float = 1.0
  mmm_image_weight: float = 1.0
  itm_weight: float = 1.0
  mask_id: int = 1000
  mlm_rate: float = 0.15
  mlm_replace: tuple[float, float, float] = (0.8, 0.1, 0.1)
  random_vocab: int | None = None
  special_ids: tuple[int, ...] = (0, 1, 3)
  mim_ratio: float = 0.4
  mim_masking: str = "blockwise"
  itm_hard_negatives: bool = True
  impl: str = "all_gather"
  mesh: Mesh | None = None

  def __post_init__(self):
    check_choice("mim_masking", self.mim_masking, MASKINGS)
    check_contrastive("softmax", self.impl)

  def init_args(self, batch) -> tuple:
    return (batch["image"][:1], batch["text"][:1])

  def _check(self, model: nn.Module) -> int:
    vocab = model.text_vocab_size()
    if not 0 <= self.mask_id < vocab:
      raise ValueError(
        f"objective.mask_id={self.mask_id} is not a row of the model's text embedding "
        f"(vocab_size {vocab}): give the text encoder vocab_size > mask_id, e.g. the tokenizer's "
        f"pieces + 1 with mask_id = that piece count"
      )
    needs_codes = self.mim_weight > 0 or self.mmm_image_weight > 0
    if needs_codes and model.tokenizer is None:
      raise ValueError(
        "MIM and MMM-image need model.tokenizer (VQTokenizer kwargs); or set mim_weight and mmm_image_weight to 0"
      )
    if self.random_vocab is not None:
      return self.random_vocab
    return self.mask_id if self.mask_id == vocab - 1 else vocab

  def __call__(self, model: nn.Module, params, batch, *, rng, train: bool):
    random_vocab = self._check(model)
    images, text = batch["image"], batch["text"]
    b, length = text.shape
    k_text, k_img, k_neg, k_drop = jax.random.split(rng, 4)
    text_in, chosen = mask_tokens(
      k_text,
      text,
      mask_id=self.mask_id,
      vocab_size=random_vocab,
      rate=self.mlm_rate,
      special_ids=self.special_ids,
      replace=tuple(self.mlm_replace),
    )
    w = dict(
      contrastive=self.contrastive_weight,
      mlm=self.mlm_weight,
      mim=self.mim_weight,
      mmm_text=self.mmm_text_weight,
      mmm_image=self.mmm_image_weight,
      itm=self.itm_weight,
    )
    need_codes = w["mim"] > 0 or w["mmm_image"] > 0
    need_fusion = w["mmm_text"] > 0 or w["mmm_image"] > 0 or w["itm"] > 0

    def forward(m):
      terms, metrics = {}, {}

      def add(name, value_and_metrics):
        value, ms = value_and_metrics
        terms[name] = value
        metrics[f"{name}_loss"] = value
        metrics.update({f"{name}_{k}": v for k, v in ms.items()})

      grid = m.patch_grid(images)
      n = grid[0] * grid[1]
      if self.mim_masking == "blockwise":
        patch_mask = blockwise_patch_mask(k_img, b, grid, self.mim_ratio)
      else:
        patch_mask = random_patch_mask(k_img, b, n, self.mim_ratio)
      codes = m.image_codes(images) if need_codes else None

      # Unmasked unimodal pass: the contrastive embeddings (and the ITM negatives' sampling weights).
      zimg = ztxt = None
      if w["contrastive"] > 0 or (w["itm"] > 0 and self.itm_hard_negatives):
        zimg = m.embed_image_states(m.image_states(images, train=train))
        ztxt = m.embed_text_states(m.text_states(text, train))
      scale, bias = m.scale_and_bias()
      if w["contrastive"] > 0:
        value, ms = contrastive_term(
          zimg, ztxt, {"scale": scale, "bias": bias}, loss="softmax", impl=self.impl, mesh=self.mesh
        )
        terms["contrastive"] = value
        metrics.update(ms, contrastive_loss=value)

      # Masked unimodal pass: MLM and MIM.
      hm_img = m.image_states(images, patch_mask, train)
      hm_txt = m.text_states(text_in, train)
      if w["mlm"] > 0:
        add("mlm", masked_prediction_loss(m.mlm_logits(hm_txt), text, chosen))
      if w["mim"] > 0:
        add("mim", masked_prediction_loss(m.mim_logits(hm_img), codes, patch_mask))

      # Multimodal pass over the masked pairs: the positives give MMM and ITM's positives; each pair
      # also gets one negative text and one negative image (their masked states, from any device).
      if need_fusion:
        valid = m.text_valid(text)
        if w["itm"] > 0:
          if self.itm_hard_negatives:
            neg_txt, neg_img = hard_negative_indices(zimg, ztxt, k_neg, scale=scale, tokens=text, mesh=self.mesh)
          else:
            zeros = jnp.zeros((b, 1), jnp.float32)
            neg_txt, neg_img = hard_negative_indices(zeros, zeros, k_neg, tokens=text, hard=False, mesh=self.mesh)
          neg_h_txt, neg_valid = take_rows((hm_txt, valid), neg_txt, self.mesh)
          neg_h_img = take_rows(hm_img, neg_img, self.mesh)
          # [B, 3, ...] -> [3B, ...] keeps every device's rows on that device.
          h_img3 = jnp.stack([hm_img, hm_img, neg_h_img], axis=1).reshape(3 * b, *hm_img.shape[1:])
          h_txt3 = jnp.stack([hm_txt, neg_h_txt, hm_txt], axis=1).reshape(3 * b, *hm_txt.shape[1:])
          valid3 = jnp.stack([valid, neg_valid, valid], axis=1).reshape(3 * b, length)
          h_mm = m.fuse(h_img3, h_txt3, valid3, train)
          itm = m.itm_logits(h_mm).reshape(b, 3, 2)
          add("itm", itm_loss(itm[:, 0], itm[:, 1:].reshape(2 * b, 2)))
          h_pos = h_mm.reshape(b, 3, *h_mm.shape[1:])[:, 0]
        else:
          h_pos = m.fuse(hm_img, hm_txt, valid, train)
        if w["mmm_text"] > 0:
          add("mmm_text", masked_prediction_loss(m.mmm_text_logits(h_pos, length), text, chosen))
        if w["mmm_image"] > 0:
          add("mmm_image", masked_prediction_loss(m.mmm_image_logits(h_pos, n), codes, patch_mask))
      loss = sum(w[k] * v for k, v in terms.items())
      return loss, metrics

    return model.apply({"params": params}, method=forward, rngs={"dropout": k_drop})
