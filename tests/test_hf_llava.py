"""HF LlavaForConditionalGeneration / LlavaNextForConditionalGeneration import (vlm.convert.llava) against
small random transformers models, saved with config.json as the Hub's 4.x files are (conftest.save_hub_style:
every sub-config key equal to its class default left out, so the towers' activations and eps, the LM's
eps / theta / tying come from transformers' defaults)."""

import functools
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from conftest import rewrite_checkpoint  # noqa: E402
from hf_builders import (  # noqa: E402
  CASES,
  EOS,
  IMAGE,
  NEXT_PINPOINTS,
  NEXT_TILE,
  PAD,
  PATCH,
  imported_llava,
  imported_llava_next,
  llava_pixels,
  llava_prompt,
  next_logits_diff,
  nhwc,
)
from vlm.convert import import_hf  # noqa: E402
from vlm.convert.hf_config import ConfigError  # noqa: E402
from vlm.models import predict_fns  # noqa: E402

TOL = 1e-4
NEW = 6
# What the towers run with, all class defaults the hub-style file leaves out (a wrong default would hide).
TOWER_ACT = {"clip": ("quick_gelu", 1e-5), "siglip": ("gelu_tanh", 1e-6)}


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("hf_llava"))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(case, tmp_root):
  hf, model, params, kwargs, path = imported_llava(case, tmp_root)
  layer, strategy, sharded, tower, text = CASES[case]
  assert kwargs["feature_layer"] == layer and kwargs["keep_cls"] == (strategy == "full")
  assert kwargs["image_token_id"] == IMAGE
  file_cfg = json.load(open(f"{path}/config.json"))
  left_out = {"hidden_act", "layer_norm_eps"} - set(file_cfg["vision_config"])
  assert left_out == {"hidden_act", "layer_norm_eps"}, "the hub-style file leaves the tower's defaults out"
  vit = kwargs["vision_config"]
  assert (vit["mlp_act"], vit["norm_eps"]) == TOWER_ACT[tower]
  if text == "gemma":
    assert not {"hidden_act", "rms_norm_eps", "tie_word_embeddings"} & set(file_cfg["text_config"])
    lm = kwargs["lm_config"]
    assert (lm["mlp_act"], lm["norm_eps"], lm["tie_embeddings"], lm["embed_scale"]) == ("geglu", 1e-6, True, True)
  if sharded:
    assert len(json.load(open(f"{path}/model.safetensors.index.json"))["weight_map"]) > 0
  rng = np.random.default_rng(0)
  ids = np.stack([llava_prompt(rng, strategy, tower=tower) for _ in range(2)])  # one image per row
  pixels = llava_pixels(rng, 2)
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()
  ours = np.asarray(model.apply({"params": params}, nhwc(pixels), jnp.asarray(ids)))
  diff = float(np.abs(ours - theirs).max())
  print(f"{case}: max |logits diff| {diff:.2e}")
  assert ours.shape == theirs.shape and diff <= TOL
  # Two images in one row: HF fills the placeholders in order, ours takes images [B, M, H, W, 3].
  ids2 = llava_prompt(rng, strategy, n_images=2, tower=tower)[None]
  pixels2 = llava_pixels(rng, 2)
  with torch.no_grad():
    theirs2 = hf(input_ids=torch.tensor(ids2), pixel_values=torch.tensor(pixels2)).logits.numpy()
  ours2 = np.asarray(model.apply({"params": params}, nhwc(pixels2)[None], jnp.asarray(ids2)))
  diff2 = float(np.abs(ours2 - theirs2).max())
  print(f"{case}: two images, max |logits diff| {diff2:.2e}")
  assert diff2 <= TOL


def test_greedy_generation_matches_hf(tmp_root):
  hf, model, params, _, _ = imported_llava("penultimate_default", tmp_root)
  rng = np.random.default_rng(1)
  ids = np.stack([llava_prompt(rng, "default") for _ in range(2)])
  pixels = llava_pixels(rng, 2)
  with torch.no_grad():
    out = hf.generate(
      input_ids=torch.tensor(ids),
      pixel_values=torch.tensor(pixels),
      attention_mask=torch.ones(ids.shape, dtype=torch.long),
      do_sample=False,
      max_new_tokens=NEW,
      eos_token_id=EOS,
      pad_token_id=PAD,
    ).numpy()
  theirs = out[:, ids.shape[1] :]
  theirs = np.pad(theirs, ((0, 0), (0, NEW - theirs.shape[1])), constant_values=PAD)
  ours = jax.jit(functools.partial(predict_fns(model)["generate"], max_new_tokens=NEW, eos_id=EOS, pad_id=PAD))(
    params, nhwc(pixels), jnp.asarray(ids)
  )
  print(f"HF {theirs.tolist()} ours {np.asarray(ours.tokens).tolist()}")
  np.testing.assert_array_equal(np.asarray(ours.tokens), theirs)


