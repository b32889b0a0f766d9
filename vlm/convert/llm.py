"""Import of Hugging Face decoder-only LMs: LlamaForCausalLM, Qwen2ForCausalLM, GemmaForCausalLM.

`import_hf_llm(path)` -> ('decoder_lm', vlm.models.DecoderLM kwargs, params) from config.json +
model.safetensors (or sharded model.safetensors.index.json); `vlm.convert.import_hf` dispatches
here for model_type 'llama', 'qwen2', 'gemma'. config.json is read only through
vlm.convert.hf_config (transformers' defaults of that model_type for what the file leaves out); a
value DecoderLM cannot express is a ConfigError naming file, key and value. Never unpickles.
Export back to HF format: vlm.convert.export_lm. What maps where:

- model.embed_tokens -> embedding; lm_head -> head. Tied (no head) when tie_word_embeddings and the
  checkpoint has no lm_head or one equal to the embedding (transformers unties a tied config whose
  lm_head differs, so does vlm); an untied config without lm_head is an error (transformers would
  initialise it randomly).
- layers.i.{input,post_attention}_layernorm -> decoder/block_i/norm{1,2}; model.norm -> norm. With
  scan=True every decoder/block_i/... is stacked into decoder/layers/... [depth, ...] (DecoderLM
  scan_layers=True; so do the importers of models around a DecoderLM).
  Gemma's RMSNorm multiplies by (1 + weight): its scale is imported as 1 + weight (float32).
- self_attn.{q,k,v}_proj -> attn/{query,key,value} [D, heads, hd], o_proj -> attn/out [N, hd, D].
  Biases as the modeling code of that type has them: Qwen2 q/k/v always, o never; Llama q/k/v/o when
  attention_bias, MLP when mlp_bias; Gemma q/k/v/o when attention_bias.
- mlp.{gate,up,down}_proj -> mlp/{wi_0,wi_1,wo} (gated: act(gate) * up); hidden_act 'silu' ->
  'swiglu', tanh-GELU -> 'geglu'. Gemma: transformers 5 reads `hidden_act` only (legacy 'gelu' means
  the tanh approximation, GemmaConfig.__post_init__); transformers 4.39-4.47 read `hidden_activation`.
  Where the file gives both and they disagree, the import refuses (the two transformers disagree).
- rope: rope_theta and scaling (rope_type 'default', 'linear', 'dynamic', 'llama3', 'yarn';
  vlm.nn.rope) from rope_parameters (5.x files) or rope_theta + rope_scaling (4.x). Gemma:
  embeddings scaled by sqrt(hidden_size).
- Not expressible (ConfigError): Qwen2 sliding-window layers, Gemma bidirectional attention,
  partial rotary with a scaled rope, other rope types (longrope, ...), activations other than the above.
"""

from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

from vlm.convert import hf_config
from vlm.convert.common import GATED_FROM_HF, fwd, lm_table, stack_encoder_blocks
from vlm.convert.hf_config import HFConfig
from vlm.convert.registry import register_importer
from vlm.convert.safetensors_io import load_safetensors_dir
from vlm.nn import rope as rope_lib

MODEL_TYPES = ("llama", "qwen2", "gemma")


def as_config(config: "dict | HFConfig", file: str = "config.json") -> HFConfig:
  """An HFConfig for a config.json dict (defaults filled); an HFConfig is returned as it is."""
  return config if isinstance(config, HFConfig) else hf_config.from_dict(config, file)


def _rope_key(c: HFConfig) -> str:
  """The key that holds the rope settings in this file (for messages)."""
  return (
    "rope_parameters"
    if c.given("rope_parameters") and c["rope_parameters"] is not None
    else ("rope_scaling" if c.given("rope_scaling") else "rope_theta")
  )


def rope_kwargs(c: HFConfig) -> dict[str, Any]:
  """DecoderLM's rope_theta (and rope_scaling, only for a scaled rope) from a text config; ConfigError
  naming the rope key for what vlm.nn.rope does not implement."""
  rp = hf_config.rope_parameters(c)
  try:
    scaling = rope_lib.scaling_from_hf(rp, c["max_position_embeddings"])
  except ValueError as e:
    raise c.error(_rope_key(c), str(e)) from None
  kw = dict(rope_theta=float(rp["rope_theta"]))
  if scaling is not None:
    kw["rope_scaling"] = scaling
  return kw


def _rope_theta(config) -> float:
  """Default-rope theta. An HFConfig is read through hf_config; a plain dict (the importers not yet on
  hf_config: fuyu, chameleon, idefics) keeps transformers' fallback 10000 (default_theta)."""
  if isinstance(config, HFConfig):
    kw = rope_kwargs(config)
    if "rope_scaling" in kw:
      raise config.error(_rope_key(config), "only the default rope is supported for this model type")
    return kw["rope_theta"]
  rp = config.get("rope_parameters") or {}
  scaling = config.get("rope_scaling") or {}
  rope_type = rp.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
  if rope_type != "default":
    raise ValueError(f"config.json: rope_type {rope_type!r} is not supported (default rope only)")
  return float(rp.get("rope_theta", config.get("rope_theta", 10000.0)))


