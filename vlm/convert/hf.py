"""Import and export of Hugging Face format CLIP and SigLIP checkpoints (config.json + safetensors);
import_hf also imports FLAVA (vlm.convert.flava) and Llama / Qwen2 / Gemma causal LMs
(vlm.convert.llm), import only.

`import_hf(path)` returns our model name, model kwargs and params; `export_hf(...)` writes a
directory that `transformers.{CLIP,Siglip}Model.from_pretrained` loads. One table of
(HF key, our path, layout) per architecture serves both directions.
"""

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from vlm.convert.hf_config import HFConfig, from_dict, read_config
from vlm.convert.safetensors_io import load_safetensors_dir, save_safetensors_dir

ACT_FROM_HF = {
  "quick_gelu": "quick_gelu",
  "gelu": "gelu",
  "gelu_pytorch_tanh": "gelu_tanh",
  "gelu_new": "gelu_tanh",
  "gelu_fast": "gelu_tanh",
  "relu": "relu",
  "silu": "silu",
}
ACT_TO_HF = {
  "quick_gelu": "quick_gelu",
  "gelu": "gelu",
  "gelu_tanh": "gelu_pytorch_tanh",
  "relu": "relu",
  "silu": "silu",
}


# Layouts: how an HF tensor becomes ours (fwd) and back (inv). `h` is the number of heads.
def _fwd(kind: str, x: np.ndarray, h: int) -> np.ndarray:
  if kind == "id":
    return x
  if kind == "dense":  # torch Linear [out, in] -> [in, out]
    return x.T
  if kind == "qkv":  # [h*hd, D] -> [D, h, hd]
    return x.T.reshape(x.shape[1], h, -1)
  if kind == "qkv_bias":
    return x.reshape(h, -1)
  if kind == "out":  # [D, h*hd] -> [h, hd, D]
    return x.T.reshape(h, -1, x.shape[0])
  if kind == "conv":  # [D, C, p, p] -> [p, p, C, D]
    return x.transpose(2, 3, 1, 0)
  if kind == "batch1":  # [N, D] -> [1, N, D]
    return x[None]
  if kind == "cls":  # [D] -> [1, 1, D]
    return x[None, None]
  if kind == "scalar":  # [] or [1] -> [1]
    return x.reshape(1)
  raise ValueError(kind)


def _inv(kind: str, x: np.ndarray, hf_shape: tuple[int, ...]) -> np.ndarray:
  if kind == "id":
    return x
  if kind == "dense":
    return x.T
  if kind == "qkv":
    return x.reshape(x.shape[0], -1).T
  if kind in ("qkv_bias", "cls", "batch1", "scalar"):
    return x.reshape(hf_shape)
  if kind == "out":
    return x.reshape(-1, x.shape[-1]).T
  if kind == "conv":
    return x.transpose(3, 2, 0, 1)
  raise ValueError(kind)


def _linear(hf: str, ours: str, kind: str = "dense", bias: bool = True, bias_kind: str = "id"):
  rows = [(f"{hf}.weight", f"{ours}/kernel", kind)]
  if bias:
    rows.append((f"{hf}.bias", f"{ours}/bias", bias_kind))
  return rows


def _norm(hf: str, ours: str):
  return [(f"{hf}.weight", f"{ours}/scale", "id"), (f"{hf}.bias", f"{ours}/bias", "id")]


def _attention(hf: str, ours: str):
  rows = []
  for a, b in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
    rows += _linear(f"{hf}.{a}", f"{ours}/{b}", "qkv", bias_kind="qkv_bias")
  return rows + _linear(f"{hf}.out_proj", f"{ours}/out", "out")


def _encoder(hf: str, ours: str, depth: int):
  rows = []
  for i in range(depth):
    h, o = f"{hf}.layers.{i}", f"{ours}/block_{i}"
    rows += _norm(f"{h}.layer_norm1", f"{o}/norm1") + _attention(f"{h}.self_attn", f"{o}/attn")
    rows += _norm(f"{h}.layer_norm2", f"{o}/norm2")
    rows += _linear(f"{h}.mlp.fc1", f"{o}/mlp/fc1") + _linear(f"{h}.mlp.fc2", f"{o}/mlp/fc2")
  return rows


