"""Layout helpers shared by the Hugging Face importers and exporters of vlm.convert.

A checkpoint is converted by tables of rows (HF key, our '/'-separated param path, layout[, heads or tower]):
`fwd` turns an HF tensor into ours for a layout name, `inv` back. Row builders (`linear_rows`, `norm_rows`,
`encoder_rows`, `clip_table`, `siglip_table`, `lm_table`, `vision_tower_rows`) give the rows of the common
modules; `Part` / `apply_part` read one part of a checkpoint stored under a prefix; `stack_encoder_blocks` /
`unstack_encoder_blocks` convert between the unrolled (`block_{i}`) and the nn.scan (`layers`) layouts.

This module imports no importer module (vlm.convert.hf, llm, llava, ...): they all import from here.
"""

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

from vlm.convert import hf_config
from vlm.convert.hf_config import HFConfig
from vlm.convert.safetensors_io import load_safetensors_dir

Row = tuple[str, str, str]  # (HF key, our path, layout)

# HF hidden_act -> our (non-gated) vlm.nn MLP activation, and back.
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
# HF hidden_act of a gated (Llama-style gate / up / down) MLP -> our gated mlp_act.
GATED_FROM_HF = {
  "silu": "swiglu",
  "swish": "swiglu",
  "gelu_pytorch_tanh": "geglu",
  "gelu_tanh": "geglu",
  "gelu_new": "geglu",
  "gelu_fast": "geglu",
}


# -- layouts --------------------------------------------------------------------------------------


def fwd(kind: str, x: np.ndarray, h: int) -> np.ndarray:
  """An HF tensor in our layout `kind`; h: the number of heads (qkv / qkv_bias / out).

  id: as is; dense: torch Linear [out, in] -> [in, out]; qkv: [h*hd, D] -> [D, h, hd]; qkv_bias: [h*hd] ->
  [h, hd]; out: [D, h*hd] -> [h, hd, D]; conv: [D, C, p, p] -> [p, p, C, D]; batch1: [N, D] -> [1, N, D];
  cls: [D] -> [1, 1, D]; scalar: [] or [1] -> [1]."""
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


def inv(kind: str, x: np.ndarray, hf_shape: tuple[int, ...]) -> np.ndarray:
  """The inverse of `fwd`: our tensor in HF's layout; hf_shape: the HF shape for qkv_bias / cls / batch1 /
  scalar (which are reshaped to it; -1 allowed), unused otherwise."""
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


# -- rows -----------------------------------------------------------------------------------------


def linear_rows(hf: str, ours: str, kind: str = "dense", bias: bool = True, bias_kind: str = "id") -> list[Row]:
  """Rows of a torch Linear / Conv `hf` -> our `ours/kernel` (layout kind) and `ours/bias` (bias_kind)."""
  rows = [(f"{hf}.weight", f"{ours}/kernel", kind)]
  if bias:
    rows.append((f"{hf}.bias", f"{ours}/bias", bias_kind))
  return rows


def norm_rows(hf: str, ours: str) -> list[Row]:
  """Rows of a torch LayerNorm `hf` (weight, bias [D]) -> our `ours/scale`, `ours/bias`."""
  return [(f"{hf}.weight", f"{ours}/scale", "id"), (f"{hf}.bias", f"{ours}/bias", "id")]


def _attention_rows(hf: str, ours: str) -> list[Row]:
  """CLIP / SigLIP attention: {q,k,v}_proj -> {query,key,value} [D, h, hd] (+ bias [h, hd]), out_proj -> out."""
  rows = []
  for a, b in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
    rows += linear_rows(f"{hf}.{a}", f"{ours}/{b}", "qkv", bias_kind="qkv_bias")
  return rows + linear_rows(f"{hf}.out_proj", f"{ours}/out", "out")


