"""Import of Hugging Face IDEFICS weights (transformers' models/idefics) into our Flamingo modules.

- `import_hf_idefics_perceiver`: IdeficsPerceiverResampler -> vlm.nn.perceiver.PerceiverResampler.
- `import_hf_idefics_gated_xattn`: IdeficsGatedCrossAttentionLayer -> GatedCrossAttentionBlock.
- `import_hf_idefics`: IdeficsForVisionText2Text / IdeficsModel -> ('flamingo', vlm.models.flamingo.Flamingo
  kwargs, params): vision tower, resampler, gated blocks and the Llama-style LM.

Sources: an HF directory (config.json + safetensors) or a state dict {key: torch tensor or array}
with the HF config (an IdeficsConfig or its dict). The module importers accept the module's own
state dict or that of a model holding it ('model.perceiver_resampler.*',
'model.gated_cross_attn_layers.{j}.*', with or without 'model.').

Where IDEFICS differs from the Flamingo paper, the kwargs select IDEFICS's choice:
  resampler  FFW: LayerNorm -> Linear -> ReLU -> Linear, hidden 4 x vision width (paper: squared
             ReLU) -> mlp_act='relu'; optional per-head qk LayerNorms
             (`qk_layer_norms_perceiver`) -> qk_norm='layer'; no time embeddings -> max_frames=None.
             Same as the paper: keys/values from [LN(media); LN(latents)], no biases, final LayerNorm.
  gated      RMSNorm pre-norms (paper: LayerNorm) -> norm='rms'; LlamaMLP FFW (gate/up/down, SiLU)
             -> mlp_act='swiglu', mlp_dim=intermediate_size; heads and head width of the LM;
             optional per-head RMSNorm of queries and keys (`qk_layer_norms`) -> qk_norm='rms';
             alpha_type 'float' (the paper's scalar gates) or 'vector' (per-channel) -> alpha_shape;
             alpha_initializer 'zeros' / 'ones' -> alpha_init 0 / 1 ('normal' has no fixed value: 0).
  model      the resampler reads the ViT's final tokens *before* its post_layernorm, class token
             included (-> vision final_norm=False, keep_cls=True); a gated block before LM layers
             0, k, 2k, ... (k = cross_layer_interval; HF needs depth % k == 0).
Not supported (ConfigError naming file, key and value): use_resampler=False (cross-attention to raw
ViT tokens), a non-default rope (rope_parameters / rope_scaling), activations vlm lacks, alpha_type
other than 'float' / 'vector', alpha_initializer other than transformers' ('zeros', 'ones', 'normal',
'gaussian', 'random').

Config: config.json is read only through vlm.convert.hf_config (the defaults of IdeficsConfig,
IdeficsVisionConfig and IdeficsPerceiverConfig for what a 4.x file leaves out); a config given with a
state dict may be an HFConfig, a transformers config or its dict. The resampler's LayerNorm eps is
transformers' fixed 1e-5 (nn.LayerNorm's default), the LM's and gated blocks' RMSNorm eps rms_norm_eps,
the vision tower's LayerNorm eps vision_config.layer_norm_eps. The head is tied as transformers ties
it: tie_word_embeddings and no lm_head (or one equal to the embedding).

Layouts (vlm.convert.common.fwd): `dense` torch [out, in] -> [in, out]; `qkv` [h*hd, D] -> [D, h, hd];
`out` [D, h*hd] -> [h, hd, D]; `alpha` [1] or [1, 1, D] -> [1] or [D].
"""

from typing import Any

import numpy as np
from flax import traverse_util

from vlm.convert.chameleon import default_rope, tied_head
from vlm.convert.common import (
  ACT_FROM_HF,
  GATED_FROM_HF,
  Row,
  as_config,
  encoder_rows,
  fwd,
  linear_rows,
  load_source,
  norm_rows,
  square_size,
)
from vlm.convert.hf_config import HFConfig
from vlm.convert.registry import register_importer

