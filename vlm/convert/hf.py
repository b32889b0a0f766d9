"""Import and export of Hugging Face format CLIP and SigLIP checkpoints (config.json + safetensors), and
`import_hf`, the entry point for every HF checkpoint vlm imports.

`import_hf(path)` returns our model name, model kwargs and params from the importer registered for the
config.json model_type (vlm.convert.registry): CLIP / SigLIP here (import_hf_two_tower), FLAVA
(vlm.convert.flava), Llama / Qwen2 / Gemma (vlm.convert.llm), LLaVA and its video variants (vlm.convert.llava), BLIP-2
(vlm.convert.blip2), Fuyu (vlm.convert.fuyu), Chameleon (vlm.convert.chameleon), IDEFICS (vlm.convert.idefics).
`export_hf(...)` writes a directory that `transformers.{CLIP,Siglip}Model.from_pretrained` loads. One table of
(HF key, our path, layout) per architecture (vlm.convert.common) serves both directions.
"""

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from vlm.convert.common import (
  ACT_TO_HF,
  clip_table,
  fwd,
  inv,
  siglip_table,
  stack_encoder_blocks,
  tower_kwargs,
  unstack_encoder_blocks,
)
from vlm.convert.hf_config import HFConfig, from_dict, read_config
from vlm.convert.registry import importer_for, register_exporter, register_importer
from vlm.convert.safetensors_io import load_safetensors_dir, save_safetensors_dir
from vlm.tree import flatten

__all__ = [
  "export_hf",
  "hf_config_from_kwargs",
  "import_hf",
  "import_hf_two_tower",
  "model_kwargs_from_hf",
  "vision_kwargs_from_hf",
  "with_posemb_grid",
]


