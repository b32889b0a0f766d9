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
  all four when attention_bias (as ChameleonAttention builds them).
- self_attn.{q,k}_norm (ChameleonLayerNorm: LayerNorm over head_dim, then a per-head weight and bias
  [heads, hd], before rotary; eps fixed at 1e-5 in HF) -> attn/{query,key}_norm/{scale,bias} [N, hd] /
  [K, hd]: DecoderLM qk_norm='layer_per_head'. DecoderLM uses norm_eps (= rms_norm_eps) for these norms
  too, so a config whose rms_norm_eps is not 1e-5 raises.
- mlp.{gate,up,down}_proj -> mlp/{wi_0,wi_1,wo} (hidden_act 'silu' -> 'swiglu'; mlp_bias).
- rope: default rope only (a scaled rope_parameters / rope_scaling is a ConfigError), theta from
  rope_parameters (5.x files) or rope_theta (4.x); head_dim = hidden_size / heads.

Config: config.json is read only through vlm.convert.hf_config (ChameleonConfig's defaults for what a
4.x file leaves out); a value DecoderLM cannot express is a ConfigError naming file, key and value. The
head is tied as transformers ties it: tie_word_embeddings and no lm_head (or one equal to the embedding).

Not imported (ignored, whatever their content): the VQ-VAE image tokenizer `model.vqmodel.*` (encoder,
quantize codebook, quant_conv, post_quant_conv) and rotary `inv_freq` buffers. model_parallel_size
only records how the original checkpoint was sharded (HF stores the q/k norm weights per head already).

Image-token logits: HF's ChameleonForConditionalGeneration.forward sets the logits of every VQ image token
(vocabulary_map names 'IMGIMG...') to the dtype's min, so that text generation never emits them. The
imported DecoderLM does not (early-fusion training predicts image tokens); `image_token_ids(config)` gives
those ids and `suppress_tokens(step_fn, ids)` masks them in a vlm.decoding step function to reproduce HF's
text generation.

`default_rope` and `tied_head` are shared with the other importers whose decoders transformers builds
the same way (vlm.convert.fuyu, vlm.convert.idefics).
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vlm import decoding
from vlm.convert import hf_config
from vlm.convert.common import GATED_FROM_HF, fwd, lm_table, stack_encoder_blocks
from vlm.convert.hf_config import HFConfig
from vlm.convert.registry import register_importer
from vlm.convert.safetensors_io import load_safetensors_dir

QK_NORM_EPS = 1e-5  # ChameleonLayerNorm's, hard-coded in transformers
_IGNORED_PREFIXES = ("model.vqmodel.",)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def default_rope(c: HFConfig) -> dict[str, Any]:
  """transformers 5's rope_parameters of a text config (vlm.convert.hf_config.rope_parameters: 5.x
  rope_parameters or 4.x rope_theta + rope_scaling), which must be the default (unscaled) rope; else a
  ConfigError naming the key that holds it."""
  rp = hf_config.rope_parameters(c)
  if rp["rope_type"] != "default":
    key = "rope_parameters" if c.given("rope_parameters") and c["rope_parameters"] is not None else "rope_scaling"
    raise c.error(key, f"rope_type {rp['rope_type']!r}: only the default rope is supported for {c.model_type}")
  return rp


def tied_head(
  c: HFConfig,
  tensors: Mapping[str, np.ndarray] | None,
  head: str = "lm_head.weight",
  embed: str = "model.embed_tokens.weight",
  key: str = "tie_word_embeddings",
) -> bool:
  """Whether the output head is the input embedding, as transformers' tie_weights decides at load time: c[key]
  and either no `head` tensor or one equal to `embed` (both present and different: not tied). An untied
  config whose checkpoint lacks the head is a ConfigError (transformers would initialise it randomly)."""
  tie = bool(c[key])
  if tensors is None:
    return tie
  if head not in tensors:
    if not tie:
      raise c.error(key, f"but the checkpoint has no {head} (transformers would initialise the head randomly)")
    return True
  return tie and embed in tensors and np.array_equal(np.asarray(tensors[head]), np.asarray(tensors[embed]))


