"""One reader for Hugging Face config.json files, with transformers' defaults filled in.

Checkpoints on the Hub were mostly written by transformers 4.x, whose `save_pretrained` leaves out
of each nested sub-config (`text_config`, `vision_config`, `qformer_config`, ...) every key equal
to that sub-config class's default, and out of the top level every key equal to
`PretrainedConfig`'s default. `from_pretrained` puts them back from the config classes; so does
`read_config`, from `DEFAULTS`: for each `model_type`, the defaults of its transformers config
class (`XConfig().to_dict()`; tests/test_hf_config.py checks every entry against the installed
transformers, so the table cannot drift). transformers stays a test dependency.

    cfg = read_config(directory)              # or read_config(".../config.json")
    cfg["text_config"]["hidden_act"]           # 'gelu_pytorch_tanh' for SigLIP when absent
    cfg.choice("hidden_act", ACT_FROM_HF)      # mapped value, or ConfigError naming key, value, file

A key vlm reads that is neither in the file nor in the table is a KeyError naming the file, the
sub-config and the table entry to add: never a guessed default. `ConfigError` (a ValueError) names
the key, its value and the file for values vlm does not support.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any


class _Derived:
  """A default that transformers computes from other keys when the key is absent (see _derive)."""

  def __repr__(self) -> str:
    return "DERIVED"

  def __deepcopy__(self, memo) -> "_Derived":
    return self


DERIVED = _Derived()

# Top-level keys of transformers 4.x's PretrainedConfig.__init__ that vlm reads (configuration_utils.py
# of 4.x: tie_word_embeddings=True, token ids None). 4.x left these out of config.json when equal.
PRETRAINED_DEFAULTS: dict[str, Any] = {
  "tie_word_embeddings": True,
  "pad_token_id": None,
  "bos_token_id": None,
  "eos_token_id": None,
  "sep_token_id": None,
  "decoder_start_token_id": None,
  "is_decoder": False,
  "add_cross_attention": False,
  "torch_dtype": None,
  "architectures": None,
}

# Keys that transformers 4.x wrote and 5.x folds elsewhere (rope_theta / rope_scaling into
# rope_parameters); the 4.x defaults, so a 4.x file with them left out reads right.
# rope_theta is transformers 5's default theta (`RotaryEmbeddingConfigMixin.default_theta`, 10000 for all
# of these), which is what 5.x `from_pretrained` uses for a file without one. (4.x's PersimmonConfig had
# 25000; a Persimmon sub-config that 4.x wrote without rope_theta loads in 5.x with 10000, and here too.)
_V4_DEFAULTS: dict[str, dict[str, Any]] = {
  "llama": {"rope_theta": 10000.0, "rope_scaling": None},
  "qwen2": {"rope_theta": 10000.0, "rope_scaling": None},
  "gemma": {"rope_theta": 10000.0, "rope_scaling": None, "hidden_activation": None},
  "persimmon": {"rope_theta": 10000.0, "rope_scaling": None, "partial_rotary_factor": 0.5},
  "idefics": {"rope_theta": 10000.0, "rope_scaling": None},
  "chameleon": {"rope_theta": 10000.0, "rope_scaling": None},
}

# transformers 5.x XConfig().to_dict() for every model_type vlm imports, less bookkeeping keys
# (architectures, id2label, return_dict, ...) and sub-configs (see SUB_CONFIGS).
DEFAULTS: dict[str, dict[str, Any]] = {}  # filled below from _TABLE

SUB_CONFIGS: dict[str, dict[str, str]] = {
  "clip": {"text_config": "clip_text_model", "vision_config": "clip_vision_model"},
  "siglip": {"text_config": "siglip_text_model", "vision_config": "siglip_vision_model"},
  "flava": {
    "image_config": "flava_image_model",
    "text_config": "flava_text_model",
    "multimodal_config": "flava_multimodal_model",
    "image_codebook_config": "flava_image_codebook",
  },
  "llava": {"vision_config": "clip_vision_model", "text_config": "llama"},
  "llava_next": {"vision_config": "clip_vision_model", "text_config": "llama"},
  "llava_next_video": {"vision_config": "clip_vision_model", "text_config": "llama"},
  "video_llava": {"vision_config": "clip_vision_model", "text_config": "llama"},
  "blip-2": {"vision_config": "blip_2_vision_model", "qformer_config": "blip_2_qformer", "text_config": "opt"},
  "idefics": {"vision_config": "idefics_vision", "perceiver_config": "idefics_perciever"},
  "fuyu": {"text_config": "persimmon"},
  "chameleon": {"vq_config": "chameleon_vqgan"},
}


def _clip_vit_l14(image_size: int) -> dict[str, Any]:
  """CLIPVisionConfig of OpenAI's ViT-L/14 at image_size, as the LLaVA configs build it."""
  return dict(
    model_type="clip_vision_model",
    hidden_size=1024,
    intermediate_size=4096,
    projection_dim=768,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=image_size,
    patch_size=14,
    vocab_size=32000,
  )