def encoder_rows(hf: str, ours: str, depth: int) -> list[Row]:
  """Rows of a CLIP / SigLIP encoder `hf.layers.{i}` -> our vlm.nn.transformer.Encoder blocks `ours/block_{i}`
  (pre-LN: norm1, attn, norm2, mlp fc1 / fc2)."""
  rows = []
  for i in range(depth):
    h, o = f"{hf}.layers.{i}", f"{ours}/block_{i}"
    rows += norm_rows(f"{h}.layer_norm1", f"{o}/norm1") + _attention_rows(f"{h}.self_attn", f"{o}/attn")
    rows += norm_rows(f"{h}.layer_norm2", f"{o}/norm2")
    rows += linear_rows(f"{h}.mlp.fc1", f"{o}/mlp/fc1") + linear_rows(f"{h}.mlp.fc2", f"{o}/mlp/fc2")
  return rows


def clip_table(vc: Mapping, tc: Mapping) -> list[tuple[str, str, str, str]]:
  """Rows (hf_key, our_path, layout, tower) for CLIPModel; tower 'image', 'text' or 'none' (the head count's).
  vc, tc: the vision / text configs (their num_hidden_layers)."""
  img = [
    ("vision_model.embeddings.class_embedding", "img/cls", "cls"),
    ("vision_model.embeddings.patch_embedding.weight", "img/embedding/conv/kernel", "conv"),
    ("vision_model.embeddings.position_embedding.weight", "img/pos_embedding/pos_embedding", "batch1"),
  ]
  img += norm_rows("vision_model.pre_layrnorm", "img/pre_norm")
  img += encoder_rows("vision_model.encoder", "img/encoder", vc["num_hidden_layers"])
  img += norm_rows("vision_model.post_layernorm", "img/encoder_norm")
  img += linear_rows("visual_projection", "img/head", bias=False)
  txt = [
    ("text_model.embeddings.token_embedding.weight", "txt/embedding/embedding", "id"),
    ("text_model.embeddings.position_embedding.weight", "txt/pos_embedding/pos_embedding", "batch1"),
  ]
  txt += encoder_rows("text_model.encoder", "txt/encoder", tc["num_hidden_layers"])
  txt += norm_rows("text_model.final_layer_norm", "txt/encoder_norm")
  txt += linear_rows("text_projection", "txt/head", bias=False)
  return [r + ("image",) for r in img] + [r + ("text",) for r in txt] + [("logit_scale", "t", "scalar", "none")]


def siglip_table(vc: Mapping, tc: Mapping) -> list[tuple[str, str, str, str]]:
  """Rows (hf_key, our_path, layout, tower) for SiglipModel (the MAP head when vc's vision_use_head). The MAP
  head's fused torch in_proj must be split into q/k/v_proj first."""
  img = linear_rows("vision_model.embeddings.patch_embedding", "img/embedding/conv", "conv")
  img += [("vision_model.embeddings.position_embedding.weight", "img/pos_embedding/pos_embedding", "batch1")]
  img += encoder_rows("vision_model.encoder", "img/encoder", vc["num_hidden_layers"])
  img += norm_rows("vision_model.post_layernorm", "img/encoder_norm")
  if vc.get("vision_use_head", True):
    img += [("vision_model.head.probe", "img/MAPHead/probe", "id")]
    img += _attention_rows("vision_model.head.attention", "img/MAPHead/attn")
    img += norm_rows("vision_model.head.layernorm", "img/MAPHead/norm")
    img += linear_rows("vision_model.head.mlp.fc1", "img/MAPHead/mlp/fc1")
    img += linear_rows("vision_model.head.mlp.fc2", "img/MAPHead/mlp/fc2")
  txt = [
    ("text_model.embeddings.token_embedding.weight", "txt/embedding/embedding", "id"),
    ("text_model.embeddings.position_embedding.weight", "txt/pos_embedding/pos_embedding", "batch1"),
  ]
  txt += encoder_rows("text_model.encoder", "txt/encoder", tc["num_hidden_layers"])
  txt += norm_rows("text_model.final_layer_norm", "txt/encoder_norm")
  txt += linear_rows("text_model.head", "txt/head")
  return (
    [r + ("image",) for r in img]
    + [r + ("text",) for r in txt]
    + [("logit_scale", "t", "scalar", "none"), ("logit_bias", "b", "scalar", "none")]
  )


