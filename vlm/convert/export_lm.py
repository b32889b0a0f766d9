"""Export of DecoderLM (Llama / Qwen2 / Gemma) and VisionLanguageModel (LLaVA 1.5 / LLaVA-NeXT) to
Hugging Face format: config.json + model.safetensors that `transformers` loads with `from_pretrained`
(LlamaForCausalLM / Qwen2ForCausalLM / GemmaForCausalLM, LlavaForConditionalGeneration /
LlavaNextForConditionalGeneration) with no missing or unexpected keys, and the same logits.

    export_hf_llm(kwargs, params, path)           # DecoderLM kwargs + params
    export_hf_llava(kwargs, params, path)         # VisionLanguageModel kwargs + params
    export_hf_lm(name, kwargs, params, path)      # dispatch: export_hf_lm(*import_hf(src), dst) round-trips

config.json holds every architecture field from the model exported, none guessed: sizes, heads, head_dim,
activation (hidden_act; Gemma also hidden_activation, so transformers 4.39-4.47 read the same),
rms_norm_eps, rope_theta + scaling (5.x `rope_parameters` and the 4.x `rope_theta` / `rope_scaling`
spellings, equal), tie_word_embeddings, biases (attention_bias, mlp_bias), vocab; for LLaVA the vision
tower (CLIP or SigLIP: hidden_act, layer_norm_eps, image / patch size, num_channels from the patch
kernel), image_token_index, vision_feature_layer / strategy, projector, image_grid_pinpoints. The model
type follows from the kwargs: embed_scale (+ the (1 + w) RMSNorm) is Gemma, q/k/v biases without an
output bias Qwen2, else Llama (attention_bias = the q/k/v/o biases, mlp_bias); `model_type=` may force
one, and what the chosen type cannot express raises naming the field (qk_norm, LayerNorm, partial rotary,
swin_norm, a non-gated MLP, no rope, ...). Weights are written in the layout this transformers'
save_pretrained writes (LLaVA: language_model.model.*, vision_tower.*, multi_modal_projector.*).

max_position_embeddings is not a DecoderLM field and changes no logits except for the 'dynamic' rope
(where it is rope_scaling's): pass it to record it, otherwise it is left out of config.json (dynamic:
written from rope_scaling). `extra_config` adds non-architecture keys (token ids, ...) to the (text)
config; an architecture key there is refused.

Scanned models (DecoderLM scan_layers=True, a ViT with scan=True: params decoder/layers/...,
encoder/layers/... stacked on a leading depth axis) are unstacked first; the files are the same.

LoRA: params fine-tuned with LoRA (`lora_a` / `lora_b` leaves, vlm.peft) are merged first when `peft`
(the trainer's config.peft, or dict(alpha=...)) is given: vlm.peft.merge_lora(params, alpha, rank).
Without it such params are refused, as are adapters and any other parameter HF has no place for.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from vlm.convert import llm
from vlm.convert.common import ACT_TO_HF, inv, lm_table, unstack_encoder_blocks, vision_tower_rows
from vlm.convert.hf import with_posemb_grid
from vlm.convert.registry import register_exporter
from vlm.convert.safetensors_io import save_safetensors_dir
from vlm.tree import flatten
from vlm.nn import rope as rope_lib

LM_TYPES = llm.MODEL_TYPES
_ARCHITECTURES = {
  "llama": "LlamaForCausalLM",
  "qwen2": "Qwen2ForCausalLM",
  "gemma": "GemmaForCausalLM",
  "llava": "LlavaForConditionalGeneration",
  "llava_next": "LlavaNextForConditionalGeneration",
}
_GATED_TO_HF = {"swiglu": "silu", "geglu": "gelu_pytorch_tanh"}
# DecoderLM fields and the only value each HF layout has for them.
_FIXED = dict(norm_type="rms", qk_norm=None, rotary_fraction=1.0, swin_norm=False)
_IGNORED = ("dropout", "remat_policy", "scan_layers", "dtype")  # training / compute settings, not architecture


def _flat(params) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in flatten(params).items()}


def _merge_peft(params, peft: Mapping | None):
  """Params with LoRA folded in (vlm.peft.merge_lora) when `peft` is given; otherwise refuses LoRA leaves."""
  from vlm import peft as peft_lib

  params = jax.tree.map(np.asarray, nn.meta.unbox(params))
  has_lora = any(k.rsplit("/", 1)[-1] in peft_lib.LORA_PARAMS for k in _flat(params))
  if not has_lora:
    return params
  if peft is None:
    raise ValueError(
      "export: the params hold LoRA leaves (lora_a / lora_b): pass peft=config.peft (or "
      "dict(alpha=...)) to merge them, or merge first with vlm.peft.merge_lora(params, alpha)"
    )
  return peft_lib.merge_lora(params, float(peft["alpha"]), peft.get("rank"))


def _unstack(params):
  """Params in the unrolled layout: scanned stacks (a ViT's encoder/layers, a DecoderLM's decoder/layers, with
  scan / scan_layers=True) become block_{i} (vlm.convert.unstack_encoder_blocks); unrolled ones pass."""
  return unstack_encoder_blocks(params, names=("encoder", "decoder"))


def _model_type(kw: Mapping[str, Any], model_type: str | None) -> str:
  """The HF decoder type whose layout is DecoderLM's kwargs (or a check of the forced one)."""
  if model_type is None:
    if kw.get("embed_scale", False):
      model_type = "gemma"
    elif kw.get("qkv_bias", False) and not kw.get("out_bias", False) and not kw.get("mlp_bias", False):
      model_type = "qwen2"
    else:
      model_type = "llama"
  if model_type not in LM_TYPES:
    raise ValueError(f"export: model_type {model_type!r}; supported: {LM_TYPES}")
  return model_type


