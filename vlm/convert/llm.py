"""Import of Hugging Face decoder-only LMs: LlamaForCausalLM, Qwen2ForCausalLM, GemmaForCausalLM.

`import_hf_llm(path)` -> ('decoder_lm', vlm.models.DecoderLM kwargs, params) from config.json +
model.safetensors (or sharded model.safetensors.index.json); `vlm.convert.import_hf` dispatches
here for model_type 'llama', 'qwen2', 'gemma'. Never unpickles. What maps where:

- model.embed_tokens -> embedding; lm_head -> head (absent, or tie_word_embeddings: tied).
- layers.i.{input,post_attention}_layernorm -> decoder/block_i/norm{1,2}; model.norm -> norm.
  Gemma's RMSNorm multiplies by (1 + weight): its scale is imported as 1 + weight (float32).
- self_attn.{q,k,v}_proj -> attn/{query,key,value} [D, heads, hd], o_proj -> attn/out [N, hd, D];
  biases wherever the checkpoint has them (Qwen2: q/k/v only; Llama: attention_bias on all four).
- mlp.{gate,up,down}_proj -> mlp/{wi_0,wi_1,wo} (gated: act(gate) * up); hidden act 'silu' ->
  'swiglu', tanh-GELU -> 'geglu'.
- rope: default rope only (rope_type 'default'; scaled variants raise), theta from
  rope_parameters / rope_theta. Gemma: embeddings scaled by sqrt(hidden_size).
"""

import json
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

from vlm.convert.hf import _fwd
from vlm.convert.safetensors_io import load_safetensors_dir

MODEL_TYPES = ("llama", "qwen2", "gemma")
_GATED_FROM_HF = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu_tanh": "geglu",
                  "gelu_new": "geglu", "gelu_fast": "geglu"}


def _rope_theta(config: dict) -> float:
  rp = config.get("rope_parameters") or {}
  scaling = config.get("rope_scaling") or {}
  rope_type = rp.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
  if rope_type != "default":
    raise ValueError(f"config.json: rope_type {rope_type!r} is not supported (default rope only)")
  theta = rp.get("rope_theta", config.get("rope_theta", 10000.0))
  return float(theta)