def vision_tower_rows(vc: Mapping) -> list[Row]:
  """(canonical HF key 'vision_model.*', path under our 'vision', layout) for a CLIP / SigLIP vision tower
  config (model_type 'clip_vision_model' or 'siglip_vision_model'; no MAP head), as LLaVA holds it."""
  no_text = {"num_hidden_layers": 0}
  if vc["model_type"] == "clip_vision_model":
    table = clip_table(vc, no_text)
  else:
    table = siglip_table(dict(vc, vision_use_head=False), no_text)
  return [
    (hf, ours[len("img/") :], kind)
    for hf, ours, kind, tower in table
    if tower == "image" and hf.startswith("vision_model.")
  ]


def lm_table(kw: Mapping[str, Any]) -> list[tuple[str, str, str, int]]:
  """Rows (hf_key, our_path, layout, heads) of a Llama-style causal LM (canonical keys 'model.*', 'lm_head.*')
  -> our DecoderLM for its kwargs `kw` (depth, heads, biases, tie_embeddings). Layout 'norm': an RMSNorm
  scale (Gemma's is stored as weight - 1)."""
  n, k = kw["num_heads"], kw.get("num_kv_heads") or kw["num_heads"]
  rows = [("model.embed_tokens.weight", "embedding/embedding", "id", 0), ("model.norm.weight", "norm/scale", "norm", 0)]
  if not kw.get("tie_embeddings", False):
    rows.append(("lm_head.weight", "head/kernel", "dense", 0))
  for i in range(kw["depth"]):
    h, o = f"model.layers.{i}", f"decoder/block_{i}"
    rows += [
      (f"{h}.input_layernorm.weight", f"{o}/norm1/scale", "norm", 0),
      (f"{h}.post_attention_layernorm.weight", f"{o}/norm2/scale", "norm", 0),
    ]
    for a, b, heads in (("q_proj", "query", n), ("k_proj", "key", k), ("v_proj", "value", k)):
      rows.append((f"{h}.self_attn.{a}.weight", f"{o}/attn/{b}/kernel", "qkv", heads))
      if kw.get("qkv_bias", False):
        rows.append((f"{h}.self_attn.{a}.bias", f"{o}/attn/{b}/bias", "qkv_bias", heads))
    rows.append((f"{h}.self_attn.o_proj.weight", f"{o}/attn/out/kernel", "out", n))
    if kw.get("out_bias", False):
      rows.append((f"{h}.self_attn.o_proj.bias", f"{o}/attn/out/bias", "id", 0))
    for a, b in (("gate_proj", "wi_0"), ("up_proj", "wi_1"), ("down_proj", "wo")):
      rows.append((f"{h}.mlp.{a}.weight", f"{o}/mlp/{b}/kernel", "dense", 0))
      if kw.get("mlp_bias", False):
        rows.append((f"{h}.mlp.{a}.bias", f"{o}/mlp/{b}/bias", "id", 0))
  return rows


# -- configs --------------------------------------------------------------------------------------


def tower_kwargs(c: HFConfig) -> dict[str, Any]:
  """Encoder kwargs (width, depth, mlp_dim, num_heads, mlp_act, norm_eps) of an HF CLIP / SigLIP tower config."""
  if not isinstance(c, HFConfig):
    raise TypeError(f"tower_kwargs needs an HFConfig (vlm.convert.hf_config.read_config), got {type(c).__name__}")
  return dict(
    width=c["hidden_size"],
    depth=c["num_hidden_layers"],
    mlp_dim=c["intermediate_size"],
    num_heads=c["num_attention_heads"],
    mlp_act=c.choice("hidden_act", ACT_FROM_HF),
    norm_eps=float(c["layer_norm_eps"]),
  )


def square_size(c: HFConfig, key: str) -> int:
  """An image_size / patch_size: a positive int, or [h, w] with h == w (ConfigError otherwise)."""
  v = c[key]
  if isinstance(v, (list, tuple)) and len(v) == 2 and v[0] == v[1]:
    v = v[0]
  if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
    raise c.error(key, "expected a positive integer (or a square [h, w])")
  return v