def model_kwargs_from_hf_chameleon(config, tensors: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
  """DecoderLM kwargs from an HF ChameleonConfig (an HFConfig, or a config.json dict: wrapped with
  hf_config.from_dict; tensors, if given, decide the head tying as transformers does). Biases as
  transformers builds them: q/k/v/o when attention_bias, the MLP's when mlp_bias.

  Raises ConfigError naming file, key and value for what DecoderLM cannot express.
  """
  c = config if isinstance(config, HFConfig) else hf_config.from_dict(dict(config))
  if c.model_type != "chameleon":
    raise c.error("model_type", "expected 'chameleon'")
  act = c.choice("hidden_act", GATED_FROM_HF)
  width, heads, kv_heads = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
  if width % heads:
    raise c.error("hidden_size", f"not a multiple of num_attention_heads = {heads}")
  if heads % kv_heads:
    raise c.error("num_key_value_heads", f"does not divide num_attention_heads = {heads}")
  head_dim = width // heads  # ChameleonAttention's, whatever config.head_dim says
  if c.given("head_dim") and c["head_dim"] not in (None, head_dim):
    raise c.error(
      "head_dim",
      f"!= hidden_size / num_attention_heads = {head_dim}: ChameleonAttention and its rotary embedding would disagree",
    )
  eps = float(c["rms_norm_eps"])
  if eps != QK_NORM_EPS:
    raise c.error(
      "rms_norm_eps",
      f"DecoderLM shares norm_eps between the RMSNorms and the q/k LayerNorms, whose eps HF fixes at {QK_NORM_EPS}",
    )
  attn_bias, mlp_bias = bool(c["attention_bias"]), bool(c["mlp_bias"])  # as ChameleonAttention / ChameleonMLP
  return dict(
    vocab_size=c["vocab_size"],
    width=width,
    depth=c["num_hidden_layers"],
    num_heads=heads,
    num_kv_heads=kv_heads,
    head_dim=head_dim,
    mlp_dim=c["intermediate_size"],
    mlp_act=act,
    qkv_bias=attn_bias,
    out_bias=attn_bias,
    mlp_bias=mlp_bias,
    rope_theta=float(default_rope(c)["rope_theta"]),
    norm_eps=eps,
    norm_type="rms",
    qk_norm="layer_per_head",
    swin_norm=bool(c["swin_norm"]),
    embed_scale=False,
    tie_embeddings=tied_head(c, tensors),
  )


def _chameleon_table(kw: dict) -> list[tuple[str, str, str, int]]:
  """Rows (hf_key, our_path, layout, heads): the Llama table (vlm.convert.common.lm_table; RMSNorm scales as
  they are) plus the per-head q/k LayerNorms."""
  rows = [(hf, ours, "id" if kind == "norm" else kind, heads) for hf, ours, kind, heads in lm_table(kw)]
  for i in range(kw["depth"]):
    h, o = f"model.layers.{i}", f"decoder/block_{i}"
    for a, b in (("q_norm", "query_norm"), ("k_norm", "key_norm")):
      rows += [
        (f"{h}.self_attn.{a}.weight", f"{o}/attn/{b}/scale", "id", 0),
        (f"{h}.self_attn.{a}.bias", f"{o}/attn/{b}/bias", "id", 0),
      ]
  return rows


@register_importer("chameleon")  # the text decoder only (the VQ-VAE is not imported)
def import_hf_chameleon(path: str | Path, scan: bool = False) -> tuple[str, dict[str, Any], dict]:
  """HF ChameleonForConditionalGeneration directory -> ('decoder_lm', DecoderLM kwargs, params float32).

  Raises naming the tensors that are absent or left unused (model.vqmodel.* excepted), and for config
  options DecoderLM cannot express. scan: the scanned layout (scan_layers=True, decoder/layers/... [depth, ...]).
  """
  path = Path(path)
  config = hf_config.read_config(path)
  tensors = load_safetensors_dir(path)
  kw = model_kwargs_from_hf_chameleon(config, tensors)
  table = _chameleon_table(kw)
  missing = [hf for hf, *_ in table if hf not in tensors]
  if missing:
    raise ValueError(f"{path}: Chameleon tensors expected but absent: {missing[:20]}")
  n, k, hd = kw["num_heads"], kw["num_kv_heads"], kw["head_dim"]
  for i in range(kw["depth"]):
    for name, heads in (("q_norm", n), ("k_norm", k)):
      for w in ("weight", "bias"):
        key = f"model.layers.{i}.self_attn.{name}.{w}"
        if tensors[key].shape != (heads, hd):
          raise ValueError(
            f"{path}: {key} has shape {tensors[key].shape}; ChameleonLayerNorm's is (heads, head_dim) = {(heads, hd)}"
          )
  flat = {}
  for hf, ours, kind, heads in table:
    x = fwd(kind, np.asarray(tensors[hf], np.float32), heads)
    flat[tuple(ours.split("/"))] = np.ascontiguousarray(x, np.float32)
  used = {hf for hf, *_ in table} | ({"lm_head.weight"} if kw["tie_embeddings"] else set())
  unused = sorted(
    key
    for key in tensors
    if key not in used and not key.startswith(_IGNORED_PREFIXES) and not key.endswith(_IGNORED_SUFFIXES)
  )
  if unused:
    raise ValueError(f"{path}: tensors not used by the Chameleon importer (unsupported layout?): {unused[:20]}")
  params = traverse_util.unflatten_dict(flat)
  if scan:
    return "decoder_lm", dict(kw, scan_layers=True), stack_encoder_blocks(params, names=("decoder",))
  return "decoder_lm", kw, params


def image_token_ids(config) -> np.ndarray:
  """Sorted ids [M] int32 of the VQ image tokens: the config's vocabulary_map entries named 'IMGIMG...'
  (HF's ChameleonImageVocabularyMapping.image_tokens). Empty without a vocabulary_map. config: an HFConfig,
  a checkpoint directory (or its config.json) or a config.json dict."""
  if isinstance(config, (str, Path)):
    config = hf_config.read_config(config)
  c = config if isinstance(config, HFConfig) else hf_config.from_dict(dict(config))
  vocab = c["vocabulary_map"] or {}
  return np.array(sorted(v for name, v in vocab.items() if name.startswith("IMGIMG")), np.int32)


def suppress_tokens(step_fn: decoding.StepFn, token_ids) -> decoding.StepFn:
  """A vlm.decoding step function whose logits of `token_ids` are the float32 minimum, as HF Chameleon's
  forward does for the image tokens: step_fn = suppress_tokens(vlm.models.generation.step_fn(model, params),
  image_token_ids(config)) generates text as HF's ChameleonForConditionalGeneration.generate does."""
  ids = jnp.asarray(np.asarray(token_ids, np.int32))

  def wrapped(cache, tokens, index):
    logits, cache = step_fn(cache, tokens, index)
    return logits.at[..., ids].set(jnp.finfo(logits.dtype).min), cache

  return wrapped
