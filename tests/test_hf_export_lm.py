"""Export to HF format (vlm.convert.export_lm): DecoderLM as Llama / Qwen2 / Gemma and VisionLanguageModel as
LLaVA / LLaVA-NeXT. transformers loads every export with `from_pretrained` with no missing, unexpected or
mismatched keys; imported HF models round-trip to the original's weights and logits, and random vlm models
give vlm's logits in transformers (float32)."""

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from hf_builders import (  # noqa: E402
  CASES,
  IMAGE,
  NEXT_PINPOINTS,
  VOCAB,
  hub_import,
  imported_llava,
  imported_llava_next,
  imported_lm,
  llava_pixels,
  llava_prompt,
  next_logits_diff,
  nhwc,
  padded_batch,
  rope_llama,
)
from vlm.convert import import_hf  # noqa: E402
from vlm.convert.export_lm import (  # noqa: E402
  export_hf_llava,
  export_hf_lm,
  export_hf_llm,  # noqa: E402
  hf_config_from_llava_kwargs,
  hf_config_from_llm_kwargs,
)
from vlm.models import build_model  # noqa: E402
from vlm.nn import rope as rope_lib  # noqa: E402
from vlm.peft import merge_lora  # noqa: E402

TOL = 1e-4
ARCH_CLASS = {
  "llama": transformers.LlamaForCausalLM,
  "qwen2": transformers.Qwen2ForCausalLM,
  "gemma": transformers.GemmaForCausalLM,
  "llava": transformers.LlavaForConditionalGeneration,
  "llava_next": transformers.LlavaNextForConditionalGeneration,
}


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("hf_export"))


def _load(path, model_type):
  """transformers' from_pretrained of an export, checking that every key was expected and present."""
  hf, info = ARCH_CLASS[model_type].from_pretrained(str(path), output_loading_info=True)
  assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"] or info["error_msgs"]), info
  return hf.eval()


def _weights_diff(a, b):
  """max |a - b| over the export b's weights; a may have more only in a SigLIP tower's MAP head (unused by
  LLaVA, exported with vision_use_head=False)."""
  sa, sb = a.state_dict(), b.state_dict()
  assert set(sb) <= set(sa) and all(".vision_tower.head." in k for k in set(sa) - set(sb)), set(sa) ^ set(sb)
  return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sb)


def _lm_logits(hf, ids, mask):
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    return hf(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(mask.astype(np.int64)),
      position_ids=torch.tensor(positions),
    ).logits.numpy()


# ------------------------------------------------------------------ DecoderLM


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "llama_yarn"])
def test_hf_llm_import_export_round_trip(arch, tmp_root, tmp_path):
  """HF -> import_hf -> export_hf_lm -> from_pretrained: the original weights, config and logits."""
  if arch == "llama_yarn":
    hf, _, _, _, _ = hub_import("llama", rope_llama("yarn"), tmp_path / "src")
    name, kwargs, params = import_hf(tmp_path / "src")
    ids = np.random.default_rng(3).integers(3, VOCAB, size=(2, 40))
    mask = np.ones_like(ids, dtype=bool)
  else:
    hf, _, params, kwargs = imported_lm(arch, tmp_root)
    name = "decoder_lm"
    ids, mask = padded_batch()
  config = export_hf_lm(
    name, kwargs, params, tmp_path / "out", max_position_embeddings=hf.config.max_position_embeddings
  )
  mt = arch.split("_")[0]
  assert config["model_type"] == mt
  out = _load(tmp_path / "out", mt)
  for key in (
    "hidden_act",
    "rms_norm_eps",
    "tie_word_embeddings",
    "head_dim",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    "attention_bias",
    "mlp_bias",
  ):
    if hasattr(hf.config, key):
      assert getattr(out.config, key) == getattr(hf.config, key), key
  # rope: the same once transformers' defaults are resolved (the export writes them out: beta_fast, ...)
  resolved = [
    (c.rope_parameters["rope_theta"], rope_lib.scaling_from_hf(c.rope_parameters, c.max_position_embeddings))
    for c in (out.config, hf.config)
  ]
  assert resolved[0] == resolved[1]
  wdiff = _weights_diff(hf, out)
  diff = float(np.abs(_lm_logits(out, ids, mask) - _lm_logits(hf, ids, mask))[mask].max())
  print(f"{arch}: round trip, max |weight diff| {wdiff:.1e}, max |logits diff| {diff:.2e}")
  assert wdiff <= 1e-6 and diff <= TOL