def _new_layout(k):  # transformers >= 4.52 names
  for old, new in (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
  ):
    if k.startswith(old):
      return new + k[len(old) :]
  raise AssertionError(k)


def test_both_key_layouts_import_the_same(tmp_root, tmp_path):
  _, _, params, kwargs, path = imported_llava("penultimate_default", tmp_root)
  keys = load_file(f"{path}/model.safetensors").keys()
  assert any(k.startswith("language_model.model.") for k in keys)  # this transformers saves the old layout
  for variant, fn in (
    ("new", _new_layout),
    ("vision_model", lambda k: k.replace("vision_tower.", "vision_tower.vision_model.", 1)),
  ):
    _, kw2, params2 = import_hf(rewrite_checkpoint(path, tmp_path / variant, rename=fn))
    assert kw2 == kwargs
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_unsupported_and_missing_raise(tmp_root, tmp_path):
  _, _, _, _, path = imported_llava("penultimate_default", tmp_root)
  with pytest.raises(ConfigError, match=r"config.json: projector_hidden_act = 'gelu_pytorch_tanh': not supported"):
    import_hf(rewrite_checkpoint(path, tmp_path / "act", config={"projector_hidden_act": "gelu_pytorch_tanh"}))
  with pytest.raises(ConfigError, match=r"config.json: vision_config.hidden_act = 'swish': not supported"):
    import_hf(
      rewrite_checkpoint(
        path,
        tmp_path / "vact",
        config={"vision_config": dict(json.load(open(f"{path}/config.json"))["vision_config"], hidden_act="swish")},
      )
    )
  for i, key in enumerate(
    (
      "language_model.model.layers.1.mlp.up_proj.weight",
      "vision_tower.encoder.layers.0.self_attn.k_proj.bias",
      "multi_modal_projector.linear_2.weight",
    )
  ):
    with pytest.raises(ValueError, match=rf"absent: \['{key}'\]"):
      import_hf(rewrite_checkpoint(path, tmp_path / f"missing{i}", drop=(key,)))
  extra = "multi_modal_projector.linear_3.weight"
  with pytest.raises(ValueError, match=rf"not used .*\['{extra}'\]"):
    import_hf(rewrite_checkpoint(path, tmp_path / "extra", add={extra: np.zeros((2, 2), np.float32)}))
  with pytest.raises(ConfigError, match=r"vision_feature_layer = \[-2, -1\]: several layers"):
    import_hf(rewrite_checkpoint(path, tmp_path / "layers", config={"vision_feature_layer": [-2, -1]}))


def test_partial_config_takes_transformers_defaults():
  """Old llava-hf config.json files (llava-1.5-7b-hf's, here) list only the overrides."""
  from vlm.convert import model_kwargs_from_hf_llava

  partial = dict(
    model_type="llava",
    image_token_index=32000,
    projector_hidden_act="gelu",
    vocab_size=32064,
    text_config=dict(model_type="llama", max_position_embeddings=4096, rms_norm_eps=1e-5, vocab_size=32064),
    vision_config=dict(
      model_type="clip_vision_model",
      hidden_size=1024,
      image_size=336,
      intermediate_size=4096,
      num_attention_heads=16,
      num_hidden_layers=24,
      patch_size=14,
      projection_dim=768,
    ),
  )
  for cfg in (partial, {"model_type": "llava"}):
    ours = model_kwargs_from_hf_llava(cfg)
    assert ours == model_kwargs_from_hf_llava(transformers.LlavaConfig(**cfg).to_dict())
  assert ours["vision_config"]["posemb_grid"] == (24, 24) and ours["lm_config"]["width"] == 4096


# ------------------------------------------------------------------ LLaVA-NeXT, hub-style config


@pytest.mark.slow
def test_llava_next_hub_style_logits_match_hf(tmp_root):
  hf, model, params, kwargs, path = imported_llava_next(tmp_root)
  file_cfg = json.load(open(f"{path}/config.json"))
  assert not {"hidden_act", "layer_norm_eps"} & set(file_cfg["vision_config"])
  assert kwargs["vision_config"]["mlp_act"] == "quick_gelu" and kwargs["vision_config"]["norm_eps"] == 1e-5
  assert kwargs["anyres"] == dict(
    grid_pinpoints=tuple(map(tuple, NEXT_PINPOINTS)), tile_size=NEXT_TILE, patch_grid=NEXT_TILE // PATCH
  )
  diff = next_logits_diff(hf, model, params, kwargs)
  print(f"llava_next (hub-style config): max |logits diff| {diff:.2e}")
  assert diff <= TOL