def _split_in_proj(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """torch.nn.MultiheadAttention's fused in_proj -> q/k/v_proj; out_proj keeps its name."""
  out = dict(tensors)
  for key in [k for k in tensors if k.endswith(".in_proj_weight")]:
    base = key[: -len(".in_proj_weight")]
    w = out.pop(key)
    b = out.pop(f"{base}.in_proj_bias")
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
      d = w.shape[0] // 3
      out[f"{base}.{name}.weight"] = w[i * d : (i + 1) * d]
      out[f"{base}.{name}.bias"] = b[i * d : (i + 1) * d]
  return out


def _fuse_in_proj(tensors: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  out = dict(tensors)
  if f"{prefix}.q_proj.weight" in out:
    out[f"{prefix}.in_proj_weight"] = np.concatenate([out.pop(f"{prefix}.{n}_proj.weight") for n in "qkv"])
    out[f"{prefix}.in_proj_bias"] = np.concatenate([out.pop(f"{prefix}.{n}_proj.bias") for n in "qkv"])
  return out


def _image_size(c: HFConfig, key: str) -> int:
  """A square image_size / patch_size (an int, or a [h, w] pair with h == w)."""
  v = c[key]
  if isinstance(v, (list, tuple)):
    if len(v) != 2 or v[0] != v[1]:
      raise c.error(key, "only square sizes are supported")
    v = v[0]
  if not isinstance(v, int) or v <= 0:
    raise c.error(key, "expected a positive integer")
  return v


def vision_kwargs_from_hf(vc: HFConfig) -> dict[str, Any]:
  """ViT kwargs shared by every CLIP / SigLIP image tower (patch grid, learned position embeddings)."""
  size, patch = _image_size(vc, "image_size"), _image_size(vc, "patch_size")
  if size % patch:
    raise vc.error("image_size", f"not a multiple of patch_size {patch}")
  grid = size // patch
  return dict(tower_kwargs(vc), patch_size=patch, posemb="learn", posemb_grid=(grid, grid))


def model_kwargs_from_hf(config: HFConfig | dict) -> dict[str, Any]:
  """Our TwoTower kwargs for an HF CLIP or SigLIP config.json (transformers' defaults for absent keys)."""
  if not isinstance(config, HFConfig):
    config = from_dict(config)
  mt = config.model_type
  if mt not in ("clip", "siglip"):
    raise config.error("model_type", "not a two-tower model; known: 'clip', 'siglip'")
  vc, tc = config["vision_config"], config["text_config"]
  image = vision_kwargs_from_hf(vc)
  text = dict(tower_kwargs(tc), vocab_size=tc["vocab_size"], max_len=tc["max_position_embeddings"])
  if mt == "clip":
    # CLIPTextTransformer: eos_token_id 2 is the legacy configuration (pool at the largest id), any other
    # value pools at the first occurrence of that id.
    eos = tc["eos_token_id"]
    if not isinstance(eos, int):
      raise tc.error("eos_token_id", "CLIP pools at one EOS id; expected an integer")
    pad = tc["pad_token_id"]
    image.update(
      class_token=True,
      pool_type="cls",
      pre_norm=True,
      patch_bias=False,
      out_dim=config["projection_dim"],
      head_bias=False,
    )
    text.update(
      causal=True,
      pool_type="argmax" if eos == 2 else "eos",
      eos_id=eos,
      pad_id=pad if isinstance(pad, int) else 0,
      out_dim=config["projection_dim"],
      head_bias=False,
    )
    # What the checkpoint holds is imported as is: CLIPModel.forward applies exp(logit_scale) with no
    # clamp (training recipes keep the 100 clamp as their own model.max_scale).
    return dict(
      image=image, text=text, temperature_init=float(config["logit_scale_init_value"]), bias_init=None, max_scale=None
    )
  image.update(class_token=False, pool_type="map" if vc["vision_use_head"] else "none")
  text.update(causal=False, pool_type="last", out_dim=tc["projection_size"], head_bias=True)
  return dict(image=image, text=text, temperature_init=float(np.log(10.0)), bias_init=-10.0)


def _two_tower_table(config: HFConfig) -> list[tuple[str, str, str, str]]:
  """Rows (hf_key, our_path, layout, tower) of a CLIP / SigLIP config."""
  fn = {"clip": clip_table, "siglip": siglip_table}[config.model_type]
  return fn(config["vision_config"], config["text_config"])


def _check_channels(vc: HFConfig, patch_kernel: np.ndarray) -> None:
  """The patch embedding's input channels ([D, C, p, p]) must be vision_config.num_channels."""
  if patch_kernel.shape[1] != vc["num_channels"]:
    raise vc.error("num_channels", f"the patch embedding has {patch_kernel.shape[1]} input channels")


def _heads(config: HFConfig, tower: str) -> int:
  if tower == "none":
    return 1
  return config["vision_config" if tower == "image" else "text_config"]["num_attention_heads"]


def import_hf(path: str | Path, scan: bool = False) -> tuple[str, dict[str, Any], dict]:
  """HF directory (config.json + safetensors) -> (our model name, model kwargs, params float32), by the importer
  registered for its config.json model_type (vlm.convert.registry; ValueError naming the known types):
  ('two_tower', ...) for CLIP / SigLIP (import_hf_two_tower), ('flava', ...) for FLAVA (vlm.convert.flava),
  ('decoder_lm', ...) for Llama / Qwen2 / Gemma causal LMs (vlm.convert.llm) and Chameleon's text decoder
  (vlm.convert.chameleon), ('vision_lm', ...) for LLaVA, LLaVA-NeXT, LLaVA-NeXT-Video, Video-LLaVA
  (vlm.convert.llava), BLIP-2 (vlm.convert.blip2) and Fuyu (vlm.convert.fuyu), ('flamingo', ...) for IDEFICS
  (vlm.convert.idefics).
  scan: the nn.scan layouts, stacks' params `encoder/layers/...` / `decoder/layers/...` with a leading
  depth axis (towers and ViTs scan=True, DecoderLMs scan_layers=True); IDEFICS (Flamingo) has none.
  Raises listing missing/unused tensors."""
  path = Path(path)
  config = read_config(path)
  return importer_for(config.model_type, config.file)(path, scan=scan)


@register_importer("clip", "siglip")
def import_hf_two_tower(path: str | Path, scan: bool = False) -> tuple[str, dict[str, Any], dict]:
  """HF CLIPModel / SiglipModel directory -> ('two_tower', TwoTower kwargs, params float32).
  scan: the towers' scanned layout (scan=True, encoder/layers/... [depth, ...]). Raises listing
  missing/unused tensors."""
  path = Path(path)
  config = read_config(path)
  kwargs = model_kwargs_from_hf(config)
  tensors = _split_in_proj(load_safetensors_dir(path))
  table = _two_tower_table(config)
  missing = [hf for hf, *_ in table if hf not in tensors]
  if missing:
    raise ValueError(f"{path}: tensors expected for {config.model_type} but absent: {missing[:20]}")
  _check_channels(config["vision_config"], tensors["vision_model.embeddings.patch_embedding.weight"])
  flat = {}
  for hf, ours, kind, tower in table:
    flat[tuple(ours.split("/"))] = np.asarray(fwd(kind, tensors[hf], _heads(config, tower)), np.float32)
  unused = sorted(
    set(tensors)
    - {hf for hf, *_ in table}
    - {"text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"}
  )
  if unused:
    raise ValueError(f"{path}: tensors not used by the importer (unsupported layout?): {unused[:20]}")
  params = traverse_util.unflatten_dict(flat)
  if scan:
    kwargs["image"]["scan"] = kwargs["text"]["scan"] = True
    params = stack_encoder_blocks(params)
  return "two_tower", kwargs, params


# What HF's CLIPModel / SiglipModel compute, as our module fields: export refuses anything else by name.
_EXPORT_LAYOUT = {
  "clip": dict(
    image=dict(
      class_token=True,
      pool_type=("cls",),
      pre_norm=True,
      patch_bias=False,
      head_bias=False,
      posemb="learn",
    ),
    text=dict(causal=True, pool_type=("argmax", "eos"), head_bias=False, embed_norm=False, final_norm=True),
  ),
  "siglip": dict(
    image=dict(
      class_token=False,
      pool_type=("map", "none"),
      pre_norm=False,
      patch_bias=True,
      posemb="learn",
      out_dim=None,
    ),
    text=dict(causal=False, pool_type=("last",), head_bias=True, embed_norm=False, final_norm=True),
  ),
}


def with_posemb_grid(vit_kwargs: dict[str, Any], pos_embedding: np.ndarray | None) -> dict[str, Any]:
  """ViT kwargs with `posemb_grid` filled in from the learned table [1, (1 +) g*g, D] where the model took
  its grid from its first input (posemb_grid None): HF configs need the image size. Square grids only."""
  if vit_kwargs.get("posemb_grid") or vit_kwargs.get("posemb", "learn") != "learn" or pos_embedding is None:
    return vit_kwargs
  n = int(pos_embedding.shape[1]) - (1 if vit_kwargs.get("class_token") else 0)
  g = int(round(n**0.5))
  if g * g != n:
    raise ValueError(
      f"export: the learned position table has {n} patch positions, not a square grid; set model posemb_grid"
    )
  return dict(vit_kwargs, posemb_grid=(g, g))


def hf_config_from_kwargs(kwargs: dict[str, Any], model_type: str, num_channels: int = 3) -> dict[str, Any]:
  """An HF config.json for our TwoTower kwargs: every architecture field written from the model
  (our module's own defaults for fields the kwargs leave out), so nothing rests on transformers'."""
  from vlm.models.text import TextTransformer
  from vlm.models.vit import ViT

  if model_type not in _EXPORT_LAYOUT:
    raise ValueError(f"export: model_type must be 'clip' or 'siglip', got {model_type!r}")
  vit, txt = ViT(**kwargs["image"]), TextTransformer(**kwargs["text"])
  for tower, module in (("image", vit), ("text", txt)):
    for field, want in _EXPORT_LAYOUT[model_type][tower].items():
      have = getattr(module, field)
      if have not in (want if isinstance(want, tuple) else (want,)):
        raise ValueError(f"export: model.{tower}.{field}={have!r} has no {model_type} HF equivalent (needs {want!r})")
    if module.mlp_act not in ACT_TO_HF:
      raise ValueError(f"export: model.{tower}.mlp_act={module.mlp_act!r}; HF activations known: {sorted(ACT_TO_HF)}")
  idims, tdims = vit.dims(), txt.dims()
  if vit.posemb_grid is None or vit.posemb_grid[0] != vit.posemb_grid[1]:
    raise ValueError(f"export: model.image.posemb_grid={vit.posemb_grid!r}; HF needs a square learned grid")
  ph, pw = idims["patch_size"]
  if ph != pw:
    raise ValueError(f"export: model.image.patch_size={idims['patch_size']}; HF needs square patches")

  def tower(d, module):
    return dict(
      hidden_size=d["width"],
      num_hidden_layers=d["depth"],
      intermediate_size=d["mlp_dim"],
      num_attention_heads=d["num_heads"],
      hidden_act=ACT_TO_HF[module.mlp_act],
      layer_norm_eps=float(module.norm_eps),
    )

  vc = dict(
    tower(idims, vit),
    model_type=f"{model_type}_vision_model",
    image_size=vit.posemb_grid[0] * ph,
    patch_size=ph,
    num_channels=int(num_channels),
  )
  tc = dict(
    tower(tdims, txt),
    model_type=f"{model_type}_text_model",
    vocab_size=txt.vocab_size,
    max_position_embeddings=txt.max_len,
    pad_token_id=txt.pad_id,
  )
  if model_type == "clip":
    if vit.out_dim is None or vit.out_dim != txt.out_dim:
      raise ValueError(
        f"export: CLIP needs model.image.out_dim == model.text.out_dim (got {vit.out_dim}, {txt.out_dim})"
      )
    if txt.pool_type == "eos" and txt.eos_id == 2:
      raise ValueError(
        "export: model.text.eos_id=2 means legacy argmax pooling to CLIPTextTransformer; "
        "an 'eos'-pooled tower needs another EOS id"
      )
    tc.update(eos_token_id=txt.eos_id if txt.pool_type == "eos" else 2, bos_token_id=0, projection_dim=vit.out_dim)
    vc.update(projection_dim=vit.out_dim)
    return dict(
      model_type="clip",
      architectures=["CLIPModel"],
      projection_dim=vit.out_dim,
      logit_scale_init_value=float(kwargs.get("temperature_init", 2.6592)),
      vision_config=vc,
      text_config=tc,
    )
  vc.update(vision_use_head=vit.pool_type == "map")
  tc.update(projection_size=txt.out_dim or tdims["width"])
  return dict(model_type="siglip", architectures=["SiglipModel"], vision_config=vc, text_config=tc)


@register_exporter("two_tower")
def export_two_tower_run(config, params: dict, out: str | Path, *, model_type: str | None = None, peft=None) -> dict:
  """vlm.export of a two_tower run: CLIPModel, or SiglipModel for a sigmoid-loss run (model_type
  'clip' / 'siglip' forces one); a LoRA run (peft) is merged first."""
  if peft is not None:
    from vlm.peft import merge_lora

    params = merge_lora(params, float(peft["alpha"]), peft.get("rank"))
  loss = (config.get("objective") or {}).get("loss")
  export_hf(config.model.to_dict(), params, out, model_type or ("siglip" if loss == "sigmoid" else "clip"))
  return json.loads((Path(out) / "config.json").read_text())


def export_hf(kwargs: dict[str, Any], params: dict, path: str | Path, model_type: str) -> None:
  """Writes our TwoTower params as an HF directory (config.json + model.safetensors) that
  transformers.{CLIP,Siglip}Model.from_pretrained loads. A LoRA model is merged first (vlm.peft.merge_lora)."""
  params = unstack_encoder_blocks(jax.tree.map(np.asarray, params))
  flat = flatten(params, unbox=False)
  if "img/embedding/conv/kernel" not in flat:
    raise ValueError("export: parameter 'img/embedding/conv/kernel' (the patch embedding) is absent")
  kwargs = dict(
    kwargs, image=with_posemb_grid(dict(kwargs.get("image") or {}), flat.get("img/pos_embedding/pos_embedding"))
  )
  config = hf_config_from_kwargs(kwargs, model_type, num_channels=flat["img/embedding/conv/kernel"].shape[2])
  tensors = {}
  for hf, ours, kind, tower in _two_tower_table(from_dict(config)):
    if ours not in flat:
      raise ValueError(f"export: parameter {ours!r} needed for {hf!r} is absent")
    hf_shape = (1,) if kind == "scalar" and model_type == "siglip" else (() if kind == "scalar" else None)
    if kind in ("qkv_bias", "cls", "batch1"):
      hf_shape = {"qkv_bias": (-1,), "cls": (-1,), "batch1": flat[ours].shape[1:]}[kind]
    tensors[hf] = np.asarray(inv(kind, flat[ours], hf_shape), np.float32)
  if model_type == "siglip":
    tensors = _fuse_in_proj(tensors, "vision_model.head.attention")
  save_safetensors_dir(tensors, path, config)