def model_kwargs_from_hf_llm(config: dict, tensors: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
  """DecoderLM kwargs from an HF config.json dict (tensors, if given, decide the biases and tying)."""
  mt = config.get("model_type")
  if mt not in MODEL_TYPES:
    raise ValueError(f"model_type {mt!r} is not a supported decoder LM; known: {MODEL_TYPES}")
  if config.get("use_sliding_window"):
    raise ValueError("config.json: use_sliding_window=True is not supported")
  if mt == "gemma":
    act = config.get("hidden_activation") or "gelu_pytorch_tanh"
  else:
    act = config.get("hidden_act", "silu")
  if act not in _GATED_FROM_HF:
    raise ValueError(f"config.json: activation {act!r} is not supported; known: {sorted(_GATED_FROM_HF)}")
  width, heads = config["hidden_size"], config["num_attention_heads"]
  head_dim = config.get("head_dim") or width // heads
  layer0 = "model.layers.0"
  if tensors is not None:  # the checkpoint decides
    qkv_bias = f"{layer0}.self_attn.q_proj.bias" in tensors
    out_bias = f"{layer0}.self_attn.o_proj.bias" in tensors
    mlp_bias = f"{layer0}.mlp.gate_proj.bias" in tensors
  else:
    qkv_bias = mt == "qwen2" or config.get("attention_bias", False)
    out_bias = mt != "qwen2" and config.get("attention_bias", False)
    mlp_bias = config.get("mlp_bias", False)
  tie = config.get("tie_word_embeddings", mt == "gemma") or (tensors is not None and "lm_head.weight" not in tensors)
  return dict(
      vocab_size=config["vocab_size"], width=width, depth=config["num_hidden_layers"], num_heads=heads,
      num_kv_heads=config.get("num_key_value_heads") or heads, head_dim=head_dim,
      mlp_dim=config["intermediate_size"], mlp_act=_GATED_FROM_HF[act], qkv_bias=bool(qkv_bias),
      out_bias=bool(out_bias), mlp_bias=bool(mlp_bias), rope_theta=_rope_theta(config),
      norm_eps=float(config.get("rms_norm_eps", 1e-6)), embed_scale=(mt == "gemma"), tie_embeddings=bool(tie),
  )


def _table(kw: dict) -> list[tuple[str, str, str, int]]:
  """Rows (hf_key, our_path, layout, heads)."""
  n, k = kw["num_heads"], kw["num_kv_heads"]
  rows = [("model.embed_tokens.weight", "embedding/embedding", "id", 0),
          ("model.norm.weight", "norm/scale", "norm", 0)]
  if not kw["tie_embeddings"]:
    rows.append(("lm_head.weight", "head/kernel", "dense", 0))
  for i in range(kw["depth"]):
    h, o = f"model.layers.{i}", f"decoder/block_{i}"
    rows += [(f"{h}.input_layernorm.weight", f"{o}/norm1/scale", "norm", 0),
             (f"{h}.post_attention_layernorm.weight", f"{o}/norm2/scale", "norm", 0)]
    for a, b, heads in (("q_proj", "query", n), ("k_proj", "key", k), ("v_proj", "value", k)):
      rows.append((f"{h}.self_attn.{a}.weight", f"{o}/attn/{b}/kernel", "qkv", heads))
      if kw["qkv_bias"]:
        rows.append((f"{h}.self_attn.{a}.bias", f"{o}/attn/{b}/bias", "qkv_bias", heads))
    rows.append((f"{h}.self_attn.o_proj.weight", f"{o}/attn/out/kernel", "out", n))
    if kw["out_bias"]:
      rows.append((f"{h}.self_attn.o_proj.bias", f"{o}/attn/out/bias", "id", 0))
    for a, b in (("gate_proj", "wi_0"), ("up_proj", "wi_1"), ("down_proj", "wo")):
      rows.append((f"{h}.mlp.{a}.weight", f"{o}/mlp/{b}/kernel", "dense", 0))
      if kw["mlp_bias"]:
        rows.append((f"{h}.mlp.{a}.bias", f"{o}/mlp/{b}/bias", "id", 0))
  return rows


def import_hf_llm(path: str | Path, scan: bool = False) -> tuple[str, dict[str, Any], dict]:
  """HF Llama / Qwen2 / Gemma causal-LM directory -> ('decoder_lm', DecoderLM kwargs, params float32)."""
  if scan:
    raise NotImplementedError("DecoderLM has no scanned layout; import with scan=False")
  path = Path(path)
  config = json.loads((path / "config.json").read_text())
  tensors = load_safetensors_dir(path)
  kw = model_kwargs_from_hf_llm(config, tensors)
  gemma = config["model_type"] == "gemma"
  table = _table(kw)
  missing = [hf for hf, *_ in table if hf not in tensors]
  if missing:
    raise ValueError(f"{path}: tensors expected for {config['model_type']} but absent: {missing[:20]}")
  flat = {}
  for hf, ours, kind, heads in table:
    x = np.asarray(tensors[hf], np.float32)
    if kind == "norm":
      x = x + np.float32(1.0) if gemma else x
    else:
      x = _fwd(kind, x, heads)
    flat[tuple(ours.split("/"))] = np.ascontiguousarray(x, np.float32)
  ignored = {"lm_head.weight"} if kw["tie_embeddings"] else set()  # a tied head saved anyway
  unused = sorted(set(tensors) - {hf for hf, *_ in table} - ignored
                  - {k for k in tensors if k.endswith("rotary_emb.inv_freq")})
  if unused:
    raise ValueError(f"{path}: tensors not used by the importer (unsupported layout?): {unused[:20]}")
  return "decoder_lm", kw, traverse_util.unflatten_dict(flat)
