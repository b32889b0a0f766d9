"""Import of Hugging Face FuyuForCausalLM (Adept's Fuyu-8B: image patches -> one Linear -> Persimmon decoder)
into vlm.models.vision_lm.VisionLanguageModel with vision_model='fuyu_patches' (vlm.models.fuyu).

`import_hf_fuyu(path)` -> ('vision_lm', VisionLanguageModel kwargs, params float32) from config.json +
model.safetensors (or sharded); `vlm.convert.import_hf` dispatches here for model_type 'fuyu'. Never
unpickles. Keys are accepted in both layouts: `language_model.model.*`, `language_model.lm_head.*`,
`vision_embed_tokens.*` (what save_pretrained writes, and adept/fuyu-8b) and `model.language_model.*`,
`lm_head.*`, `model.vision_embed_tokens.*` (the in-memory module names of transformers >= 5).

What maps where (Persimmon decoder -> lm/..., a DecoderLM with norm_type='layer', qk_norm='layer',
rotary_fraction=partial_rotary_factor, mlp_act='relu2', all projections with biases):
- embed_tokens -> embedding; final_layernorm -> norm (scale, bias); lm_head -> head (untied).
- layers.i.{input,post_attention}_layernorm -> decoder/block_i/norm{1,2} (LayerNorm scale, bias).
- self_attn.query_key_value [3D, D] is fused per head: output row h * 3 hd + j * hd + c is channel c of
  head h of q (j=0), k (1), v (2) (HF's `_split_heads` views it as [N, 3, hd]); split into
  attn/{query,key,value} kernels [D, N, hd] and biases [N, hd]. dense -> attn/out [N, hd, D] + bias.
- self_attn.{q,k}_layernorm (LayerNorm over hd) -> attn/{query,key}_norm.
- mlp.dense_h_to_4h / dense_4h_to_h -> mlp/fc1 / fc2 (relu^2 between).
- vision_embed_tokens [D, p * p * C] -> vision/vision_embed (kernel [p * p * C, D], bias).

Config: config.json is read only through vlm.convert.hf_config, as transformers 5's FuyuConfig reads it: a
nested text_config (PersimmonConfig's defaults for the keys a 4.x file leaves out) or, when text_config is
absent or null (a flat file, as adept/fuyu-8b's), the Persimmon keys FuyuConfig.__post_init__ moves from
the top level (`FLAT_TEXT_KEYS`; a top-level partial_rotary_factor is not among them: 0.5). Head tying
is the top-level tie_word_embeddings (FuyuForCausalLM's), patch_size / num_channels / image_token_id are
top-level keys. Rotary: default rope only (ConfigError otherwise), theta and partial_rotary_factor from
rope_parameters (5.x) or rope_theta / partial_rotary_factor (4.x); PersimmonConfig's default theta is
10000 (FuyuConfig 4.x's default of 25000 applies only to a flat file that gives it). Values vlm cannot
express are ConfigErrors naming file, key and value.
"""

from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

from vlm.convert import hf_config
from vlm.convert.chameleon import default_rope, tied_head
from vlm.convert.common import fwd, stack_encoder_blocks
from vlm.convert.hf_config import HFConfig
from vlm.convert.registry import register_importer
from vlm.convert.safetensors_io import load_safetensors_dir

# FuyuConfig.__post_init__ (transformers 5): with text_config absent / null, these top-level keys become the
# text config (its SubConfigSpec init_kwargs + rope_scaling, rope_theta; tests/test_fuyu.py checks the list).
FLAT_TEXT_KEYS = (
  "vocab_size",
  "max_position_embeddings",
  "hidden_size",
  "intermediate_size",
  "num_hidden_layers",
  "num_attention_heads",
  "hidden_act",
  "initializer_range",
  "layer_norm_eps",
  "use_cache",
  "qk_layernorm",
  "hidden_dropout",
  "attention_dropout",
  "eos_token_id",
  "rope_scaling",
  "rope_theta",
)
# HF activation names -> our non-gated vlm.nn.mlp activations.
_ACT_FROM_HF = {
  "relu2": "relu2",
  "relu": "relu",
  "gelu": "gelu",
  "gelu_pytorch_tanh": "gelu_tanh",
  "gelu_new": "gelu_tanh",
  "silu": "silu",
  "quick_gelu": "quick_gelu",
}
# Stored prefix -> canonical prefix, per key layout (the first holding the embeddings wins).
_LAYOUTS = (
  {
    "language_model.model.": "model.",
    "language_model.lm_head.": "lm_head.",
    "vision_embed_tokens.": "vision_embed_tokens.",
  },
  {"model.language_model.": "model.", "lm_head.": "lm_head.", "model.vision_embed_tokens.": "vision_embed_tokens."},
)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def configs(config) -> tuple[HFConfig, HFConfig]:
  """(FuyuConfig, its Persimmon text config) as HFConfigs, from an HFConfig or a config.json dict (wrapped with
  hf_config.from_dict), the text config found as transformers 5's FuyuConfig finds it (module docstring)."""
  top = config if isinstance(config, HFConfig) else hf_config.from_dict(dict(config))
  if top.model_type != "fuyu":
    raise top.error("model_type", "expected 'fuyu'")
  if top.given("text_config") and top.raw["text_config"] is not None:
    tc = top["text_config"]
  else:  # a flat file: the Persimmon keys at the top level (named without a prefix in messages)
    flat = {k: top.raw[k] for k in FLAT_TEXT_KEYS if k in top.raw}
    tc = HFConfig(dict(flat, model_type="persimmon"), "persimmon", file=top.file, prefix="")
  if tc.model_type != "persimmon":
    raise tc.error("model_type", "Fuyu's decoder is 'persimmon'")
  return top, tc