def _clip_table(vc: dict, tc: dict) -> list[tuple[str, str, str, str]]:
  """Rows (hf_key, our_path, layout, tower) for CLIPModel."""
  img = [
    ("vision_model.embeddings.class_embedding", "img/cls", "cls"),
    ("vision_model.embeddings.patch_embedding.weight", "img/embedding/conv/kernel", "conv"),
    ("vision_model.embeddings.position_embedding.weight", "img/pos_embedding/pos_embedding", "batch1"),
  ]
  img += _norm("vision_model.pre_layrnorm", "img/pre_norm")
  img += _encoder("vision_model.encoder", "img/encoder", vc["num_hidden_layers"])
  img += _norm("vision_model.post_layernorm", "img/encoder_norm")
  img += _linear("visual_projection", "img/head", bias=False)
  txt = [
    ("text_model.embeddings.token_embedding.weight", "txt/embedding/embedding", "id"),
    ("text_model.embeddings.position_embedding.weight", "txt/pos_embedding/pos_embedding", "batch1"),
  ]
  txt += _encoder("text_model.encoder", "txt/encoder", tc["num_hidden_layers"])
  txt += _norm("text_model.final_layer_norm", "txt/encoder_norm")
  txt += _linear("text_projection", "txt/head", bias=False)
  return [r + ("image",) for r in img] + [r + ("text",) for r in txt] + [("logit_scale", "t", "scalar", "none")]


def _siglip_table(vc: dict, tc: dict) -> list[tuple[str, str, str, str]]:
  """Rows for SiglipModel. The MAP head's fused torch in_proj is split into q/k/v_proj first."""
  img = _linear("vision_model.embeddings.patch_embedding", "img/embedding/conv", "conv")
  img += [("vision_model.embeddings.position_embedding.weight", "img/pos_embedding/pos_embedding", "batch1")]
  img += _encoder("vision_model.encoder", "img/encoder", vc["num_hidden_layers"])
  img += _norm("vision_model.post_layernorm", "img/encoder_norm")
  if vc.get("vision_use_head", True):
    img += [("vision_model.head.probe", "img/MAPHead/probe", "id")]
    img += _attention("vision_model.head.attention", "img/MAPHead/attn")
    img += _norm("vision_model.head.layernorm", "img/MAPHead/norm")
    img += _linear("vision_model.head.mlp.fc1", "img/MAPHead/mlp/fc1")
    img += _linear("vision_model.head.mlp.fc2", "img/MAPHead/mlp/fc2")
  txt = [
    ("text_model.embeddings.token_embedding.weight", "txt/embedding/embedding", "id"),
    ("text_model.embeddings.position_embedding.weight", "txt/pos_embedding/pos_embedding", "batch1"),
  ]
  txt += _encoder("text_model.encoder", "txt/encoder", tc["num_hidden_layers"])
  txt += _norm("text_model.final_layer_norm", "txt/encoder_norm")
  txt += _linear("text_model.head", "txt/head")
  return (
    [r + ("image",) for r in img]
    + [r + ("text",) for r in txt]
    + [("logit_scale", "t", "scalar", "none"), ("logit_bias", "b", "scalar", "none")]
  )


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


def _tower_kwargs(c: HFConfig) -> dict[str, Any]:
  """Encoder kwargs (width, depth, MLP, heads, activation, eps) of an HF CLIP / SigLIP tower config."""
  if not isinstance(c, HFConfig):
    raise TypeError(f"_tower_kwargs needs an HFConfig (vlm.convert.hf_config.read_config), got {type(c).__name__}")
  return dict(
    width=c["hidden_size"],
    depth=c["num_hidden_layers"],
    mlp_dim=c["intermediate_size"],
    num_heads=c["num_attention_heads"],
    mlp_act=c.choice("hidden_act", ACT_FROM_HF),
    norm_eps=float(c["layer_norm_eps"]),
  )


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
  return dict(_tower_kwargs(vc), patch_size=patch, posemb="learn", posemb_grid=(grid, grid))


