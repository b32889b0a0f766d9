"""Import of Hugging Face FLAVA checkpoints (transformers' FlavaModel: config.json + safetensors).

`import_hf_flava(path)` -> ('flava', FLAVA kwargs, params); `vlm.convert.import_hf` dispatches here
for model_type 'flava'. Never unpickles. What maps where (transformers' modeling_flava.py):

- image: conv patch embedding with bias, [CLS] + patches + learned positions (no pre-norm),
  pre-LN blocks, LayerNorm eps 1e-12, exact GELU; its mask token -> img/mask_token.
- text (BERT embeddings): word + position + token_type + LayerNorm. Token types are always 0 in
  our model, so token_type_embeddings[0] is folded into pos_embedding and the LayerNorm becomes
  TextTransformer(embed_norm=True)'s 'embed_norm'. The key mask comes from pad_token_id.
- the multimodal encoder takes `image_to_mm_projection(image_states[-1])` and the text analogue:
  the last block's output *before* the towers' final LayerNorm, hence FLAVA(fuse_prenorm=True)
  with the final norms as img_norm / txt_norm.
- contrastive: get_image_features / get_text_features are `image_projection` / `text_projection`
  (with bias) on every token of the normed states; FLAVA's embeddings take [CLS] and l2-normalise.
  logit_scale -> t; max_scale=100 as FlavaForPreTraining clamps logit_scale to [0, log 100].
- the towers' and the multimodal poolers (dense + tanh) feed nothing in FlavaModel's outputs and are
  not imported. FLAVA's pretraining heads (MLM, MMM, ITM) are not in a FlavaModel checkpoint: the
  params hold the encoders and projections only (use them with init.mapping or apply with a
  method). The DALL-E image codebook is out of scope: tokenizer=None.

Config: config.json is read only through vlm.convert.hf_config (the defaults of FlavaConfig and its
image / text / multimodal sub-configs for what a 4.x file leaves out); each tower's activation and
LayerNorm eps are its own sub-config's (hidden_act, layer_norm_eps). Not expressible (ConfigError naming
file, key and value): an activation vlm.convert.common.ACT_FROM_HF lacks, qkv_bias=False,
multimodal_config.use_cls_token=False.
"""

from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

from vlm.convert import hf_config
from vlm.convert.common import fwd, linear_rows, norm_rows, stack_encoder_blocks, tower_kwargs
from vlm.convert.hf_config import HFConfig
from vlm.convert.registry import register_importer
from vlm.convert.safetensors_io import load_safetensors_dir

# Present in FlavaModel checkpoints, used by none of its embeddings outputs.
_UNUSED_PREFIXES = ("image_model.pooler.", "text_model.pooler.", "multimodal_model.pooler.")
_UNUSED_KEYS = ("text_model.embeddings.position_ids", "text_model.embeddings.token_type_ids")


def _pair(c: HFConfig, key: str) -> tuple[int, int]:
  """An image_size / patch_size: an int or an [h, w] pair (as FlavaPatchEmbeddings takes either)."""
  v = c[key]
  v = tuple(v) if isinstance(v, (list, tuple)) else (v, v)
  if len(v) != 2 or any(isinstance(x, bool) or not isinstance(x, int) or x <= 0 for x in v):
    raise c.error(key, "expected a positive integer or an [h, w] pair")
  return v


def _as_config(config) -> HFConfig:
  c = config if isinstance(config, HFConfig) else hf_config.from_dict(dict(config))
  if c.model_type != "flava":
    raise c.error("model_type", "expected 'flava'")
  return c


def _flava_encoder_rows(hf: str, ours: str, depth: int):
  """Rows of a FlavaEncoder (BERT-style names, pre-LN) `hf.layer.{i}` -> our Encoder blocks `ours/block_{i}`."""
  rows = []
  for i in range(depth):
    h, o = f"{hf}.layer.{i}", f"{ours}/block_{i}"
    rows += norm_rows(f"{h}.layernorm_before", f"{o}/norm1")
    for a, b in (("query", "query"), ("key", "key"), ("value", "value")):
      rows += linear_rows(f"{h}.attention.attention.{a}", f"{o}/attn/{b}", "qkv", bias_kind="qkv_bias")
    rows += linear_rows(f"{h}.attention.output.dense", f"{o}/attn/out", "out")
    rows += norm_rows(f"{h}.layernorm_after", f"{o}/norm2")
    rows += linear_rows(f"{h}.intermediate.dense", f"{o}/mlp/fc1") + linear_rows(f"{h}.output.dense", f"{o}/mlp/fc2")
  return rows