def model_kwargs_from_hf_fuyu(config, tensors: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
  """VisionLanguageModel kwargs from an HF FuyuConfig (an HFConfig or a config.json dict; tensors, canonical
  keys, if given, decide the head tying as transformers does)."""
  top, tc = configs(config)
  act = tc.choice("hidden_act", _ACT_FROM_HF)
  width, heads = tc["hidden_size"], tc["num_attention_heads"]
  if width % heads:
    raise tc.error("hidden_size", f"not a multiple of num_attention_heads = {heads}")
  head_dim = width // heads  # PersimmonAttention's, whatever config.head_dim says
  if tc.given("head_dim") and tc["head_dim"] not in (None, head_dim):
    raise tc.error(
      "head_dim",
      f"!= hidden_size / num_attention_heads = {head_dim}: PersimmonAttention and its rotary embedding would disagree",
    )
  rp = default_rope(tc)
  fraction = float(rp["partial_rotary_factor"])
  patch = top["patch_size"]
  if isinstance(patch, dict):  # {"height": p, "width": p}
    patch = patch.get("height") if patch.get("height") == patch.get("width") else None
  elif isinstance(patch, (list, tuple)):
    patch = patch[0] if len(patch) == 2 and patch[0] == patch[1] else None
  if isinstance(patch, bool) or not isinstance(patch, int) or patch <= 0:
    raise top.error("patch_size", "expected a positive integer (square patches)")
  lm = dict(
    vocab_size=tc["vocab_size"],
    width=width,
    depth=tc["num_hidden_layers"],
    num_heads=heads,
    num_kv_heads=heads,
    head_dim=head_dim,
    mlp_dim=tc["intermediate_size"],
    mlp_act=act,
    qkv_bias=True,
    out_bias=True,
    mlp_bias=True,
    rope_theta=float(rp["rope_theta"]),
    norm_eps=float(tc["layer_norm_eps"]),
    norm_type="layer",
    qk_norm="layer" if tc["qk_layernorm"] else None,
    rotary_fraction=fraction,
    embed_scale=False,
    tie_embeddings=tied_head(top, tensors),
  )
  return dict(
    lm_config=lm,
    vision_config=dict(patch_size=int(patch), width=width),
    vision_model="fuyu_patches",
    vision_method="patch_features",
    connector_type="none",
    prefix_tokens=1,
    image_token_id=int(top["image_token_id"]),
  )


def _canonical(tensors: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str], list[str]]:
  """(tensors under canonical keys 'model.*' / 'lm_head.*' / 'vision_embed_tokens.*', the layout (stored
  prefix -> canonical prefix), stored keys outside it)."""
  layout = next((m for m in _LAYOUTS if f"{next(iter(m))}embed_tokens.weight" in tensors), None)
  if layout is None:
    raise ValueError(
      "not a FuyuForCausalLM checkpoint: no language_model.model.embed_tokens.weight or "
      f"model.language_model.embed_tokens.weight; keys: {sorted(tensors)[:10]}"
    )
  out, rest = {}, []
  for key, value in tensors.items():
    theirs = next((p for p in layout if key.startswith(p)), None)
    if theirs is None:
      rest.append(key)
    else:
      out[layout[theirs] + key[len(theirs) :]] = value
  return out, layout, rest


def _stored(layout: dict[str, str], key: str) -> str:
  """The checkpoint's name for a canonical key."""
  theirs = next(t for t, c in layout.items() if key.startswith(c))
  return theirs + key[len(layout[theirs]) :]


def _rows(lm: dict) -> list[tuple[str, str, str]]:
  """(canonical HF key, our path, layout) for every tensor but the fused query_key_value."""
  rows = [
    ("model.embed_tokens.weight", "lm/embedding/embedding", "id"),
    ("model.final_layernorm.weight", "lm/norm/scale", "id"),
    ("model.final_layernorm.bias", "lm/norm/bias", "id"),
    ("vision_embed_tokens.weight", "vision/vision_embed/kernel", "dense"),
    ("vision_embed_tokens.bias", "vision/vision_embed/bias", "id"),
  ]
  if not lm["tie_embeddings"]:
    rows.append(("lm_head.weight", "lm/head/kernel", "dense"))
  for i in range(lm["depth"]):
    h, o = f"model.layers.{i}", f"lm/decoder/block_{i}"
    for theirs, ours in (("input_layernorm", "norm1"), ("post_attention_layernorm", "norm2")) + (
      (("self_attn.q_layernorm", "attn/query_norm"), ("self_attn.k_layernorm", "attn/key_norm"))
      if lm["qk_norm"]
      else ()
    ):
      rows += [(f"{h}.{theirs}.weight", f"{o}/{ours}/scale", "id"), (f"{h}.{theirs}.bias", f"{o}/{ours}/bias", "id")]
    rows += [
      (f"{h}.self_attn.dense.weight", f"{o}/attn/out/kernel", "out"),
      (f"{h}.self_attn.dense.bias", f"{o}/attn/out/bias", "id"),
    ]
    for theirs, ours in (("dense_h_to_4h", "fc1"), ("dense_4h_to_h", "fc2")):
      rows += [
        (f"{h}.mlp.{theirs}.weight", f"{o}/mlp/{ours}/kernel", "dense"),
        (f"{h}.mlp.{theirs}.bias", f"{o}/mlp/{ours}/bias", "id"),
      ]
  return rows