def test_scanned_imports_export_the_original_checkpoint(tmp_root, tmp_path):
  """import_hf(scan=True) (DecoderLM scan_layers, LLaVA's ViT and LM both scanned) -> export: the same files."""
  hf, _, _, _ = imported_lm("llama", tmp_root)
  name, kwargs, params = import_hf(f"{tmp_root}/llama", scan=True)
  assert kwargs["scan_layers"] and set(params["decoder"]) == {"layers"}
  config = export_hf_lm(
    name, kwargs, params, tmp_path / "lm", max_position_embeddings=hf.config.max_position_embeddings
  )
  assert "scan_layers" not in config
  assert _weights_diff(hf, _load(tmp_path / "lm", "llama")) == 0
  hf, _, _, _, path = imported_llava("penultimate_default", tmp_root)
  name, kwargs, params = import_hf(path, scan=True)
  assert kwargs["vision_config"]["scan"] and kwargs["lm_config"]["scan_layers"]
  assert set(params["vision"]["encoder"]) == {"layers"} and set(params["lm"]["decoder"]) == {"layers"}
  rng = np.random.default_rng(0)
  ids = np.stack([llava_prompt(rng, "default") for _ in range(2)])
  pixels = llava_pixels(rng, 2)
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()
  ours = np.asarray(build_model(name, kwargs).apply({"params": params}, nhwc(pixels), jnp.asarray(ids)))
  diff = float(np.abs(ours - theirs).max())
  print(f"LLaVA imported with scan=True: max |logits diff| {diff:.2e}")
  assert diff <= TOL
  export_hf_lm(name, kwargs, params, tmp_path / "llava")
  assert _weights_diff(hf, _load(tmp_path / "llava", "llava")) == 0


RANDOM_LMS = {  # DecoderLM kwargs (besides the sizes) -> the HF type export picks
  "llama": ({}, "llama"),
  "llama_biases_llama3_tied": (
    dict(
      qkv_bias=True,
      out_bias=True,
      mlp_bias=True,
      norm_eps=1e-5,
      tie_embeddings=True,
      rope_theta=500.0,
      rope_scaling=dict(
        rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8
      ),
    ),
    "llama",
  ),
  "qwen2_head_dim": (dict(qkv_bias=True, head_dim=16), "qwen2"),
  "gemma": (dict(embed_scale=True, mlp_act="geglu", tie_embeddings=True, head_dim=16), "gemma"),
  "dynamic": (dict(rope_scaling=dict(rope_type="dynamic", factor=2.0, max_position_embeddings=8)), "llama"),
}


def _random(model, sample, seed=0):
  """model.init params with every leaf perturbed (norms and biases away from 1 / 0)."""
  params = model.init(jax.random.PRNGKey(seed), *sample)["params"]
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _lm_kwargs(**kw):
  return dict(dict(vocab_size=VOCAB, width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64), **kw)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(RANDOM_LMS))
def test_random_decoder_lm_exports_with_its_logits(case, tmp_path):
  extra, mt = RANDOM_LMS[case]
  kwargs = _lm_kwargs(**extra)
  model = build_model("decoder_lm", kwargs)
  params = _random(model, (jnp.zeros((1, 4), jnp.int32),))
  config = export_hf_llm(kwargs, params, tmp_path, extra_config=dict(pad_token_id=0))
  assert config["model_type"] == mt
  hf = _load(tmp_path, mt)
  ids, mask = padded_batch()
  ids = np.concatenate([ids, ids], axis=1)  # 24 tokens: past the scaled ropes' 8
  mask = np.concatenate([mask, np.ones_like(mask)], axis=1)
  ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), mask=jnp.asarray(mask)))
  diff = float(np.abs(ours - _lm_logits(hf, ids, mask))[mask].max())
  print(f"{case} -> {mt}: max |logits diff| {diff:.2e}")
  assert diff <= TOL