# IdeficsGatedCrossAttentionLayer's alpha_initializer -> our alpha_init ('normal' draws: 0, imported anyway).
_ALPHA_INIT = {"zeros": 0.0, "ones": 1.0, "normal": 0.0, "gaussian": 0.0, "random": 0.0}
RESAMPLER_NORM_EPS = 1e-5  # IdeficsPerceiverResampler's nn.LayerNorm default, not a config key


def _cfg(config: Any) -> HFConfig:
  """The IdeficsConfig as an HFConfig (a dict or transformers config is wrapped)."""
  c = as_config(config, "idefics")
  if c.model_type != "idefics":
    raise c.error("model_type", "expected 'idefics'")
  return c


# -- kwargs ---------------------------------------------------------------------------------------


def perceiver_kwargs_from_hf(config: Any) -> dict[str, Any]:
  """PerceiverResampler kwargs for an IdeficsConfig (its perceiver_config and vision_config)."""
  config = _cfg(config)
  pc, vc = config["perceiver_config"], config["vision_config"]
  return dict(
    num_latents=pc["resampler_n_latents"],
    depth=pc["resampler_depth"],
    num_heads=pc["resampler_n_heads"],
    head_dim=pc["resampler_head_dim"],
    mlp_dim=4 * vc["embed_dim"],
    mlp_act="relu",
    max_frames=None,
    qk_norm="layer" if pc["qk_layer_norms_perceiver"] else None,
    use_bias=False,
    norm_eps=RESAMPLER_NORM_EPS,
  )


def gated_xattn_kwargs_from_hf(config: Any) -> dict[str, Any]:
  """GatedCrossAttentionBlock kwargs for an IdeficsConfig."""
  config = _cfg(config)
  alpha_type = config.choice("alpha_type", ("float", "vector"))
  width, heads = config["hidden_size"], config["num_attention_heads"]
  return dict(
    num_heads=heads,
    head_dim=width // heads,
    mlp_dim=config["intermediate_size"],
    mlp_act=config.choice("hidden_act", GATED_FROM_HF),
    norm="rms",
    norm_eps=float(config["rms_norm_eps"]),
    qk_norm="rms" if config["qk_layer_norms"] else None,
    use_bias=False,
    alpha_shape="scalar" if alpha_type == "float" else "vector",
    alpha_init=config.choice("alpha_initializer", _ALPHA_INIT),
  )


# -- rows -----------------------------------------------------------------------------------------


def _join(prefix: str, name: str, sep: str) -> str:
  return f"{prefix}{sep}{name}" if prefix else name


def perceiver_rows(depth: int, qk_norm: bool, *, hf: str = "", ours: str = "") -> list[Row]:
  """IdeficsPerceiverResampler at HF prefix `hf` -> our PerceiverResampler at `ours`."""
  h_, o_ = (lambda n: _join(hf, n, ".")), (lambda n: _join(ours, n, "/"))
  rows = [(h_("latents"), o_("latents"), "id")] + norm_rows(h_("layer_norm"), o_("norm"))
  for i in range(depth):
    a, f, b = h_(f"blocks.{i}.0"), h_(f"blocks.{i}.1"), o_(f"block_{i}")
    rows += norm_rows(f"{a}.context_layer_norm", f"{b}/norm_media")
    rows += norm_rows(f"{a}.latents_layer_norm", f"{b}/norm_latents")
    for name, our in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
      rows += linear_rows(f"{a}.{name}", f"{b}/attn/{our}", "qkv", bias=False)
    rows += linear_rows(f"{a}.output_proj", f"{b}/attn/out", "out", bias=False)
    if qk_norm:
      rows += norm_rows(f"{a}.q_layer_norm", f"{b}/attn/query_norm")
      rows += norm_rows(f"{a}.k_layer_norm", f"{b}/attn/key_norm")
    rows += norm_rows(f"{f}.ln", f"{b}/norm_mlp")
    rows += linear_rows(f"{f}.fc", f"{b}/mlp/fc1", bias=False) + linear_rows(f"{f}.c_proj", f"{b}/mlp/fc2", bias=False)
  return rows