def _activation(c: HFConfig) -> str:
  """The gated MLP activation as transformers runs it (see the module docstring for Gemma)."""
  if c.model_type != "gemma":
    return c.choice("hidden_act", GATED_FROM_HF)
  act = c["hidden_act"]
  act = "gelu_pytorch_tanh" if act == "gelu" else act  # GemmaConfig.__post_init__ (transformers 5)
  legacy = c["hidden_activation"]  # transformers 4.39-4.47's GemmaMLP read this one
  if c.given("hidden_activation") and legacy is not None and legacy != act:
    raise c.error(
      "hidden_activation",
      f"disagrees with hidden_act = {c['hidden_act']!r} (which transformers 5 "
      f"runs as {act!r}; transformers 4.39-4.47 ran hidden_activation): make them agree",
    )
  if act not in GATED_FROM_HF:
    raise c.error("hidden_act", f"not supported by vlm; supported: {', '.join(sorted(map(repr, GATED_FROM_HF)))}")
  return GATED_FROM_HF[act]


def _tied(c: HFConfig, tie: bool, tensors: dict[str, np.ndarray] | None) -> bool:
  """Whether the head is the embedding, as transformers' tie_weights decides for this checkpoint."""
  if tensors is None:
    return bool(tie)
  head, emb = tensors.get("lm_head.weight"), tensors.get("model.embed_tokens.weight")
  if head is None:
    if not tie:
      raise c.error(
        "tie_word_embeddings",
        "but the checkpoint has no lm_head.weight (transformers would initialise the head randomly)",
      )
    return True
  if tie and emb is not None and not np.array_equal(np.asarray(head), np.asarray(emb)):
    return False  # transformers: both present and different -> not tied
  return bool(tie)


def model_kwargs_from_hf_llm(
  config: "dict | HFConfig", tensors: dict[str, np.ndarray] | None = None, tie: bool | None = None
) -> dict[str, Any]:
  """DecoderLM kwargs from an HF Llama / Qwen2 / Gemma config (a config.json dict or an HFConfig).

  tensors (canonical keys 'model.*', 'lm_head.*'), if given, decide the tying as transformers does;
  tie: the tie_word_embeddings that applies (default: the config's; LLaVA passes its top-level one)."""
  c = as_config(config)
  mt = c.model_type
  if mt not in MODEL_TYPES:
    raise c.error("model_type", f"not a decoder LM vlm.convert.llm imports; supported: {MODEL_TYPES}")
  if mt == "qwen2":
    window = c["sliding_window"] if c["use_sliding_window"] else None  # Qwen2Config.__post_init__
    if window is not None and "sliding_attention" in c["layer_types"]:
      raise c.error(
        "use_sliding_window",
        f"sliding-window attention (sliding_window = {window}, layer_types "
        f"{c['layer_types']}) is not supported by DecoderLM",
      )
  if mt == "gemma" and c["use_bidirectional_attention"]:
    raise c.error("use_bidirectional_attention", "DecoderLM is causal")
  act = _activation(c)
  width, heads = c["hidden_size"], c["num_attention_heads"]
  if mt == "qwen2":  # Qwen2Attention: getattr(config, "head_dim", None) or hidden_size // heads
    head_dim = (c["head_dim"] if "head_dim" in c else None) or width // heads
    qkv_bias, out_bias, mlp_bias = True, False, False
  else:
    head_dim = c["head_dim"]
    qkv_bias = out_bias = bool(c["attention_bias"])
    mlp_bias = bool(c["mlp_bias"]) if mt == "llama" else False
  tie = c["tie_word_embeddings"] if tie is None else tie
  return dict(
    vocab_size=c["vocab_size"],
    width=width,
    depth=c["num_hidden_layers"],
    num_heads=heads,
    num_kv_heads=c["num_key_value_heads"],
    head_dim=head_dim,
    mlp_dim=c["intermediate_size"],
    mlp_act=act,
    qkv_bias=qkv_bias,
    out_bias=out_bias,
    mlp_bias=mlp_bias,
    **rope_kwargs(c),
    norm_eps=float(c["rms_norm_eps"]),
    embed_scale=(mt == "gemma"),
    tie_embeddings=_tied(c, tie, tensors),
  )


@register_importer(*MODEL_TYPES)
def import_hf_llm(path: str | Path, scan: bool = False) -> tuple[str, dict[str, Any], dict]:
  """HF Llama / Qwen2 / Gemma causal-LM directory -> ('decoder_lm', DecoderLM kwargs, params float32).

  scan: the scanned layout, kwargs scan_layers=True and decoder/layers/... stacked [depth, ...]."""
  path = Path(path)
  config = hf_config.read_config(path)
  tensors = load_safetensors_dir(path)
  kw = model_kwargs_from_hf_llm(config, tensors)
  gemma = config.model_type == "gemma"
  table = lm_table(kw)
  missing = [hf for hf, *_ in table if hf not in tensors]
  if missing:
    raise ValueError(f"{path}: tensors expected for {config.model_type} but absent: {missing[:20]}")
  flat = {}
  for hf, ours, kind, heads in table:
    x = np.asarray(tensors[hf], np.float32)
    if kind == "norm":
      x = x + np.float32(1.0) if gemma else x
    else:
      x = fwd(kind, x, heads)
    flat[tuple(ours.split("/"))] = np.ascontiguousarray(x, np.float32)
  ignored = {"lm_head.weight"} if kw["tie_embeddings"] else set()  # a tied head saved anyway
  unused = sorted(
    set(tensors) - {hf for hf, *_ in table} - ignored - {k for k in tensors if k.endswith("rotary_emb.inv_freq")}
  )
  if unused:
    raise ValueError(f"{path}: tensors not used by the importer (unsupported layout?): {unused[:20]}")
  params = traverse_util.unflatten_dict(flat)
  if scan:
    return "decoder_lm", dict(kw, scan_layers=True), stack_encoder_blocks(params, names=("decoder",))
  return "decoder_lm", kw, params