def test_lora_is_merged_on_export(tmp_path):
  peft = dict(method="lora", rank=4, alpha=8.0, targets=[r".*attn/(query|value)"])
  kwargs = _lm_kwargs()
  model = build_model("decoder_lm", kwargs, peft=peft)
  params = _random(model, (jnp.zeros((1, 4), jnp.int32),))  # lora_b perturbed too: a non-zero update
  assert "lora_b" in params["decoder"]["block_0"]["attn"]["query"]
  with pytest.raises(ValueError, match="LoRA leaves"):
    export_hf_llm(kwargs, params, tmp_path / "refused")
  export_hf_llm(kwargs, params, tmp_path, peft=peft)
  hf = _load(tmp_path, "llama")
  ids, mask = padded_batch()
  ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), mask=jnp.asarray(mask)))
  diff = float(np.abs(ours - _lm_logits(hf, ids, mask))[mask].max())
  base = np.asarray(
    build_model("decoder_lm", kwargs).apply(
      {"params": {k: v for k, v in merge_lora(params, 0.0).items()}}, jnp.asarray(ids), mask=jnp.asarray(mask)
    )
  )
  print(
    f"LoRA merged on export: max |logits diff| {diff:.2e} (the LoRA update moves logits by "
    f"{np.abs(base - ours)[mask].max():.2e})"
  )
  assert diff <= TOL and np.abs(base - ours)[mask].max() > 100 * TOL


@pytest.mark.slow
def test_export_refuses_what_hf_cannot_express(tmp_path):
  for kw, match in (
    (dict(qk_norm="rms"), "qk_norm='rms' is not expressible"),
    (dict(norm_type="layer"), "norm_type='layer'"),
    (dict(mlp_act="relu2"), "mlp_act='relu2'"),
    (dict(rope_theta=None), "rope_theta=None"),
    (dict(rotary_fraction=0.5), "rotary_fraction=0.5"),
    (dict(qkv_bias=False, out_bias=True), "Llama's attention_bias covers q/k/v/o together"),
    (dict(rope_scaling=dict(rope_type="longrope")), "rope_type 'longrope' is not supported"),
    (dict(no_such_field=1), r"\['no_such_field'\] are not DecoderLM fields"),
  ):
    with pytest.raises(ValueError, match=match):
      hf_config_from_llm_kwargs(_lm_kwargs(**kw))
  with pytest.raises(ValueError, match="Qwen2 has q/k/v biases only"):
    hf_config_from_llm_kwargs(_lm_kwargs(), "qwen2")
  with pytest.raises(ValueError, match="would override the architecture field 'hidden_size'"):
    hf_config_from_llm_kwargs(_lm_kwargs(), extra_config=dict(hidden_size=3))
  model, kwargs, params = _random_llava()
  for kw, match in (
    (dict(feature_layer=None), "feature_layer=None"),
    (dict(connector_type="linear"), "connector_type"),
    (dict(vision_config=dict(kwargs["vision_config"], pre_norm=False)), "a CLIP tower has"),
  ):
    with pytest.raises(ValueError, match=match):
      hf_config_from_llava_kwargs(dict(kwargs, **kw), params)
  with pytest.raises(ValueError, match=r"no place for .*\['soft_prompt'\]"):
    export_hf_llava(kwargs, dict(params, soft_prompt=np.zeros((2, 32), np.float32)), tmp_path)


# ------------------------------------------------------------------ LLaVA / LLaVA-NeXT


