"""Import and export of Hugging Face format CLIP and SigLIP checkpoints (config.json + safetensors);
import_hf also imports FLAVA (vlm.convert.flava) and Llama / Qwen2 / Gemma causal LMs
(vlm.convert.llm), import only.

`import_hf(path)` returns our model name, model kwargs and params; `export_hf(...)` writes a
directory that `transformers.{CLIP,Siglip}Model.from_pretrained` loads. One table of
(HF key, our path, layout) per architecture serves both directions.
"""

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from vlm.convert.safetensors_io import load_safetensors_dir, save_safetensors_dir

ACT_FROM_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "gelu_fast": "gelu_tanh", "relu": "relu", "silu": "silu"}
ACT_TO_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu",
             "silu": "silu"}


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
  img = [("vision_model.embeddings.class_embedding", "img/cls", "cls"),
         ("vision_model.embeddings.patch_embedding.weight", "img/embedding/conv/kernel", "conv"),
         ("vision_model.embeddings.position_embedding.weight", "img/pos_embedding/pos_embedding", "batch1")]
  img += _norm("vision_model.pre_layrnorm", "img/pre_norm")
  img += _encoder("vision_model.encoder", "img/encoder", vc["num_hidden_layers"])
  img += _norm("vision_model.post_layernorm", "img/encoder_norm")
  img += _linear("visual_projection", "img/head", bias=False)
  txt = [("text_model.embeddings.token_embedding.weight", "txt/embedding/embedding", "id"),
         ("text_model.embeddings.position_embedding.weight", "txt/pos_embedding/pos_embedding", "batch1")]
  txt += _encoder("text_model.encoder", "txt/encoder", tc["num_hidden_layers"])
  txt += _norm("text_model.final_layer_norm", "txt/encoder_norm")
  txt += _linear("text_projection", "txt/head", bias=False)
  return ([r + ("image",) for r in img] + [r + ("text",) for r in txt]
          + [("logit_scale", "t", "scalar", "none")])


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
  txt = [("text_model.embeddings.token_embedding.weight", "txt/embedding/embedding", "id"),
         ("text_model.embeddings.position_embedding.weight", "txt/pos_embedding/pos_embedding", "batch1")]
  txt += _encoder("text_model.encoder", "txt/encoder", tc["num_hidden_layers"])
  txt += _norm("text_model.final_layer_norm", "txt/encoder_norm")
  txt += _linear("text_model.head", "txt/head")
  return ([r + ("image",) for r in img] + [r + ("text",) for r in txt]
          + [("logit_scale", "t", "scalar", "none"), ("logit_bias", "b", "scalar", "none")])