def gated_xattn_rows(qk_norm: bool, *, hf: str = "", ours: str = "") -> list[Row]:
  """IdeficsGatedCrossAttentionLayer at HF prefix `hf` -> our GatedCrossAttentionBlock at `ours`."""
  h_, o_ = (lambda n: _join(hf, n, ".")), (lambda n: _join(ours, n, "/"))
  rows = [
    (h_("alpha_cross_attn"), o_("alpha_attn"), "alpha"),
    (h_("alpha_dense"), o_("alpha_ffw"), "alpha"),
    (h_("input_layernorm.weight"), o_("norm_attn/scale"), "id"),
    (h_("post_attention_layernorm.weight"), o_("norm_ffw/scale"), "id"),
  ]
  for name, our in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
    rows += linear_rows(h_(f"cross_attn.{name}"), o_(f"attn/{our}"), "qkv", bias=False)
  rows += linear_rows(h_("cross_attn.o_proj"), o_("attn/out"), "out", bias=False)
  if qk_norm:
    rows += [
      (h_("cross_attn.q_layer_norm.weight"), o_("attn/query_norm/scale"), "id"),
      (h_("cross_attn.k_layer_norm.weight"), o_("attn/key_norm/scale"), "id"),
    ]
  for name, our in (("gate_proj", "wi_0"), ("up_proj", "wi_1"), ("down_proj", "wo")):
    rows += linear_rows(h_(f"mlp.{name}"), o_(f"mlp/{our}"), bias=False)
  return rows


def _apply_rows(tensors: dict[str, np.ndarray], rows: list[Row], heads: dict[str, int], what: str) -> dict:
  """Flat params {path tuple: float32 array}; heads maps an our-path prefix to its head count."""
  missing = [hf for hf, _, _ in rows if hf not in tensors]
  if missing:
    raise ValueError(f"{what}: tensors expected but absent: {missing[:20]}")
  flat = {}
  for hf, ours, kind in rows:
    x = np.asarray(tensors[hf], np.float32)
    if kind == "alpha":
      x = x.reshape(-1)
    else:
      x = fwd(kind, x, next((n for prefix, n in heads.items() if ours.startswith(prefix)), 1))
    flat[tuple(ours.split("/"))] = np.ascontiguousarray(x, np.float32)
  return flat


def _find_prefix(tensors: dict[str, np.ndarray], marker: str, candidates: tuple[str, ...], what: str) -> str:
  for c in candidates:
    if _join(c, marker, ".") in tensors:
      return c
  raise ValueError(f"{what}: no {marker!r} under any of the prefixes {candidates}; keys: {sorted(tensors)[:10]}")


# -- importers ------------------------------------------------------------------------------------


def import_hf_idefics_perceiver(source, config=None) -> tuple[dict[str, Any], dict]:
  """IdeficsPerceiverResampler weights -> (PerceiverResampler kwargs, params)."""
  tensors, config = load_source(source, config)
  kw = perceiver_kwargs_from_hf(config)
  hf = _find_prefix(
    tensors, "latents", ("", "perceiver_resampler", "model.perceiver_resampler"), "IdeficsPerceiverResampler"
  )
  depth = kw["depth"]
  rows = perceiver_rows(depth, kw["qk_norm"] is not None, hf=hf)
  return kw, traverse_util.unflatten_dict(
    _apply_rows(tensors, rows, {"": kw["num_heads"]}, "IdeficsPerceiverResampler")
  )


def import_hf_idefics_gated_xattn(source, config=None, index: int = 0) -> tuple[dict[str, Any], dict]:
  """IdeficsGatedCrossAttentionLayer weights (the `index`-th of a model) -> (GatedCrossAttentionBlock kwargs,
  params)."""
  tensors, config = load_source(source, config)
  kw = gated_xattn_kwargs_from_hf(config)
  hf = _find_prefix(
    tensors,
    "alpha_cross_attn",
    ("", f"gated_cross_attn_layers.{index}", f"model.gated_cross_attn_layers.{index}"),
    "IdeficsGatedCrossAttentionLayer",
  )
  rows = gated_xattn_rows(kw["qk_norm"] is not None, hf=hf)
  return kw, traverse_util.unflatten_dict(
    _apply_rows(tensors, rows, {"": kw["num_heads"]}, "IdeficsGatedCrossAttentionLayer")
  )