# What a parent config builds when a sub-config is absent or null (LlavaConfig.__post_init__ builds a
# CLIP ViT-L/14-336 vision config, not CLIPVisionConfig()'s B/32).
ABSENT_SUB_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
  "llava": {"vision_config": _clip_vit_l14(336)},
  "llava_next": {"vision_config": _clip_vit_l14(336)},
  # VideoLlavaConfig's sub_configs_defaults: a CLIP ViT-L/14 at 224 (LanguageBind's towers)
  "video_llava": {"vision_config": _clip_vit_l14(224)},
  "llava_next_video": {"vision_config": _clip_vit_l14(336)},
}


class ConfigError(ValueError):
  """A config.json value vlm cannot represent; the message names file, key and value."""


class HFConfig(Mapping):
  """A config.json (or one of its sub-configs) with transformers' defaults filled in.

  Reads like a dict; sub-configs listed in SUB_CONFIGS come back as HFConfig. `given(key)` says
  whether the file itself had the key; `where(key)` is 'FILE: text_config.key' for messages.
  """

  def __init__(self, raw: Mapping[str, Any], model_type: str, file: str = "config.json", prefix: str = ""):
    self.raw, self.model_type, self.file, self.prefix = dict(raw), model_type, file, prefix
    if model_type not in DEFAULTS:
      raise ConfigError(f"{file}: {prefix}model_type {model_type!r} is not one vlm reads; known: {sorted(DEFAULTS)}")
    values = dict(PRETRAINED_DEFAULTS)
    values.update(copy.deepcopy(DEFAULTS[model_type]))
    values.update(copy.deepcopy(_V4_DEFAULTS.get(model_type, {})))
    values.update(self.raw)
    _derive(values, self.raw)
    values["model_type"] = model_type
    self._values = values
    self._subs: dict[str, HFConfig] = {}
    for key, sub_type in SUB_CONFIGS.get(model_type, {}).items():
      sub = self.raw.get(key)
      if sub is None:
        sub = ABSENT_SUB_CONFIGS.get(model_type, {}).get(key, {"model_type": sub_type})
      elif not isinstance(sub, Mapping):
        raise ConfigError(f"{self.where(key)} = {sub!r}: expected a JSON object")
      self._subs[key] = HFConfig(sub, sub.get("model_type") or sub_type, file, f"{prefix}{key}.")

  # Mapping interface ------------------------------------------------------------------------------
  def __getitem__(self, key: str) -> Any:
    if key in self._subs:
      return self._subs[key]
    if key not in self._values:
      raise KeyError(
        f"{self.where(key)} is absent and vlm has no transformers default for it "
        f"(model_type {self.model_type!r}: add it to vlm.convert.hf_config's table)"
      )
    return self._values[key]

  def __iter__(self) -> Iterator[str]:
    return iter(self._values)

  def __len__(self) -> int:
    return len(self._values)

  def __repr__(self) -> str:
    return f"HFConfig({self.model_type!r}, {self.file}{': ' + self.prefix if self.prefix else ''})"

  # Helpers for importers --------------------------------------------------------------------------
  def given(self, key: str) -> bool:
    """Whether the file itself has `key` (not a filled-in default)."""
    return key in self.raw

  def where(self, key: str) -> str:
    return f"{self.file}: {self.prefix}{key}"

  def error(self, key: str, why: str) -> ConfigError:
    """A ConfigError naming this key, its value and the file."""
    value = self._values.get(key, self.raw.get(key))
    return ConfigError(f"{self.where(key)} = {value!r}: {why}")

  def choice(self, key: str, options: Mapping[Any, Any] | Collection[Any]) -> Any:
    """The value of `key`, mapped through `options` if it is a Mapping; an unsupported value is a
    ConfigError that lists the supported ones."""
    value = self[key]
    try:
      ok = value in options
    except TypeError:  # unhashable (a list) in a dict/set
      ok = False
    if not ok:
      known = sorted(map(repr, options))
      raise self.error(key, f"not supported by vlm; supported: {', '.join(known)}")
    return options[value] if isinstance(options, Mapping) else value

  def expect(self, key: str, value: Any, why: str = "") -> None:
    """Raises ConfigError unless config[key] == value (a layout vlm has only one way to express)."""
    if self[key] != value:
      raise self.error(key, f"vlm supports only {value!r}" + (f" ({why})" if why else ""))

  def to_dict(self) -> dict[str, Any]:
    """Plain nested dict (defaults filled)."""
    out = dict(self._values)
    out.update({k: v.to_dict() for k, v in self._subs.items()})
    return out