def model_kwargs_from_hf(config: HFConfig | dict) -> dict[str, Any]:
  """Our TwoTower kwargs for an HF CLIP or SigLIP config.json (transformers' defaults for absent keys)."""
  if not isinstance(config, HFConfig):
    config = from_dict(config)
  mt = config.model_type
  if mt not in ("clip", "siglip"):
    raise config.error("model_type", "not a two-tower model; known: 'clip', 'siglip'")
  vc, tc = config["vision_config"], config["text_config"]
  image = vision_kwargs_from_hf(vc)
  text = dict(_tower_kwargs(tc), vocab_size=tc["vocab_size"], max_len=tc["max_position_embeddings"])
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


def _table(config: HFConfig):
  fn = {"clip": _clip_table, "siglip": _siglip_table}[config.model_type]
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
  """HF directory -> ('two_tower', model kwargs, params) for CLIP / SigLIP, ('flava', ...) for FLAVA
  (vlm.convert.flava), ('decoder_lm', ...) for Llama / Qwen2 / Gemma causal LMs (vlm.convert.llm) and
  Chameleon's text decoder (vlm.convert.chameleon),
  ('vision_lm', ...) for LLaVA, LLaVA-NeXT, BLIP-2 and Fuyu (vlm.convert.fuyu), ('flamingo', ...) for IDEFICS
  (vlm.convert.idefics).
  scan: the nn.scan layouts, stacks' params `encoder/layers/...` / `decoder/layers/...` with a leading
  depth axis (towers and ViTs scan=True, DecoderLMs scan_layers=True); IDEFICS (Flamingo) has none.
  Raises listing missing/unused tensors."""
  path = Path(path)
  config = read_config(path)
  if config.model_type == "flava":
    from vlm.convert.flava import import_hf_flava

    return import_hf_flava(path, scan=scan)
  if config.model_type in ("llama", "qwen2", "gemma"):
    from vlm.convert.llm import import_hf_llm

    return import_hf_llm(path, scan=scan)
  if config.model_type in ("llava", "llava_next"):
    from vlm.convert.llava import import_hf_llava

    return import_hf_llava(path, scan=scan)
  if config.model_type == "idefics":  # Flamingo-style; the <image> id is the tokenizer's
    from vlm.convert.idefics import import_hf_idefics

    if scan:
      raise NotImplementedError("Flamingo's LM has no scanned layout; import IDEFICS with scan=False")
    return import_hf_idefics(path)
  if config.model_type == "blip-2":
    from vlm.convert.blip2 import import_hf_blip2

    return import_hf_blip2(path, scan=scan)
  if config.model_type == "fuyu":
    from vlm.convert.fuyu import import_hf_fuyu

    return import_hf_fuyu(path, scan=scan)
  if config.model_type == "chameleon":  # the text decoder only (the VQ-VAE is not imported)
    from vlm.convert.chameleon import import_hf_chameleon

    return import_hf_chameleon(path, scan=scan)
  kwargs = model_kwargs_from_hf(config)
  tensors = _split_in_proj(load_safetensors_dir(path))
  table = _table(config)
  missing = [hf for hf, *_ in table if hf not in tensors]
  if missing:
    raise ValueError(f"{path}: tensors expected for {config.model_type} but absent: {missing[:20]}")
  _check_channels(config["vision_config"], tensors["vision_model.embeddings.patch_embedding.weight"])
  flat = {}
  for hf, ours, kind, tower in table:
    flat[tuple(ours.split("/"))] = np.asarray(_fwd(kind, tensors[hf], _heads(config, tower)), np.float32)
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