def split_query_key_value(weight: np.ndarray, bias: np.ndarray, num_heads: int) -> dict[str, np.ndarray]:
  """Persimmon's fused query_key_value (weight [3 N hd, D], bias [3 N hd], per head [q; k; v]) -> our
  {query,key,value}/kernel [D, N, hd] and /bias [N, hd]."""
  d = weight.shape[1]
  if weight.shape[0] != 3 * d or bias.shape != (3 * d,):
    raise ValueError(
      f"query_key_value: weight {weight.shape} / bias {bias.shape}, expected ({3 * d}, {d}) / ({3 * d},)"
    )
  w = weight.reshape(num_heads, 3, d // num_heads, d)  # HF _split_heads: view(..., N, 3, hd)
  b = bias.reshape(num_heads, 3, d // num_heads)
  out = {}
  for j, name in enumerate(("query", "key", "value")):
    out[f"{name}/kernel"] = w[:, j].transpose(2, 0, 1)
    out[f"{name}/bias"] = b[:, j]
  return out


@register_importer("fuyu")
def import_hf_fuyu(path: str | Path, scan: bool = False) -> tuple[str, dict[str, Any], dict]:
  """HF FuyuForCausalLM directory -> ('vision_lm', VisionLanguageModel kwargs, params float32).

  Raises naming the tensors that are absent or left unused, and for what the model cannot express.
  scan: the LM in the scanned layout (lm_config scan_layers=True, lm/decoder/layers/... [depth, ...]).
  """
  path = Path(path)
  config = hf_config.read_config(path)
  configs(config)  # model_type checks before the tensors are read
  tensors, layout, rest = _canonical(load_safetensors_dir(path))
  kwargs = model_kwargs_from_hf_fuyu(config, tensors)
  lm = kwargs["lm_config"]
  rows = _rows(lm)
  qkv = [f"model.layers.{i}.self_attn.query_key_value.{w}" for i in range(lm["depth"]) for w in ("weight", "bias")]
  missing = [k for k in [r[0] for r in rows] + qkv if k not in tensors]
  if missing:
    raise ValueError(f"{path}: Fuyu tensors expected but absent: {[_stored(layout, k) for k in missing][:20]}")
  flat = {}
  for key, ours, kind in rows:
    flat[tuple(ours.split("/"))] = np.ascontiguousarray(
      fwd(kind, np.asarray(tensors[key], np.float32), lm["num_heads"]), np.float32
    )
  for i in range(lm["depth"]):
    h = f"model.layers.{i}.self_attn.query_key_value"
    parts = split_query_key_value(
      np.asarray(tensors[f"{h}.weight"], np.float32), np.asarray(tensors[f"{h}.bias"], np.float32), lm["num_heads"]
    )
    for name, x in parts.items():
      flat[("lm", "decoder", f"block_{i}", "attn") + tuple(name.split("/"))] = np.ascontiguousarray(x, np.float32)

  # Shapes the model cannot take: the patch projection's input is p * p * C.
  p, c, d = kwargs["vision_config"]["patch_size"], config["num_channels"], lm["width"]
  kernel = flat[("vision", "vision_embed", "kernel")]
  if kernel.shape != (p * p * c, d):
    raise ValueError(
      f"{path}: {_stored(layout, 'vision_embed_tokens.weight')} maps {kernel.shape[0]} -> "
      f"{kernel.shape[1]}; patch_size {p} x {p} x {c} channels -> hidden_size {d} needs "
      f"({p * p * c}, {d})"
    )

  used = {r[0] for r in rows} | set(qkv) | ({"lm_head.weight"} if lm["tie_embeddings"] else set())
  unused = rest + [_stored(layout, k) for k in tensors if k not in used and not k.endswith(_IGNORED_SUFFIXES)]
  if unused:
    raise ValueError(f"{path}: tensors not used by the Fuyu importer (unsupported layout?): {sorted(unused)[:20]}")
  params = traverse_util.unflatten_dict(flat)
  if scan:
    kwargs = dict(kwargs, lm_config=dict(lm, scan_layers=True))
    params = stack_encoder_blocks(params, names=("decoder",))
  return "vision_lm", kwargs, params