def as_config(config, model_type: str | None = None) -> HFConfig:
  """An HFConfig (transformers' defaults filled) for an HFConfig (returned as it is), a transformers config
  (its to_dict) or a config.json dict; model_type: the type a dict without one has (a bare sub-config)."""
  if isinstance(config, HFConfig):
    return config
  file = "config.json"
  if hasattr(config, "to_dict"):
    file, config = type(config).__name__, config.to_dict()
  if not isinstance(config, Mapping):
    raise TypeError(f"expected an HF config (HFConfig, transformers config or dict), got {type(config).__name__}")
  config = dict(config)
  if model_type and not config.get("model_type"):
    config["model_type"] = model_type
  return hf_config.from_dict(config, file)


# -- sources --------------------------------------------------------------------------------------


def _numpy(x) -> np.ndarray:
  if hasattr(x, "detach"):  # a torch tensor
    x = x.detach().cpu().float().numpy()
  return np.asarray(x, np.float32)


def load_source(source, config) -> tuple[dict[str, np.ndarray], HFConfig]:
  """(tensors {HF key: array}, HFConfig) from an HF directory (its config.json unless config is given) or a
  state dict {key: array or torch tensor} (+ its config: an HFConfig, a transformers config or a dict)."""
  if isinstance(source, (str, Path)):
    path = Path(source)
    tensors = load_safetensors_dir(path)
    if config is None:
      config = hf_config.read_config(path)
  else:
    tensors = {k: _numpy(v) for k, v in source.items()}
  if config is None:
    raise ValueError("import from a state dict needs the HF config (a dict or a transformers config)")
  return tensors, as_config(config)


# Where a composite model's LM lives in the two key layouts (LLaVA, BLIP-2): stored prefix -> canonical prefix.
LM_LAYOUTS = (
  {"language_model.model.": "model.", "language_model.lm_head.": "lm_head."},  # old
  {"model.language_model.": "model.", "lm_head.": "lm_head."},
)  # new


class Part:
  """One part of a checkpoint under canonical keys (our tables' prefixes), able to name keys as stored.

  what: the part's name for messages; renames: {stored prefix: canonical prefix}; `take` files a tensor
  under its canonical key (into `tensors`) when its key has one of the stored prefixes."""

  def __init__(self, what: str, renames: dict[str, str]):
    self.what, self.renames, self.tensors = what, renames, {}  # renames: stored prefix -> canonical prefix

  def take(self, key: str, value: np.ndarray) -> bool:
    for theirs, ours in self.renames.items():
      if key.startswith(theirs):
        self.tensors[ours + key[len(theirs) :]] = value
        return True
    return False

  def stored(self, key: str) -> str:
    """The checkpoint's name for a canonical key."""
    for theirs, ours in self.renames.items():
      if key.startswith(ours):
        return theirs + key[len(ours) :]
    return key


def apply_part(part: Part, rows, where: Path | str, gemma_norm: bool = False) -> dict:
  """{our path tuple: float32 array} for rows (canonical key, our path, layout, heads) of `part`; layout 'norm'
  is an RMSNorm scale (+ 1 with gemma_norm). Raises naming the absent tensors as the checkpoint would store
  them (where: the checkpoint, for messages)."""
  missing = [part.stored(r[0]) for r in rows if r[0] not in part.tensors]
  if missing:
    raise ValueError(f"{where}: {part.what} tensors expected but absent: {missing[:20]}")
  flat = {}
  for key, ours, kind, heads in rows:
    x = np.asarray(part.tensors[key], np.float32)
    if kind == "norm":  # lm_table's RMSNorm scale (Gemma stores weight - 1)
      x = x + np.float32(1.0) if gemma_norm else x
    else:
      x = fwd(kind, x, heads)
    flat[tuple(ours.split("/"))] = np.ascontiguousarray(x, np.float32)
  return flat


# -- scanned layouts ------------------------------------------------------------------------------


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