def _split_in_proj(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """torch.nn.MultiheadAttention's fused in_proj -> q/k/v_proj; out_proj keeps its name."""
  out = dict(tensors)
  for key in [k for k in tensors if k.endswith(".in_proj_weight")]:
    base = key[: -len(".in_proj_weight")]
    w = out.pop(key)
    b = out.pop(f"{base}.in_proj_bias")
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
      d = w.shape[0] // 3
      out[f"{base}.{name}.weight"] = w[i * d:(i + 1) * d]
      out[f"{base}.{name}.bias"] = b[i * d:(i + 1) * d]
  return out


def _fuse_in_proj(tensors: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  out = dict(tensors)
  if f"{prefix}.q_proj.weight" in out:
    out[f"{prefix}.in_proj_weight"] = np.concatenate([out.pop(f"{prefix}.{n}_proj.weight") for n in "qkv"])
    out[f"{prefix}.in_proj_bias"] = np.concatenate([out.pop(f"{prefix}.{n}_proj.bias") for n in "qkv"])
  return out


def _tower_kwargs(c: dict) -> dict[str, Any]:
  act = c.get("hidden_act", "gelu")
  if act not in ACT_FROM_HF:
    raise ValueError(f"config.json: hidden_act {act!r} is not supported; known: {sorted(ACT_FROM_HF)}")
  return dict(width=c["hidden_size"], depth=c["num_hidden_layers"], mlp_dim=c["intermediate_size"],
              num_heads=c["num_attention_heads"], mlp_act=ACT_FROM_HF[act], norm_eps=c.get("layer_norm_eps", 1e-5))


def model_kwargs_from_hf(config: dict) -> dict[str, Any]:
  """Our TwoTower kwargs for an HF CLIP or SigLIP config.json."""
  mt = config.get("model_type")
  vc, tc = config["vision_config"], config["text_config"]
  grid = vc["image_size"] // vc["patch_size"]
  image = dict(_tower_kwargs(vc), patch_size=vc["patch_size"], posemb="learn", posemb_grid=(grid, grid))
  text = dict(_tower_kwargs(tc), vocab_size=tc["vocab_size"], max_len=tc["max_position_embeddings"])
  if mt == "clip":
    eos = tc.get("eos_token_id", 2)
    image.update(class_token=True, pool_type="cls", pre_norm=True, patch_bias=False,
                 out_dim=config.get("projection_dim", 512), head_bias=False)
    text.update(causal=True, pool_type="argmax" if eos == 2 else "eos", eos_id=eos,
                pad_id=tc.get("pad_token_id", 1) or 0, out_dim=config.get("projection_dim", 512), head_bias=False)
    return dict(image=image, text=text, temperature_init=config.get("logit_scale_init_value", 2.6592),
                bias_init=None, max_scale=100.0)
  if mt == "siglip":
    image.update(class_token=False, pool_type="map" if vc.get("vision_use_head", True) else "none")
    text.update(causal=False, pool_type="last", out_dim=tc.get("projection_size") or tc["hidden_size"],
                head_bias=True)
    return dict(image=image, text=text, temperature_init=float(np.log(10.0)), bias_init=-10.0)
  raise ValueError(f"config.json: model_type {mt!r} is not supported; known: 'clip', 'siglip'")


def _table(config: dict):
  mt = config["model_type"]
  fn = {"clip": _clip_table, "siglip": _siglip_table}[mt]
  return fn(config["vision_config"], config["text_config"])


def _heads(config: dict, tower: str) -> int:
  if tower == "none":
    return 1
  return config["vision_config" if tower == "image" else "text_config"]["num_attention_heads"]


def import_hf(path: str | Path, scan: bool = False) -> tuple[str, dict[str, Any], dict]:
  """HF directory -> ('two_tower', model kwargs, params) for CLIP / SigLIP, ('flava', ...) for FLAVA
  (vlm.convert.flava), ('decoder_lm', ...) for Llama / Qwen2 / Gemma causal LMs (vlm.convert.llm) and
  Chameleon's text decoder (vlm.convert.chameleon),
  ('vision_lm', ...) for LLaVA, LLaVA-NeXT, BLIP-2 and Fuyu (vlm.convert.fuyu), ('flamingo', ...) for IDEFICS
  (vlm.convert.idefics).
  Raises listing missing/unused tensors."""
  path = Path(path)
  config = json.loads((path / "config.json").read_text())
  if config.get("model_type") == "flava":
    from vlm.convert.flava import import_hf_flava
    return import_hf_flava(path, scan=scan)
  if config.get("model_type") in ("llama", "qwen2", "gemma"):
    from vlm.convert.llm import import_hf_llm
    return import_hf_llm(path, scan=scan)
  if config.get("model_type") in ("llava", "llava_next"):
    from vlm.convert.llava import import_hf_llava
    return import_hf_llava(path, scan=scan)
  if config.get("model_type") == "idefics":  # Flamingo-style; the <image> id is the tokenizer's
    from vlm.convert.idefics import import_hf_idefics
    if scan:
      raise NotImplementedError("Flamingo's LM has no scanned layout; import IDEFICS with scan=False")
    return import_hf_idefics(path)
  if config.get("model_type") == "blip-2":
    from vlm.convert.blip2 import import_hf_blip2
    return import_hf_blip2(path, scan=scan)
  if config.get("model_type") == "fuyu":
    from vlm.convert.fuyu import import_hf_fuyu
    return import_hf_fuyu(path, scan=scan)
  if config.get("model_type") == "chameleon":  # the text decoder only (the VQ-VAE is not imported)
    from vlm.convert.chameleon import import_hf_chameleon
    return import_hf_chameleon(path, scan=scan)
  kwargs = model_kwargs_from_hf(config)
  tensors = _split_in_proj(load_safetensors_dir(path))
  table = _table(config)
  missing = [hf for hf, *_ in table if hf not in tensors]
  if missing:
    raise ValueError(f"{path}: tensors expected for {config['model_type']} but absent: {missing[:20]}")
  flat = {}
  for hf, ours, kind, tower in table:
    flat[tuple(ours.split("/"))] = np.asarray(_fwd(kind, tensors[hf], _heads(config, tower)), np.float32)
  unused = sorted(set(tensors) - {hf for hf, *_ in table} - {"text_model.embeddings.position_ids",
                                                             "vision_model.embeddings.position_ids"})
  if unused:
    raise ValueError(f"{path}: tensors not used by the importer (unsupported layout?): {unused[:20]}")
  params = traverse_util.unflatten_dict(flat)
  if scan:
    kwargs["image"]["scan"] = kwargs["text"]["scan"] = True
    params = stack_encoder_blocks(params)
  return "two_tower", kwargs, params


def stack_encoder_blocks(params: dict) -> dict:
  """Replaces every `encoder/block_{i}/...` by `encoder/layers/...` stacked on axis 0 (scan layout)."""
  out = {}
  for k, v in params.items():
    if isinstance(v, dict) and "block_0" in v:
      n = len([b for b in v if b.startswith("block_")])
      blocks = [v[f"block_{i}"] for i in range(n)]
      out[k] = {"layers": _tree_stack(blocks), **{kk: vv for kk, vv in v.items() if not kk.startswith("block_")}}
    elif isinstance(v, dict):
      out[k] = stack_encoder_blocks(v)
    else:
      out[k] = v
  return out


def unstack_encoder_blocks(params: dict) -> dict:
  """Inverse of stack_encoder_blocks."""
  out = {}
  for k, v in params.items():
    if isinstance(v, dict) and "layers" in v and k == "encoder":
      layers = v["layers"]
      n = next(iter(traverse_util.flatten_dict(layers).values())).shape[0]
      rest = {kk: vv for kk, vv in v.items() if kk != "layers"}
      out[k] = {**{f"block_{i}": _tree_index(layers, i) for i in range(n)}, **rest}
    elif isinstance(v, dict):
      out[k] = unstack_encoder_blocks(v)
    else:
      out[k] = v
  return out


def _tree_stack(trees: list[dict]) -> dict:
  flats = [traverse_util.flatten_dict(t) for t in trees]
  return traverse_util.unflatten_dict({k: np.stack([np.asarray(f[k]) for f in flats]) for k in flats[0]})


def _tree_index(tree: dict, i: int) -> dict:
  return traverse_util.unflatten_dict({k: np.asarray(v)[i] for k, v in traverse_util.flatten_dict(tree).items()})


def hf_config_from_kwargs(kwargs: dict[str, Any], model_type: str) -> dict[str, Any]:
  """An HF config.json for our TwoTower kwargs (the layouts that import_hf produces)."""
  im, tx = kwargs["image"], kwargs["text"]
  from vlm.models.vit import ViT
  from vlm.models.text import TextTransformer
  idims = ViT(**im).dims()
  tdims = TextTransformer(**tx).dims()
  grid = im.get("posemb_grid")
  if grid is None:
    raise ValueError("export needs model.image.posemb_grid (the learned position grid) to write image_size")

  def tower(d, kw):
    return dict(hidden_size=d["width"], num_hidden_layers=d["depth"], intermediate_size=d["mlp_dim"],
                num_attention_heads=d["num_heads"], hidden_act=ACT_TO_HF[kw.get("mlp_act", "gelu")],
                layer_norm_eps=kw.get("norm_eps", 1e-6))

  p = idims["patch_size"][0]
  vc = dict(tower(idims, im), image_size=grid[0] * p, patch_size=p, num_channels=3)
  tc = dict(tower(tdims, tx), vocab_size=tx["vocab_size"], max_position_embeddings=tx.get("max_len", 64))
  if model_type == "clip":
    tc.update(eos_token_id=tx.get("eos_id") if tx.get("pool_type") == "eos" else 2, pad_token_id=tx.get("pad_id", 1),
              bos_token_id=0, projection_dim=im["out_dim"])
    vc.update(projection_dim=im["out_dim"])
    return dict(model_type="clip", architectures=["CLIPModel"], projection_dim=im["out_dim"],
                logit_scale_init_value=kwargs.get("temperature_init", 2.6592), vision_config=vc, text_config=tc)
  if model_type == "siglip":
    vc.update(vision_use_head=im.get("pool_type") == "map")
    tc.update(projection_size=tx.get("out_dim") or tdims["width"])
    return dict(model_type="siglip", architectures=["SiglipModel"], vision_config=vc, text_config=tc)
  raise ValueError(f"export: model_type must be 'clip' or 'siglip', got {model_type!r}")


def export_hf(kwargs: dict[str, Any], params: dict, path: str | Path, model_type: str) -> None:
  """Writes our TwoTower params as an HF directory (config.json + model.safetensors)."""
  config = hf_config_from_kwargs(kwargs, model_type)
  params = unstack_encoder_blocks(jax.tree.map(np.asarray, params))
  flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}
  tensors = {}
  for hf, ours, kind, tower in _table(config):
    if ours not in flat:
      raise ValueError(f"export: parameter {ours!r} needed for {hf!r} is absent")
    hf_shape = (1,) if kind == "scalar" and model_type == "siglip" else (() if kind == "scalar" else None)
    if kind in ("qkv_bias", "cls", "batch1"):
      hf_shape = {"qkv_bias": (-1,), "cls": (-1,), "batch1": flat[ours].shape[1:]}[kind]
    tensors[hf] = np.asarray(_inv(kind, flat[ours], hf_shape), np.float32)
  if model_type == "siglip":
    tensors = _fuse_in_proj(tensors, "vision_model.head.attention")
  save_safetensors_dir(tensors, path, config)
