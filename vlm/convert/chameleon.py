"""Import of the text decoder of Hugging Face ChameleonForConditionalGeneration (Meta's Chameleon, early
fusion: images are VQ tokens in the decoder's vocabulary) into vlm.models.decoder.DecoderLM.

`import_hf_chameleon(path)` -> ('decoder_lm', DecoderLM kwargs, params float32) from config.json +
model.safetensors (or sharded); `vlm.convert.import_hf` dispatches here for model_type 'chameleon'. Never
unpickles. What maps where (a Llama layout plus per-head q/k LayerNorms):

- model.embed_tokens -> embedding; model.norm -> norm; lm_head -> head (tie_word_embeddings: tied).
- layers.i.{input,post_attention}_layernorm -> decoder/block_i/norm{1,2} (RMSNorm, eps rms_norm_eps).
  config swin_norm=True (norms on the outputs of attention and MLP: ChameleonSwinDecoderLayer) ->
  DecoderLM swin_norm=True, same tensors.
- self_attn.{q,k,v}_proj -> attn/{query,key,value} [D, heads, hd], o_proj -> attn/out [N, hd, D]; biases on
  all four when the checkpoint has them (attention_bias).
- self_attn.{q,k}_norm (ChameleonLayerNorm: LayerNorm over head_dim, then a per-head weight and bias
  [heads, hd], before rotary; eps fixed at 1e-5 in HF) -> attn/{query,key}_norm/{scale,bias} [N, hd] /
  [K, hd]: DecoderLM qk_norm='layer_per_head'. DecoderLM uses norm_eps (= rms_norm_eps) for these norms
  too, so a config whose rms_norm_eps is not 1e-5 raises.
- mlp.{gate,up,down}_proj -> mlp/{wi_0,wi_1,wo} (hidden_act 'silu' -> 'swiglu'; mlp_bias).
- rope: default rope only, theta from rope_parameters / rope_theta; head_dim = hidden_size / heads.

Not imported (ignored, whatever their content): the VQ-VAE image tokenizer `model.vqmodel.*` (encoder,
quantize codebook, quant_conv, post_quant_conv) and rotary `inv_freq` buffers. model_parallel_size
only records how the original checkpoint was sharded (HF stores the q/k norm weights per head already).

Image-token logits: HF's ChameleonForConditionalGeneration.forward sets the logits of every VQ image token
(vocabulary_map names 'IMGIMG...') to the dtype's min, so that text generation never emits them. The
imported DecoderLM does not (early-fusion training predicts image tokens); `image_token_ids(config)` gives
those ids and `suppress_tokens(step_fn, ids)` masks them in a vlm.decoding step function to reproduce HF's
text generation.
"""

import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vlm import decoding
from vlm.convert.hf import _fwd
from vlm.convert.llm import _GATED_FROM_HF, _rope_theta
from vlm.convert.llm import _table as _llm_table
from vlm.convert.safetensors_io import load_safetensors_dir

# ChameleonConfig's defaults (facebook/chameleon-7b).
_DEFAULTS = dict(vocab_size=65536, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, hidden_act="silu", rms_norm_eps=1e-5,
                 tie_word_embeddings=False, attention_bias=False, mlp_bias=False, swin_norm=False)
QK_NORM_EPS = 1e-5  # ChameleonLayerNorm's, hard-coded in transformers
_IGNORED_PREFIXES = ("model.vqmodel.",)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _config(config: dict) -> dict:
  """config.json with ChameleonConfig's defaults for absent (or null) fields."""
  if config.get("model_type") != "chameleon":
    raise ValueError(f"config.json: model_type {config.get('model_type')!r}, expected 'chameleon'")
  return {**_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}