@pytest.mark.parametrize("case", ["penultimate_default", "siglip_gemma_full"])
def test_hf_llava_import_export_round_trip(case, tmp_root, tmp_path):
  hf, model, params, kwargs, _ = imported_llava(case, tmp_root)
  config = export_hf_lm("vision_lm", kwargs, params, tmp_path)
  out = _load(tmp_path, "llava")
  assert config["vision_config"]["hidden_act"] == hf.config.vision_config.hidden_act
  assert config["vision_config"]["layer_norm_eps"] == hf.config.vision_config.layer_norm_eps
  rng = np.random.default_rng(0)
  strategy, tower = CASES[case][1], CASES[case][3]
  ids = np.stack([llava_prompt(rng, strategy, tower=tower) for _ in range(2)])
  pixels = llava_pixels(rng, 2)
  with torch.no_grad():
    theirs, again = (
      m(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy() for m in (hf, out)
    )
  wdiff, diff = _weights_diff(hf, out), float(np.abs(again - theirs).max())
  print(f"{case}: round trip, max |weight diff| {wdiff:.1e}, max |logits diff| {diff:.2e}")
  assert wdiff <= 1e-6 and diff <= TOL


@pytest.mark.slow
def test_hf_llava_next_import_export_round_trip(tmp_root, tmp_path):
  hf, model, params, kwargs, _ = imported_llava_next(tmp_root)
  config = export_hf_lm("vision_lm", kwargs, params, tmp_path)
  assert config["model_type"] == "llava_next" and config["image_grid_pinpoints"] == NEXT_PINPOINTS
  out = _load(tmp_path, "llava_next")
  wdiff, diff = _weights_diff(hf, out), next_logits_diff(out, model, params, kwargs)
  print(f"llava_next: round trip, max |weight diff| {wdiff:.1e}, max |logits diff| (ours vs the export) {diff:.2e}")
  assert wdiff <= 1e-6 and diff <= TOL


@functools.cache
def _random_llava():
  """A random VisionLanguageModel in LLaVA's layout: a 1-channel CLIP-style tower with exact GELU and eps 1e-6
  (not CLIP's defaults), the last block's features, a Qwen2-style LM with linear rope scaling."""
  vit = dict(
    width=32,
    depth=2,
    mlp_dim=48,
    num_heads=4,
    patch_size=8,
    posemb="learn",
    posemb_grid=(4, 4),
    class_token=True,
    pre_norm=True,
    patch_bias=False,
    mlp_act="gelu",
    norm_eps=1e-6,
  )
  kwargs = dict(
    lm_config=_lm_kwargs(vocab_size=200, qkv_bias=True, rope_scaling=dict(rope_type="linear", factor=2.0)),
    vision_config=vit,
    vision_model="vit",
    feature_layer=-1,
    keep_cls=False,
    pool=None,
    connector_type="mlp",
    prefix_tokens=1,
    image_token_id=IMAGE,
  )
  model = build_model("vision_lm", kwargs)
  params = _random(model, (jnp.zeros((1, 32, 32, 1)), jnp.zeros((1, 20), jnp.int32)))
  return model, kwargs, jax.tree.map(np.asarray, params)


@pytest.mark.slow
def test_random_llava_exports_with_its_logits(tmp_path):
  model, kwargs, params = _random_llava()
  config = export_hf_llava(kwargs, params, tmp_path)
  assert config["vision_config"]["num_channels"] == 1 and config["vision_feature_layer"] == -1
  assert config["vision_config"]["hidden_act"] == "gelu" and config["text_config"]["model_type"] == "qwen2"
  hf = _load(tmp_path, "llava")
  rng = np.random.default_rng(5)
  ids = np.stack([llava_prompt(rng, "default") for _ in range(2)])
  pixels = rng.normal(size=(2, 1, 32, 32)).astype(np.float32)
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()
  ours = np.asarray(model.apply({"params": params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(ids)))
  diff = float(np.abs(ours - theirs).max())
  print(f"random LLaVA -> HF: max |logits diff| {diff:.2e}")
  assert diff <= TOL