def stack_encoder_blocks(params: dict, names: Iterable[str] | None = None) -> dict:
  """Replaces every `<module>/block_{i}/...` by `<module>/layers/...` stacked on axis 0: the nn.scan layout
  of vlm.nn.transformer.Encoder(scan=True) (`encoder`) and of DecoderLM(scan_layers=True) (`decoder`).

  names: the module names whose blocks are stacked (e.g. ('encoder', 'decoder') leaves a Q-Former's
  blocks alone); None: every module with `block_0`. The blocks must hold the same parameters.
  """
  names = None if names is None else tuple(names)
  out = {}
  for k, v in params.items():
    if isinstance(v, dict) and "block_0" in v and (names is None or k in names):
      n = len([b for b in v if b.startswith("block_")])
      blocks = [v[f"block_{i}"] for i in range(n)]
      out[k] = {"layers": _tree_stack(blocks), **{kk: vv for kk, vv in v.items() if not kk.startswith("block_")}}
    elif isinstance(v, dict):
      out[k] = stack_encoder_blocks(v, names)
    else:
      out[k] = v
  return out


def unstack_encoder_blocks(params: dict, names: Iterable[str] = ("encoder", "decoder")) -> dict:
  """Inverse of stack_encoder_blocks: every `<module>/layers/...` of a module named in `names` (an Encoder's
  `encoder`, a DecoderLM's `decoder`) becomes `<module>/block_{i}/...`."""
  names = tuple(names)
  out = {}
  for k, v in params.items():
    if isinstance(v, dict) and "layers" in v and k in names:
      layers = v["layers"]
      n = next(iter(traverse_util.flatten_dict(layers).values())).shape[0]
      rest = {kk: vv for kk, vv in v.items() if kk != "layers"}
      out[k] = {**{f"block_{i}": _tree_index(layers, i) for i in range(n)}, **rest}
    elif isinstance(v, dict):
      out[k] = unstack_encoder_blocks(v, names)
    else:
      out[k] = v
  return out


def _tree_stack(trees: list[dict]) -> dict:
  flats = [traverse_util.flatten_dict(t) for t in trees]
  return traverse_util.unflatten_dict({k: np.stack([np.asarray(f[k]) for f in flats]) for k in flats[0]})


def _tree_index(tree: dict, i: int) -> dict:
  return traverse_util.unflatten_dict({k: np.asarray(v)[i] for k, v in traverse_util.flatten_dict(tree).items()})


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
      extra_tokens=0,
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
      extra_tokens=0,
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


def export_hf(kwargs: dict[str, Any], params: dict, path: str | Path, model_type: str) -> None:
  """Writes our TwoTower params as an HF directory (config.json + model.safetensors) that
  transformers.{CLIP,Siglip}Model.from_pretrained loads. A LoRA model is merged first (vlm.peft.merge_lora)."""
  params = unstack_encoder_blocks(jax.tree.map(np.asarray, params))
  flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}
  if "img/embedding/conv/kernel" not in flat:
    raise ValueError("export: parameter 'img/embedding/conv/kernel' (the patch embedding) is absent")
  kwargs = dict(
    kwargs, image=with_posemb_grid(dict(kwargs.get("image") or {}), flat.get("img/pos_embedding/pos_embedding"))
  )
  config = hf_config_from_kwargs(kwargs, model_type, num_channels=flat["img/embedding/conv/kernel"].shape[2])
  tensors = {}
  for hf, ours, kind, tower in _table(from_dict(config)):
    if ours not in flat:
      raise ValueError(f"export: parameter {ours!r} needed for {hf!r} is absent")
    hf_shape = (1,) if kind == "scalar" and model_type == "siglip" else (() if kind == "scalar" else None)
    if kind in ("qkv_bias", "cls", "batch1"):
      hf_shape = {"qkv_bias": (-1,), "cls": (-1,), "batch1": flat[ours].shape[1:]}[kind]
    tensors[hf] = np.asarray(_inv(kind, flat[ours], hf_shape), np.float32)
  if model_type == "siglip":
    tensors = _fuse_in_proj(tensors, "vision_model.head.attention")
  save_safetensors_dir(tensors, path, config)