def flamingo_kwargs_from_hf(config: Any, tensors: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
  """vlm.models.flamingo.Flamingo kwargs for an IdeficsConfig (an HFConfig, a transformers config or a dict;
  tensors, if given, decide the LM's head tying as transformers does)."""
  config = _cfg(config)
  vc = config["vision_config"]
  if not config["use_resampler"]:
    raise config.error(
      "use_resampler", "cross-attention to the raw ViT tokens is not supported: our Flamingo always resamples"
    )
  depth, every = config["num_hidden_layers"], config["cross_layer_interval"]
  if isinstance(every, bool) or not isinstance(every, int) or every <= 0 or depth % every:
    raise config.error("cross_layer_interval", f"needs a positive divisor of num_hidden_layers = {depth}")
  size, patch = square_size(vc, "image_size"), square_size(vc, "patch_size")
  vision = dict(
    width=vc["embed_dim"],
    depth=vc["num_hidden_layers"],
    mlp_dim=vc["intermediate_size"],
    num_heads=vc["num_attention_heads"],
    patch_size=patch,
    class_token=True,
    posemb="learn",
    posemb_grid=(size // patch,) * 2,
    pre_norm=True,
    patch_bias=False,
    final_norm=False,
    norm_eps=float(vc["layer_norm_eps"]),
    mlp_act=vc.choice("hidden_act", ACT_FROM_HF),
  )
  width, heads = config["hidden_size"], config["num_attention_heads"]
  if width % heads:
    raise config.error("hidden_size", f"not a multiple of num_attention_heads = {heads}")
  vocab = config["vocab_size"] + config["additional_vocab_size"]
  if tensors is not None and "model.embed_tokens.weight" not in tensors and "embed_tokens.weight" in tensors:
    tie = True  # an IdeficsModel (no head): our logits use the embedding
  else:
    tie = tied_head(config, tensors)  # IdeficsForVisionText2Text (additional_fc merged into lm_head)
  lm = dict(
    vocab_size=vocab,
    width=width,
    depth=depth,
    num_heads=heads,
    num_kv_heads=heads,
    head_dim=width // heads,
    mlp_dim=config["intermediate_size"],
    mlp_act=config.choice("hidden_act", GATED_FROM_HF),
    rope_theta=float(default_rope(config)["rope_theta"]),
    norm_eps=float(config["rms_norm_eps"]),
    tie_embeddings=tie,
  )
  return dict(
    lm_config=lm,
    vision_config=vision,
    resampler_config=perceiver_kwargs_from_hf(config),
    xattn_config=gated_xattn_kwargs_from_hf(config),
    cross_attention_every=every,
    keep_cls=True,
  )


def _merge_decoupled(tensors: dict[str, np.ndarray], p: str) -> dict[str, np.ndarray]:
  """IdeficsDecoupledEmbedding / Linear: the additional rows (additional_vocab_size) appended to the vocabulary."""
  out = dict(tensors)
  extra = out.pop(f"{p}embed_tokens.additional_embedding.weight", None)
  if extra is not None:
    out[f"{p}embed_tokens.weight"] = np.concatenate([out[f"{p}embed_tokens.weight"], extra], axis=0)
  extra = out.pop("lm_head.additional_fc.weight", None)
  if extra is not None and "lm_head.weight" in out:
    out["lm_head.weight"] = np.concatenate([out["lm_head.weight"], extra], axis=0)
  return out


@register_importer("idefics")  # Flamingo-style; the <image> id is the tokenizer's
def import_hf_idefics(
  source,
  config=None,
  *,
  scan: bool = False,
  image_token_id: int | None = None,
  eod_token_id: int | None = None,
) -> tuple[str, dict[str, Any], dict]:
  """IdeficsForVisionText2Text (or IdeficsModel) -> ('flamingo', Flamingo kwargs, params float32).

  image_token_id / eod_token_id: the tokenizer's `<image>` and end-of-document ids (not in the model's
  config; IdeficsProcessor resets the image attention after the EOS token): added to the kwargs if given.
  scan: Flamingo's LM has no scanned layout, scan=True raises NotImplementedError (vlm.convert.import_hf
  passes its scan).

  The vision tower's post_layernorm (which IDEFICS applies to the pooled CLS only, never to what the
  resampler reads) is not imported. Raises listing tensors that were not used.
  """
  if scan:
    raise NotImplementedError("Flamingo's LM has no scanned layout; import IDEFICS with scan=False")
  tensors, config = load_source(source, config)
  p = "model." if "model.embed_tokens.weight" in tensors else ""
  tensors = _merge_decoupled(tensors, p)
  kw = flamingo_kwargs_from_hf(config, tensors)
  for key, value in (("image_token_id", image_token_id), ("eod_token_id", eod_token_id)):
    if value is not None:
      kw[key] = value
  lm, vis, res, xa = kw["lm_config"], kw["vision_config"], kw["resampler_config"], kw["xattn_config"]
  v = f"{p}vision_model"
  rows = [
    (f"{v}.embeddings.class_embedding", "vision/cls", "cls"),
    (f"{v}.embeddings.patch_embedding.weight", "vision/embedding/conv/kernel", "conv"),
    (f"{v}.embeddings.position_embedding.weight", "vision/pos_embedding/pos_embedding", "batch1"),
  ]
  rows += norm_rows(f"{v}.pre_layrnorm", "vision/pre_norm")
  rows += encoder_rows(f"{v}.encoder", "vision/encoder", vis["depth"])
  rows += perceiver_rows(res["depth"], res["qk_norm"] is not None, hf=f"{p}perceiver_resampler", ours="resampler")
  for j in range(lm["depth"] // kw["cross_attention_every"]):
    rows += gated_xattn_rows(xa["qk_norm"] is not None, hf=f"{p}gated_cross_attn_layers.{j}", ours=f"xattn_{j}")
  rows += [(f"{p}embed_tokens.weight", "lm/embedding/embedding", "id"), (f"{p}norm.weight", "lm/norm/scale", "id")]
  if not lm["tie_embeddings"]:
    rows.append(("lm_head.weight", "lm/head/kernel", "dense"))
  for i in range(lm["depth"]):
    h, o = f"{p}layers.{i}", f"lm/decoder/block_{i}"
    rows += [
      (f"{h}.input_layernorm.weight", f"{o}/norm1/scale", "id"),
      (f"{h}.post_attention_layernorm.weight", f"{o}/norm2/scale", "id"),
    ]
    for a, b in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
      rows += linear_rows(f"{h}.self_attn.{a}", f"{o}/attn/{b}", "qkv", bias=False)
    rows += linear_rows(f"{h}.self_attn.o_proj", f"{o}/attn/out", "out", bias=False)
    for a, b in (("gate_proj", "wi_0"), ("up_proj", "wi_1"), ("down_proj", "wo")):
      rows += linear_rows(f"{h}.mlp.{a}", f"{o}/mlp/{b}", bias=False)
  heads = {
    "vision/": vis["num_heads"],
    "resampler/": res["num_heads"],
    "xattn_": xa["num_heads"],
    "lm/": lm["num_heads"],
  }
  flat = _apply_rows(tensors, rows, heads, "IdeficsForVisionText2Text")
  used = {hf for hf, _, _ in rows} | {f"{v}.post_layernorm.weight", f"{v}.post_layernorm.bias"}
  if lm["tie_embeddings"]:
    used.add("lm_head.weight")
  unused = sorted(k for k in set(tensors) - used if not k.endswith(("rotary_emb.inv_freq", "position_ids")))
  if unused:
    raise ValueError(f"IdeficsForVisionText2Text: tensors not used by the importer: {unused[:20]}")
  return "flamingo", kw, traverse_util.unflatten_dict(flat)


__all__ = [
  "flamingo_kwargs_from_hf",
  "gated_xattn_kwargs_from_hf",
  "gated_xattn_rows",
  "import_hf_idefics",
  "import_hf_idefics_gated_xattn",
  "import_hf_idefics_perceiver",
  "perceiver_kwargs_from_hf",
  "perceiver_rows",
]