def _derive(values: dict[str, Any], raw: Mapping[str, Any]) -> None:
  """Fills DERIVED defaults the way the transformers config classes compute them."""
  for key, value in list(values.items()):
    if value is not DERIVED:
      continue
    if key == "head_dim":
      values[key] = values["hidden_size"] // values["num_attention_heads"]
    elif key == "num_key_value_heads":
      values[key] = values["num_attention_heads"]
    elif key in ("projection_size", "word_embed_proj_dim"):  # SigLIP text head, OPT: the width
      values[key] = values["hidden_size"]
    elif key == "layer_types":  # Qwen2: sliding attention from max_window_layers on, if enabled
      window = values.get("use_sliding_window") and values.get("sliding_window") is not None
      values[key] = [
        "sliding_attention" if window and i >= values["max_window_layers"] else "full_attention"
        for i in range(values["num_hidden_layers"])
      ]
    else:
      raise AssertionError(f"no derivation for {key}")
  # transformers leaves None to mean "derive" too (e.g. num_key_value_heads: null in Llama 2 files).
  if "num_key_value_heads" in raw and raw["num_key_value_heads"] is None and "num_attention_heads" in values:
    values["num_key_value_heads"] = values["num_attention_heads"]
  if "head_dim" in raw and raw["head_dim"] is None and "num_attention_heads" in values:
    values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]


def read_config(path: str | Path) -> HFConfig:
  """config.json of an HF checkpoint directory (or the file itself), defaults filled."""
  path = Path(path)
  file = path / "config.json" if path.is_dir() else path
  if not file.exists():
    raise FileNotFoundError(f"{file}: no config.json (an HF checkpoint directory has config.json + safetensors)")
  try:
    raw = json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise ConfigError(f"{file}:{e.lineno}: not valid JSON ({e.msg})") from None
  if not isinstance(raw, dict) or not raw.get("model_type"):
    raise ConfigError(f"{file}: no model_type; known: {sorted(DEFAULTS)}")
  return HFConfig(raw, raw["model_type"], str(file))


def from_dict(raw: Mapping[str, Any], file: str = "config.json") -> HFConfig:
  """An HFConfig for a config dict already in memory (model_type required)."""
  if not raw.get("model_type"):
    raise ConfigError(f"{file}: no model_type")
  return HFConfig(raw, raw["model_type"], file)


def rope_parameters(cfg: HFConfig) -> dict[str, Any]:
  """The RoPE settings of a text config in transformers 5's form (rope_type, rope_theta, scaling keys),
  from either `rope_parameters` (5.x files) or `rope_theta` + `rope_scaling` (4.x files)."""
  if cfg.given("rope_parameters") and cfg["rope_parameters"] is not None:
    rp = dict(cfg["rope_parameters"])
    if "rope_theta" not in rp:
      rp["rope_theta"] = (
        cfg["rope_theta"]
        if cfg.given("rope_theta")
        else DEFAULTS[cfg.model_type].get("rope_parameters", {}).get("rope_theta", cfg["rope_theta"])
      )
  else:
    scaling = cfg["rope_scaling"]
    rp = dict(scaling) if scaling else {}
    if "type" in rp and "rope_type" not in rp:  # the oldest 4.x spelling
      rp["rope_type"] = rp.pop("type")
    rp.setdefault("rope_type", "default")
    rp["rope_theta"] = cfg["rope_theta"]
    if "partial_rotary_factor" in cfg:
      rp.setdefault("partial_rotary_factor", cfg["partial_rotary_factor"])
  rp.setdefault("rope_type", rp.pop("type", "default"))
  if rp["rope_type"] in ("llama3", "yarn", "longrope"):  # as standardize_rope_params does
    rp.setdefault(
      "original_max_position_embeddings",
      cfg["original_max_position_embeddings"]
      if "original_max_position_embeddings" in cfg
      else cfg["max_position_embeddings"],
    )
  if rp["rope_type"] == "default" and "partial_rotary_factor" in cfg and "partial_rotary_factor" not in rp:
    rp["partial_rotary_factor"] = cfg["partial_rotary_factor"]
  return rp