def model_kwargs_from_hf_chameleon(config: dict, tensors: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
  """DecoderLM kwargs from an HF ChameleonConfig dict (tensors, if given, decide the attention biases).

  Raises ValueError naming the config field for what DecoderLM cannot express.
  """
  c = _config(config)
  act = c["hidden_act"]
  if act not in _GATED_FROM_HF:
    raise ValueError(f"config.json: hidden_act {act!r} is not supported; known: {sorted(_GATED_FROM_HF)}")
  width, heads = c["hidden_size"], c["num_attention_heads"]
  kv_heads = c["num_key_value_heads"] or heads
  if width % heads or heads % kv_heads:
    raise ValueError(f"config.json: hidden_size {width}, num_attention_heads {heads}, num_key_value_heads "
                     f"{kv_heads}: need hidden_size % heads == 0 and heads % kv_heads == 0")
  head_dim = width // heads  # ChameleonAttention's, whatever config.head_dim says
  if c.get("head_dim") not in (None, head_dim):
    raise ValueError(f"config.json: head_dim {c['head_dim']} != hidden_size / num_attention_heads = {head_dim}: "
                     "ChameleonAttention and its rotary embedding would disagree")
  eps = float(c["rms_norm_eps"])
  if eps != QK_NORM_EPS:
    raise ValueError(f"config.json: rms_norm_eps {eps} is not supported: DecoderLM shares norm_eps between the "
                     f"RMSNorms and the q/k LayerNorms, whose eps HF fixes at {QK_NORM_EPS}")
  if tensors is not None:
    attn_bias = "model.layers.0.self_attn.q_proj.bias" in tensors
    mlp_bias = "model.layers.0.mlp.gate_proj.bias" in tensors
  else:
    attn_bias, mlp_bias = bool(c["attention_bias"]), bool(c["mlp_bias"])
  return dict(vocab_size=c["vocab_size"], width=width, depth=c["num_hidden_layers"], num_heads=heads,
              num_kv_heads=kv_heads, head_dim=head_dim, mlp_dim=c["intermediate_size"], mlp_act=_GATED_FROM_HF[act],
              qkv_bias=attn_bias, out_bias=attn_bias, mlp_bias=mlp_bias, rope_theta=_rope_theta(c), norm_eps=eps,
              norm_type="rms", qk_norm="layer_per_head", swin_norm=bool(c["swin_norm"]), embed_scale=False,
              tie_embeddings=bool(c["tie_word_embeddings"]))


def _table(kw: dict) -> list[tuple[str, str, str, int]]:
  """Rows (hf_key, our_path, layout, heads): the Llama table (vlm.convert.llm; RMSNorm scales as they
  are) plus the per-head q/k LayerNorms."""
  rows = [(hf, ours, "id" if kind == "norm" else kind, heads) for hf, ours, kind, heads in _llm_table(kw)]
  for i in range(kw["depth"]):
    h, o = f"model.layers.{i}", f"decoder/block_{i}"
    for a, b in (("q_norm", "query_norm"), ("k_norm", "key_norm")):
      rows += [(f"{h}.self_attn.{a}.weight", f"{o}/attn/{b}/scale", "id", 0),
               (f"{h}.self_attn.{a}.bias", f"{o}/attn/{b}/bias", "id", 0)]
  return rows


def import_hf_chameleon(path: str | Path, scan: bool = False) -> tuple[str, dict[str, Any], dict]:
  """HF ChameleonForConditionalGeneration directory -> ('decoder_lm', DecoderLM kwargs, params float32).

  Raises naming the tensors that are absent or left unused (model.vqmodel.* excepted), and for config
  options DecoderLM cannot express.
  """
  if scan:
    raise NotImplementedError("DecoderLM has no scanned layout; import with scan=False")
  path = Path(path)
  config = json.loads((path / "config.json").read_text())
  tensors = load_safetensors_dir(path)
  kw = model_kwargs_from_hf_chameleon(config, tensors)
  table = _table(kw)
  missing = [hf for hf, *_ in table if hf not in tensors]
  if missing:
    raise ValueError(f"{path}: Chameleon tensors expected but absent: {missing[:20]}")
  n, k, hd = kw["num_heads"], kw["num_kv_heads"], kw["head_dim"]
  for i in range(kw["depth"]):
    for name, heads in (("q_norm", n), ("k_norm", k)):
      for w in ("weight", "bias"):
        key = f"model.layers.{i}.self_attn.{name}.{w}"
        if tensors[key].shape != (heads, hd):
          raise ValueError(f"{path}: {key} has shape {tensors[key].shape}; ChameleonLayerNorm's is "
                           f"(heads, head_dim) = {(heads, hd)}")
  flat = {}
  for hf, ours, kind, heads in table:
    x = _fwd(kind, np.asarray(tensors[hf], np.float32), heads)
    flat[tuple(ours.split("/"))] = np.ascontiguousarray(x, np.float32)
  used = {hf for hf, *_ in table} | ({"lm_head.weight"} if kw["tie_embeddings"] else set())
  unused = sorted(key for key in tensors if key not in used and not key.startswith(_IGNORED_PREFIXES)
                  and not key.endswith(_IGNORED_SUFFIXES))
  if unused:
    raise ValueError(f"{path}: tensors not used by the Chameleon importer (unsupported layout?): {unused[:20]}")
  return "decoder_lm", kw, traverse_util.unflatten_dict(flat)


def image_token_ids(config: dict) -> np.ndarray:
  """Sorted ids [M] int32 of the VQ image tokens: config.json's vocabulary_map entries named 'IMGIMG...'
  (HF's ChameleonImageVocabularyMapping.image_tokens). Empty without a vocabulary_map."""
  vocab = config.get("vocabulary_map") or {}
  return np.array(sorted(v for name, v in vocab.items() if name.startswith("IMGIMG")), np.int32)


def suppress_tokens(step_fn: decoding.StepFn, token_ids) -> decoding.StepFn:
  """A vlm.decoding step function whose logits of `token_ids` are the float32 minimum, as HF Chameleon's
  forward does for the image tokens: step_fn = suppress_tokens(make_step_fn(model, params),
  image_token_ids(config)) generates text as HF's ChameleonForConditionalGeneration.generate does."""
  ids = jnp.asarray(np.asarray(token_ids, np.int32))

  def wrapped(cache, tokens, index):
    logits, cache = step_fn(cache, tokens, index)
    return logits.at[..., ids].set(jnp.finfo(logits.dtype).min), cache

  return wrapped