def _flava_table(config: HFConfig) -> list[tuple[str, str, str, str]]:
  """Rows (hf_key, our_path, layout, tower) for FlavaModel; text position rows are handled apart."""
  ic, tc, mc = config["image_config"], config["text_config"], config["multimodal_config"]
  img = [
    ("image_model.embeddings.cls_token", "img/cls", "id"),
    ("image_model.embeddings.position_embeddings", "img/pos_embedding/pos_embedding", "id"),
  ]
  img += linear_rows("image_model.embeddings.patch_embeddings.projection", "img/embedding/conv", "conv")
  img += _flava_encoder_rows("image_model.encoder", "img/encoder", ic["num_hidden_layers"])
  img += norm_rows("image_model.layernorm", "img_norm")
  txt = [("text_model.embeddings.word_embeddings.weight", "txt/embedding/embedding", "id")]
  txt += norm_rows("text_model.embeddings.LayerNorm", "txt/embed_norm")
  txt += _flava_encoder_rows("text_model.encoder", "txt/encoder", tc["num_hidden_layers"])
  txt += norm_rows("text_model.layernorm", "txt_norm")
  mm = [("multimodal_model.cls_token", "mm/cls", "id")]
  mm += _flava_encoder_rows("multimodal_model.encoder", "mm/encoder", mc["num_hidden_layers"])
  mm += norm_rows("multimodal_model.layernorm", "mm/encoder_norm")
  top = linear_rows("image_projection", "img_proj") + linear_rows("text_projection", "txt_proj")
  top += linear_rows("image_to_mm_projection", "image_to_mm") + linear_rows("text_to_mm_projection", "text_to_mm")
  top += [("logit_scale", "t", "scalar")]
  return (
    [r + ("image",) for r in img]
    + [r + ("text",) for r in txt]
    + [r + ("multimodal",) for r in mm]
    + [r + ("none",) for r in top]
  )


def _tower(c: HFConfig) -> dict[str, Any]:
  c.expect("qkv_bias", True, "FLAVA's attention without q/k/v biases")
  return tower_kwargs(c)


def flava_kwargs_from_hf(config) -> dict[str, Any]:
  """Our FLAVA kwargs for an HF FlavaModel config (an HFConfig, or a config.json dict: wrapped with
  hf_config.from_dict, transformers' defaults filled)."""
  config = _as_config(config)
  ic, tc, mc = config["image_config"], config["text_config"], config["multimodal_config"]
  mc.expect("use_cls_token", True, "the multimodal encoder's [CLS] is what FLAVA's heads read")
  size, patch = _pair(ic, "image_size"), _pair(ic, "patch_size")
  image = dict(
    _tower(ic),
    patch_size=patch,
    posemb="learn",
    posemb_grid=(size[0] // patch[0], size[1] // patch[1]),
    patch_bias=True,
    pre_norm=False,
  )
  pad = tc["pad_token_id"]  # the key mask of our text tower (FlavaTextConfig's default: 0)
  text = dict(
    _tower(tc),
    vocab_size=tc["vocab_size"],
    max_len=tc["max_position_embeddings"],
    pad_id=int(pad) if isinstance(pad, int) else 0,
    pool_type="first",
    padding_mask=True,
    embed_norm=True,
  )
  return dict(
    image=image,
    text=text,
    multimodal=_tower(mc),
    tokenizer=None,
    embed_dim=config["projection_dim"],
    temperature_init=float(config["logit_scale_init_value"]),
    bias_init=None,
    max_scale=100.0,
    fuse_prenorm=True,
  )


def _heads(config: HFConfig, tower: str) -> int:
  key = {"image": "image_config", "text": "text_config", "multimodal": "multimodal_config"}.get(tower)
  return config[key]["num_attention_heads"] if key else 1


@register_importer("flava")
def import_hf_flava(path: str | Path, scan: bool = False) -> tuple[str, dict[str, Any], dict]:
  """HF FlavaModel directory -> ('flava', kwargs, params). Raises listing missing/unused tensors."""
  path = Path(path)
  config = _as_config(hf_config.read_config(path))
  kwargs = flava_kwargs_from_hf(config)
  tensors = load_safetensors_dir(path)
  if any(k.startswith("flava.") for k in tensors):
    raise ValueError(
      f"{path}: a FlavaForPreTraining checkpoint ('flava.' prefix); only FlavaModel's layout is "
      "supported (its heads and the image codebook are not imported)"
    )
  table = _flava_table(config)
  pos_keys = ["text_model.embeddings.position_embeddings.weight", "text_model.embeddings.token_type_embeddings.weight"]
  missing = [hf for hf, *_ in table if hf not in tensors] + [k for k in pos_keys if k not in tensors]
  if missing:
    raise ValueError(f"{path}: tensors expected for flava but absent: {missing[:20]}")
  flat = {}
  for hf, ours, kind, tower in table:
    flat[tuple(ours.split("/"))] = np.asarray(fwd(kind, tensors[hf], _heads(config, tower)), np.float32)
  # BERT embeddings with token type 0 everywhere: word + (position + token_type[0]), then LayerNorm.
  pos = tensors[pos_keys[0]] + tensors[pos_keys[1]][0][None]
  flat[("txt", "pos_embedding", "pos_embedding")] = np.asarray(pos[None], np.float32)
  mask_key = "image_model.embeddings.mask_token"
  width = config["image_config"]["hidden_size"]
  flat[("img", "mask_token")] = np.asarray(tensors.get(mask_key, np.zeros((1, 1, width))), np.float32)
  used = {hf for hf, *_ in table} | set(pos_keys) | {mask_key} | set(_UNUSED_KEYS)
  unused = sorted(k for k in set(tensors) - used if not k.startswith(_UNUSED_PREFIXES))
  if unused:
    raise ValueError(f"{path}: tensors not used by the importer (unsupported layout?): {unused[:20]}")
  params = traverse_util.unflatten_dict(flat)
  if scan:
    for k in ("image", "text", "multimodal"):
      kwargs[k]["scan"] = True
    params = stack_encoder_blocks(params)
  return "flava", kwargs, params