def hf_config_from_llm_kwargs(
  kwargs: Mapping[str, Any],
  model_type: str | None = None,
  *,
  max_position_embeddings: int | None = None,
  extra_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """The config.json of a DecoderLM (kwargs as vlm.models.DecoderLM takes them); ValueError naming the field
  the HF type cannot express."""
  from vlm.models.decoder import DecoderLM

  known = {f for f in DecoderLM.__dataclass_fields__ if f not in ("parent", "name")}
  unknown = set(kwargs) - known
  if unknown:
    raise ValueError(f"export: {sorted(unknown)} are not DecoderLM fields")
  kw = {f: kwargs.get(f, DecoderLM.__dataclass_fields__[f].default) for f in known}
  mt = _model_type(kw, model_type)

  def refuse(field, why):
    raise ValueError(f"export to {mt}: DecoderLM {field}={kw[field]!r} {why}")

  for field, value in _FIXED.items():
    if kw[field] != value:
      refuse(field, f"is not expressible (HF {mt} has only {value!r})")
  if kw["rope_theta"] is None:
    refuse("rope_theta", "(no rotary embedding) is not expressible")
  if kw["mlp_act"] not in _GATED_TO_HF:
    refuse("mlp_act", f"is not expressible: a gated MLP {sorted(_GATED_TO_HF)}")
  if mt == "gemma":
    if not kw["embed_scale"]:
      refuse("embed_scale", "must be True (Gemma scales the embeddings by sqrt(hidden_size))")
    if kw["qkv_bias"] != kw["out_bias"] or kw["mlp_bias"]:
      refuse(
        "qkv_bias",
        f"/ out_bias={kw['out_bias']} / mlp_bias={kw['mlp_bias']}: Gemma has attention_bias "
        "on q/k/v/o together and no MLP bias",
      )
  elif kw["embed_scale"]:
    refuse("embed_scale", "is Gemma's (pass model_type='gemma')")
  elif mt == "qwen2":
    if not kw["qkv_bias"] or kw["out_bias"] or kw["mlp_bias"]:
      refuse("qkv_bias", f"/ out_bias={kw['out_bias']} / mlp_bias={kw['mlp_bias']}: Qwen2 has q/k/v biases only")
  elif kw["qkv_bias"] != kw["out_bias"]:
    refuse("qkv_bias", f"with out_bias={kw['out_bias']}: Llama's attention_bias covers q/k/v/o together")
  heads = kw["num_heads"]
  head_dim = kw["head_dim"] or kw["width"] // heads
  act = _GATED_TO_HF[kw["mlp_act"]]
  scaling = kw["rope_scaling"]
  rp = dict(rope_lib.scaling_to_hf(scaling), rope_theta=float(kw["rope_theta"]))
  config = dict(
    model_type=mt,
    architectures=[_ARCHITECTURES[mt]],
    vocab_size=kw["vocab_size"],
    hidden_size=kw["width"],
    intermediate_size=kw["mlp_dim"],
    num_hidden_layers=kw["depth"],
    num_attention_heads=heads,
    num_key_value_heads=kw["num_kv_heads"] or heads,
    head_dim=head_dim,
    hidden_act=act,
    rms_norm_eps=float(kw["norm_eps"]),
    tie_word_embeddings=bool(kw["tie_embeddings"]),
    rope_parameters=rp,
    rope_theta=rp["rope_theta"],
    rope_scaling=None if scaling is None else {k: v for k, v in rp.items() if k != "rope_theta"},
    dtype="float32",
  )
  if mt == "llama":
    config.update(attention_bias=bool(kw["qkv_bias"]), mlp_bias=bool(kw["mlp_bias"]))
  elif mt == "gemma":
    config.update(attention_bias=bool(kw["qkv_bias"]), hidden_activation=act, use_bidirectional_attention=False)
  else:
    config.update(use_sliding_window=False, sliding_window=None, layer_types=["full_attention"] * kw["depth"])
  if scaling is not None and scaling["rope_type"] == "dynamic":
    m = int(scaling["max_position_embeddings"])
    if max_position_embeddings not in (None, m):
      raise ValueError(
        f"export: max_position_embeddings={max_position_embeddings} but the dynamic rope_scaling has {m}"
      )
    max_position_embeddings = m
  if max_position_embeddings is not None:
    config["max_position_embeddings"] = int(max_position_embeddings)
  for key, value in (extra_config or {}).items():
    if key in config:
      raise ValueError(f"export: extra_config[{key!r}] would override the architecture field {key!r}")
    config[key] = value
  return config


def _lm_tensors(kw: Mapping[str, Any], flat: dict[str, np.ndarray], mt: str) -> dict[str, np.ndarray]:
  """HF tensors (canonical 'model.*' / 'lm_head.*') from a DecoderLM's flat params (popped from `flat`)."""
  tensors = {}
  for hf, ours, kind, _ in lm_table(kw):
    if ours not in flat:
      raise ValueError(f"export: parameter {ours!r} (for {hf!r}) is absent")
    x = np.asarray(flat.pop(ours), np.float32)
    if kind == "norm":
      x = x - np.float32(1.0) if mt == "gemma" else x  # Gemma stores w for its (1 + w) RMSNorm
    else:
      x = inv(kind, x, (-1,))
    tensors[hf] = np.ascontiguousarray(x, np.float32)
  return tensors


def _leftover(flat: Mapping[str, Any], what: str) -> None:
  if flat:
    raise ValueError(
      f"export: {what} parameters that the HF model has no place for (adapters? soft prompts?): {sorted(flat)[:20]}"
    )


def export_hf_llm(
  kwargs: Mapping[str, Any],
  params,
  path: str | Path,
  *,
  model_type: str | None = None,
  max_position_embeddings: int | None = None,
  extra_config: Mapping[str, Any] | None = None,
  peft: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """Writes a DecoderLM (kwargs, params) as an HF Llama / Qwen2 / Gemma causal-LM directory; returns its config."""
  config = hf_config_from_llm_kwargs(
    kwargs, model_type, max_position_embeddings=max_position_embeddings, extra_config=extra_config
  )
  flat = _flat(_unstack(_merge_peft(params, peft)))
  tensors = _lm_tensors(dict(kwargs, tie_embeddings=config["tie_word_embeddings"]), flat, config["model_type"])
  _leftover(flat, "DecoderLM")
  save_safetensors_dir(tensors, path, config)
  return config


# ----------------------------------------------------------------------------------------------- LLaVA


def _vision_config(vit: Mapping[str, Any], flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """The HF CLIP / SigLIP vision config of VisionLanguageModel's ViT (kwargs + its params under 'vision/')."""
  from vlm.models.vit import ViT

  d = ViT(**vit).dims()

  def get(k):
    return vit.get(k, ViT.__dataclass_fields__[k].default)

  if get("posemb") != "learn" or not get("posemb_grid"):
    raise ValueError(
      f"export: vision posemb={get('posemb')!r}, posemb_grid={get('posemb_grid')!r}: HF towers have a "
      "learned position grid (posemb='learn' with posemb_grid)"
    )
  gh, gw = get("posemb_grid")
  ph, pw = d["patch_size"]
  if gh != gw or ph != pw:
    raise ValueError(f"export: vision posemb_grid {(gh, gw)} / patch_size {(ph, pw)}: only square images")
  if get("out_dim") is not None:
    raise ValueError(f"export: vision out_dim={get('out_dim')!r} is not expressible (HF: None)")
  clip = bool(get("class_token"))
  if clip != bool(get("pre_norm")) or clip == bool(get("patch_bias")):
    raise ValueError(
      f"export: vision class_token={get('class_token')}, pre_norm={get('pre_norm')}, "
      f"patch_bias={get('patch_bias')}: a CLIP tower has (True, True, False), a SigLIP one "
      "(False, False, True)"
    )
  act = get("mlp_act")
  if act not in ACT_TO_HF:
    raise ValueError(f"export: vision mlp_act={act!r}; expressible: {sorted(ACT_TO_HF)}")
  kernel = flat.get("vision/embedding/conv/kernel")
  if kernel is None:
    raise ValueError("export: parameter 'vision/embedding/conv/kernel' is absent")
  vc = dict(
    model_type="clip_vision_model" if clip else "siglip_vision_model",
    hidden_size=d["width"],
    intermediate_size=d["mlp_dim"],
    num_hidden_layers=d["depth"],
    num_attention_heads=d["num_heads"],
    hidden_act=ACT_TO_HF[act],
    layer_norm_eps=float(get("norm_eps")),
    image_size=gh * ph,
    patch_size=ph,
    num_channels=int(kernel.shape[2]),
    attention_dropout=0.0,
  )
  if not clip:
    vc["vision_use_head"] = False  # LLaVA never runs the MAP head
  return vc


def hf_config_from_llava_kwargs(
  kwargs: Mapping[str, Any],
  params,
  *,
  text_model_type: str | None = None,
  max_position_embeddings: int | None = None,
  extra_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """The config.json of a VisionLanguageModel in LLaVA's layout (its params give num_channels)."""
  flat = _flat(params)
  for field, value in (
    ("vision_model", "vit"),
    ("pool", None),
    ("connector_type", "mlp"),
    ("prefix_tokens", 1),
    ("num_soft_prompts", 0),
    ("video_token_id", None),  # LLaVA-NeXT-Video: imported (vlm.convert.llava), not exported
    ("video_pool", None),
  ):
    if kwargs.get(field, value) != value:
      raise ValueError(
        f"export to LLaVA: VisionLanguageModel {field}={kwargs[field]!r} is not expressible (LLaVA: {value!r})"
      )
  vit = with_posemb_grid(dict(kwargs["vision_config"]), flat.get("vision/pos_embedding/pos_embedding"))
  vc = _vision_config(vit, flat)
  depth = vc["num_hidden_layers"]
  layer = kwargs.get("feature_layer")
  if layer is None or not -depth <= layer < 0:
    raise ValueError(
      f"export to LLaVA: feature_layer={layer!r}: LLaVA takes a block output (-depth..-1); None "
      "(the final-normed encoder output) is not expressible"
    )
  clip = vc["model_type"] == "clip_vision_model"
  strategy = "full" if kwargs.get("keep_cls", False) or not clip else "default"
  grid = vit["posemb_grid"][0]
  tc = hf_config_from_llm_kwargs(
    kwargs["lm_config"], text_model_type, max_position_embeddings=max_position_embeddings, extra_config=extra_config
  )
  anyres = kwargs.get("anyres")
  mt = "llava" if anyres is None else "llava_next"
  config = dict(
    model_type=mt,
    architectures=[_ARCHITECTURES[mt]],
    vision_config=vc,
    text_config=tc,
    image_token_index=int(kwargs["image_token_id"]),
    projector_hidden_act="gelu",
    multimodal_projector_bias=True,
    vision_feature_layer=int(layer),
    vision_feature_select_strategy=strategy,
    tie_word_embeddings=tc["tie_word_embeddings"],
    image_seq_length=grid * grid + (strategy == "full" and clip),
    dtype="float32",
  )
  if anyres is not None:
    if strategy != "default" and clip:
      raise ValueError(
        "export to LLaVA-NeXT: keep_cls with a CLIP tower is not expressible (the tiles' features form a grid)"
      )
    if int(anyres["tile_size"]) != vc["image_size"] or int(anyres["patch_grid"]) != grid:
      raise ValueError(
        f"export to LLaVA-NeXT: anyres tile_size={anyres['tile_size']}, patch_grid="
        f"{anyres['patch_grid']} must be the tower's image_size {vc['image_size']} and grid {grid}"
      )
    config["image_grid_pinpoints"] = [[int(h), int(w)] for h, w in anyres["grid_pinpoints"]]
  return config


def export_hf_llava(
  kwargs: Mapping[str, Any],
  params,
  path: str | Path,
  *,
  text_model_type: str | None = None,
  max_position_embeddings: int | None = None,
  extra_config: Mapping[str, Any] | None = None,
  peft: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """Writes a VisionLanguageModel (LLaVA layout: CLIP / SigLIP ViT, 'mlp' connector, DecoderLM; with `anyres`
  LLaVA-NeXT) as an HF Llava(Next)ForConditionalGeneration directory; returns its config."""
  params = _unstack(_merge_peft(params, peft))
  flat = _flat(params)
  config = hf_config_from_llava_kwargs(
    kwargs,
    params,
    text_model_type=text_model_type,
    max_position_embeddings=max_position_embeddings,
    extra_config=extra_config,
  )
  vc, tc = config["vision_config"], config["text_config"]
  tensors = {}
  # Language model: language_model.model.* / language_model.lm_head.* (what this transformers saves).
  lm_flat = {k[len("lm/") :]: flat.pop(k) for k in list(flat) if k.startswith("lm/")}
  lm_kw = dict(kwargs["lm_config"], tie_embeddings=tc["tie_word_embeddings"])
  for key, x in _lm_tensors(lm_kw, lm_flat, tc["model_type"]).items():
    tensors["language_model." + key] = x
  _leftover(lm_flat, "lm")
  # Vision tower: vision_tower.* (our encoder_norm = post_layernorm; the identity if final_norm=False).
  width = vc["hidden_size"]
  if "vision/encoder_norm/scale" not in flat:
    flat["vision/encoder_norm/scale"] = np.ones((width,), np.float32)
    flat["vision/encoder_norm/bias"] = np.zeros((width,), np.float32)
  for hf, ours, kind in vision_tower_rows(vc):
    key = "vision/" + ours
    if key not in flat:
      raise ValueError(f"export: parameter {key!r} (for {hf!r}) is absent")
    x = flat.pop(key)
    shape = {"qkv_bias": (-1,), "cls": (-1,), "batch1": x.shape[1:]}.get(kind)
    tensors["vision_tower." + hf[len("vision_model.") :]] = np.ascontiguousarray(inv(kind, x, shape), np.float32)
  # Projector and LLaVA-NeXT's newline.
  for i in (1, 2):
    for ours, hf, kind in (("kernel", "weight", "dense"), ("bias", "bias", "id")):
      key = f"connector/fc{i}/{ours}"
      if key not in flat:
        raise ValueError(f"export: parameter {key!r} is absent")
      tensors[f"multi_modal_projector.linear_{i}.{hf}"] = np.ascontiguousarray(
        inv(kind, flat.pop(key), None), np.float32
      )
  if config["model_type"] == "llava_next":
    if "anyres/image_newline" not in flat:
      raise ValueError("export: parameter 'anyres/image_newline' is absent")
    tensors["image_newline"] = np.asarray(flat.pop("anyres/image_newline"), np.float32)
  _leftover(flat, "VisionLanguageModel")
  save_safetensors_dir(tensors, path, config)
  return config


def export_hf_lm(name: str, kwargs: Mapping[str, Any], params, path: str | Path, **options) -> dict[str, Any]:
  """Dispatch by vlm model name (what vlm.convert.import_hf returns first): 'decoder_lm' -> export_hf_llm,
  'vision_lm' -> export_hf_llava (LLaVA / LLaVA-NeXT layouts). options: those functions' keywords."""
  if name == "decoder_lm":
    return export_hf_llm(kwargs, params, path, **options)
  if name == "vision_lm":
    return export_hf_llava(kwargs, params, path, **options)
  raise ValueError(
    f"export_hf_lm: model {name!r}; supported: 'decoder_lm', 'vision_lm' (two-tower CLIP / SigLIP: "
    "vlm.convert.hf.export_hf)"
  )


@register_exporter("decoder_lm")
def export_decoder_lm_run(config, params, out: str | Path, *, model_type: str | None = None, peft=None) -> dict:
  """vlm.export of a decoder_lm run (export_hf_llm; model_type forces the HF type)."""
  return export_hf_llm(config.model.to_dict(), params, out, model_type=model_type, peft=peft)


@register_exporter("vision_lm")
def export_vision_lm_run(config, params, out: str | Path, *, model_type: str | None = None, peft=None) -> dict:
  """vlm.export of a vision_lm run (export_hf_llava; model_type is the text model's HF type)."""
  return export_hf_llava(config.model.to_dict(), params, out, text_model_type=model_type, peft=peft)