_TABLE = {
  "clip": {"projection_dim": 512, "logit_scale_init_value": 2.6592},
  "clip_text_model": {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "attention_dropout": 0.0,
    "pad_token_id": 1,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
  },
  "clip_vision_model": {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "attention_dropout": 0.0,
  },
  "siglip": {},
  "siglip_text_model": {
    "vocab_size": 32000,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 64,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-06,
    "attention_dropout": 0.0,
    "pad_token_id": 1,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "projection_size": DERIVED,
  },
  "siglip_vision_model": {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-06,
    "attention_dropout": 0.0,
    "vision_use_head": True,
  },
  "flava": {
    "hidden_size": 768,
    "layer_norm_eps": 1e-12,
    "projection_dim": 768,
    "init_codebook": True,
    "logit_scale_init_value": 2.6592,
    "ce_ignore_index": -100,
    "mim_weight": 1.0,
    "mlm_weight": 1.0,
    "global_contrastive_weight": 1.0,
    "itm_weight": 1.0,
    "mmm_image_weight": 1.0,
    "mmm_text_weight": 1.0,
    "global_backprop_contrastive": True,
    "skip_unmasked_multimodal_encoder": True,
    "return_loss": True,
    "tie_word_embeddings": True,
  },
  "flava_image_model": {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "layer_norm_eps": 1e-12,
    "image_size": 224,
    "patch_size": 16,
    "num_channels": 3,
    "qkv_bias": True,
    "mask_token": True,
    "vocab_size": 8192,
  },
  "flava_text_model": {
    "vocab_size": 30522,
    "type_vocab_size": 2,
    "max_position_embeddings": 512,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
    "qkv_bias": True,
  },
  "flava_multimodal_model": {
    "hidden_size": 768,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "layer_norm_eps": 1e-12,
    "qkv_bias": True,
    "use_cls_token": True,
  },
  "flava_image_codebook": {
    "num_groups": 4,
    "input_channels": 3,
    "num_blocks_per_group": 2,
    "hidden_size": 256,
    "vocab_size": 8192,
    "freeze": True,
  },
  "llama": {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": DERIVED,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-06,
    "pad_token_id": None,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "head_dim": DERIVED,
  },
  "qwen2": {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 22016,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 28,
    "layer_types": DERIVED,
    "attention_dropout": 0.0,
    "pad_token_id": None,
    "bos_token_id": None,
    "eos_token_id": None,
  },
  "gemma": {
    "vocab_size": 256000,
    "hidden_size": 3072,
    "intermediate_size": 24576,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-06,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "tie_word_embeddings": True,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "attention_bias": False,
    "attention_dropout": 0.0,
    "use_bidirectional_attention": None,
  },
  "persimmon": {
    "vocab_size": 262144,
    "hidden_size": 4096,
    "intermediate_size": 16384,
    "num_hidden_layers": 36,
    "num_attention_heads": 64,
    "hidden_act": "relu2",
    "max_position_embeddings": 16384,
    "layer_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 0.5, "rope_type": "default"},
    "qk_layernorm": True,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "pad_token_id": None,
    "bos_token_id": 1,
    "eos_token_id": 2,
  },
  "opt": {
    "vocab_size": 50272,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "ffn_dim": 3072,
    "max_position_embeddings": 2048,
    "do_layer_norm_before": True,
    "_remove_final_layer_norm": False,
    "word_embed_proj_dim": DERIVED,
    "dropout": 0.1,
    "attention_dropout": 0.0,
    "num_attention_heads": 12,
    "activation_function": "relu",
    "layerdrop": 0.0,
    "init_std": 0.02,
    "pad_token_id": 1,
    "bos_token_id": 2,
    "eos_token_id": 2,
    "enable_bias": True,
    "layer_norm_elementwise_affine": True,
    "tie_word_embeddings": True,
  },
  # Read only as a BLIP-2 text_config (Flan-T5 checkpoints), so that their vision / Q-Former parts import and
  # the stage-2 importer can say that an encoder-decoder LM is not supported.
  "t5": {
    "vocab_size": 32128,
    "d_model": 512,
    "d_kv": 64,
    "d_ff": 2048,
    "num_layers": 6,
    "num_heads": 8,
    "is_encoder_decoder": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": True,
  },
  "llava": {
    "image_token_index": 32000,
    "image_seq_length": 576,
    "projector_hidden_act": "gelu",
    "vision_feature_select_strategy": "default",
    "vision_feature_layer": -2,
    "multimodal_projector_bias": True,
    "tie_word_embeddings": False,
  },
  "llava_next": {
    "image_token_index": 32000,
    "projector_hidden_act": "gelu",
    "vision_feature_select_strategy": "default",
    "vision_feature_layer": -2,
    "multimodal_projector_bias": True,
    "tie_word_embeddings": False,
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "image_seq_length": 576,
  },
  "llava_next_video": {
    "image_token_index": 32001,
    "video_token_index": 32000,
    "projector_hidden_act": "gelu",
    "vision_feature_select_strategy": "default",
    "vision_feature_layer": -2,
    "multimodal_projector_bias": True,
    "tie_word_embeddings": False,
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "spatial_pool_mode": "average",
    "spatial_pool_stride": 2,
    "image_seq_length": 576,
    "video_seq_length": 288,
  },
  "video_llava": {
    "image_token_index": 32000,
    "video_token_index": 32001,
    "projector_hidden_act": "gelu",
    "vision_feature_select_strategy": "default",
    "vision_feature_layer": -2,
    "image_seq_length": 256,
    "video_seq_length": 2056,
    "multimodal_projector_bias": True,
    "tie_word_embeddings": False,
  },
  "blip-2": {
    "num_query_tokens": 32,
    "image_text_hidden_size": 256,
    "image_token_index": None,
    "use_decoder_only_language_model": True,
  },
  "blip_2_vision_model": {
    "hidden_size": 1408,
    "intermediate_size": 6144,
    "num_hidden_layers": 39,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-06,
    "attention_dropout": 0.0,
    "qkv_bias": True,
  },
  "blip_2_qformer": {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
    "cross_attention_frequency": 2,
    "encoder_hidden_size": 1408,
    "use_qformer_text_input": False,
  },
  "idefics": {
    "vocab_size": 32000,
    "additional_vocab_size": 0,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "dropout": 0.0,
    "hidden_act": "silu",
    "alpha_initializer": "zeros",
    "alphas_initializer_range": 0.0,
    "alpha_type": "float",
    "rms_norm_eps": 1e-06,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "cross_layer_interval": 1,
    "qk_layer_norms": False,
    "freeze_text_layers": True,
    "freeze_text_module_exceptions": [],
    "freeze_lm_head": False,
    "freeze_vision_layers": True,
    "freeze_vision_module_exceptions": [],
    "use_resampler": False,
    "max_position_embeddings": 2048,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
  },
  "idefics_vision": {
    "embed_dim": 768,
    "image_size": 224,
    "intermediate_size": 5120,
    "patch_size": 14,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "num_channels": 3,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-05,
    "attention_dropout": 0.0,
  },
  "idefics_perciever": {
    "use_resampler": False,
    "resampler_n_latents": 64,
    "resampler_depth": 6,
    "resampler_n_heads": 16,
    "resampler_head_dim": 96,
    "qk_layer_norms_perceiver": False,
  },
  "fuyu": {
    "image_size": 300,
    "patch_size": 30,
    "num_channels": 3,
    "tie_word_embeddings": False,
    "image_token_id": 71011,
  },
  "chameleon": {
    "vocab_size": 65536,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "pad_token_id": None,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "attention_bias": False,
    "attention_dropout": 0.0,
    "model_parallel_size": 1,
    "swin_norm": False,
    "vocabulary_map": None,
    "mlp_bias": False,
    "image_token_id": None,
  },
  "chameleon_vqgan": {
    "embed_dim": 256,
    "num_embeddings": 8192,
    "double_latent": False,
    "latent_channels": 256,
    "resolution": 512,
    "in_channels": 3,
    "base_channels": 128,
    "channel_multiplier": [1, 1, 2, 2, 4],
    "num_res_blocks": 2,
    "attn_resolutions": None,
    "dropout": 0.0,
    "attn_type": "vanilla",
  },
}
DEFAULTS.update(_TABLE)
