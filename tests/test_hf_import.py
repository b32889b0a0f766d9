"""Parity of our two-tower model + HF importer/exporter against small random transformers models."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from conftest import hub_style_config, save_hub_style  # noqa: E402
from vlm.convert import export_hf, import_hf  # noqa: E402
from vlm.convert.hf_config import ConfigError  # noqa: E402
from vlm.models import build_model  # noqa: E402

TOL = 1e-4


def _tower_cfg(**kw):
  return dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, **kw)


def _make_clip(eos_token_id: int, text=None, vision=None, logit_scale=None):
  cfg = transformers.CLIPConfig(
    text_config=_tower_cfg(
      vocab_size=99,
      max_position_embeddings=16,
      eos_token_id=eos_token_id,
      pad_token_id=1,
      bos_token_id=0,
      **(text or {}),
    ),
    vision_config=_tower_cfg(image_size=32, patch_size=8, **(vision or {})),
    projection_dim=24,
  )
  model = transformers.CLIPModel(cfg).eval()
  if logit_scale is not None:
    with torch.no_grad():
      model.logit_scale.fill_(logit_scale)
  return model


def _make_siglip(text=None, vision=None):
  cfg = transformers.SiglipConfig(
    text_config=_tower_cfg(vocab_size=99, max_position_embeddings=16, **(text or {})),
    vision_config=_tower_cfg(image_size=32, patch_size=8, **(vision or {})),
  )
  model = transformers.SiglipModel(cfg).eval()
  with torch.no_grad():  # non-default scale/bias so that the logits check them
    model.logit_scale.fill_(1.7)
    model.logit_bias.fill_(-3.0)
  return model


def _inputs(seed=0, eos_token_id=None, channels=3):
  rng = np.random.default_rng(seed)
  pixels = rng.normal(size=(3, channels, 32, 32)).astype(np.float32)  # NCHW
  ids = rng.integers(3, 99, size=(3, 16))
  if eos_token_id is not None:  # CLIP: EOS then padding
    for i, n in enumerate([5, 16, 9]):
      ids[i, n - 1] = eos_token_id
      ids[i, n:] = 1
  return pixels, ids


def _ours(path, pixels, ids, scan=False):
  name, kwargs, params = import_hf(path, scan=scan)
  model = build_model(name, kwargs)
  zimg, ztxt, out = model.apply({"params": params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(ids))
  logits = out["scale"] * ztxt @ zimg.T + (out["bias"] if out["bias"] is not None else 0.0)
  return np.asarray(zimg), np.asarray(ztxt), np.asarray(logits), kwargs, params


def _theirs(model, pixels, ids, eos_token_id=None):
  kw = {}
  if eos_token_id is not None:
    kw["attention_mask"] = torch.tensor((ids != 1).astype(np.int64))
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels), **kw)
  return out.image_embeds.numpy(), out.text_embeds.numpy(), out.logits_per_text.numpy()


def _check(a, b):
  for x, y, name in zip(a, b, ("image_embeds", "text_embeds", "logits")):
    assert x.shape == y.shape, name
    np.testing.assert_allclose(x, y, atol=TOL, rtol=0, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("eos_token_id", [2, 49])  # 2: legacy argmax pooling; else first EOS
def test_clip_parity_and_roundtrip(tmp_path, eos_token_id):
  torch.manual_seed(0)
  model = _make_clip(eos_token_id)
  model.save_pretrained(tmp_path / "hf", safe_serialization=True)
  pixels, ids = _inputs(eos_token_id=eos_token_id)
  ref = _theirs(model, pixels, ids, eos_token_id)
  *ours, kwargs, params = _ours(tmp_path / "hf", pixels, ids)
  _check(ours, ref)
  # Export, reload with transformers, compare again.
  export_hf(kwargs, params, tmp_path / "out", "clip")
  reloaded = transformers.CLIPModel.from_pretrained(tmp_path / "out").eval()
  _check(_theirs(reloaded, pixels, ids, eos_token_id), ref)


@pytest.mark.parametrize("scan", [False, True])
def test_siglip_parity_and_roundtrip(tmp_path, scan):
  torch.manual_seed(1)
  model = _make_siglip()
  # Sharded safetensors (model.safetensors.index.json) for the scanned case.
  model.save_pretrained(tmp_path / "hf", safe_serialization=True, max_shard_size="100KB" if scan else "5GB")
  assert (tmp_path / "hf" / "model.safetensors.index.json").exists() == scan
  pixels, ids = _inputs(seed=1)
  ref = _theirs(model, pixels, ids)
  *ours, kwargs, params = _ours(tmp_path / "hf", pixels, ids, scan=scan)
  _check(ours, ref)
  export_hf(kwargs, params, tmp_path / "out", "siglip")
  reloaded = transformers.SiglipModel.from_pretrained(tmp_path / "out").eval()
  _check(_theirs(reloaded, pixels, ids), ref)


def test_import_reports_missing_tensors(tmp_path):
  from safetensors.numpy import load_file, save_file

  torch.manual_seed(0)
  _make_siglip().save_pretrained(tmp_path, safe_serialization=True)
  tensors = load_file(str(tmp_path / "model.safetensors"))
  del tensors["text_model.head.weight"]
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match="text_model.head.weight"):
    import_hf(tmp_path)


def _hub_parity(model, path, pixels, ids, eos_token_id=None):
  """Saves model in the Hub's 4.x style, imports it, and checks against transformers loading the same
  directory; returns (our kwargs, params, reference outputs)."""
  save_hub_style(model, path)
  loaded = type(model).from_pretrained(path).eval()
  ref = _theirs(loaded, pixels, ids, eos_token_id)
  np.testing.assert_allclose(ref[2], _theirs(model, pixels, ids, eos_token_id)[2], atol=1e-6)
  *ours, kwargs, params = _ours(path, pixels, ids)
  _check(ours, ref)
  return kwargs, params, ref


# Tiny models whose activation / eps are transformers' defaults (left out of the Hub-style file, so a
# wrong default in vlm would show) or non-default ones (kept in the file), and a logit scale over 100.
_CLIP_CASES = {
  "defaults": dict(),  # quick_gelu, eps 1e-5: both absent from the file
  "gelu_eps": dict(
    text=dict(hidden_act="gelu", layer_norm_eps=1e-3), vision=dict(hidden_act="gelu_new", layer_norm_eps=1e-2)
  ),
  "scale_over_100": dict(logit_scale=5.5),  # exp(5.5) = 245: imported as is, no clamp
  "one_channel": dict(vision=dict(num_channels=1)),
}


@pytest.mark.parametrize("case", sorted(_CLIP_CASES))
def test_clip_hub_style_parity_and_roundtrip(tmp_path, case):
  torch.manual_seed(2)
  model = _make_clip(49, **_CLIP_CASES[case])
  channels = model.config.vision_config.num_channels
  pixels, ids = _inputs(seed=2, eos_token_id=49, channels=channels)
  written = hub_style_config(model.config.to_dict())
  if case == "defaults":  # what the test is about: the file really leaves these out
    assert "hidden_act" not in written["text_config"] and "layer_norm_eps" not in written["vision_config"]
  kwargs, params, ref = _hub_parity(model, tmp_path / "hf", pixels, ids, eos_token_id=49)
  assert kwargs["max_scale"] is None
  export_hf(kwargs, params, tmp_path / "out", "clip")
  reloaded, info = transformers.CLIPModel.from_pretrained(tmp_path / "out", output_loading_info=True)
  assert not any(info.values()), info
  _check(_theirs(reloaded.eval(), pixels, ids, 49), ref)
  exported = reloaded.config
  from vlm.convert.common import ACT_FROM_HF

  for tower in ("text_config", "vision_config"):  # the same functions (gelu_new is written as its twin)
    a, b = getattr(exported, tower), getattr(model.config, tower)
    assert ACT_FROM_HF[a.hidden_act] == ACT_FROM_HF[b.hidden_act] and a.layer_norm_eps == b.layer_norm_eps, tower
  assert exported.vision_config.num_channels == channels


_SIGLIP_CASES = {
  "defaults": dict(),  # gelu_pytorch_tanh, eps 1e-6: absent from the file
  "quick_gelu_eps": dict(
    text=dict(hidden_act="quick_gelu", layer_norm_eps=1e-2), vision=dict(hidden_act="gelu", layer_norm_eps=1e-3)
  ),
  "no_head_projection": dict(text=dict(projection_size=20), vision=dict(vision_use_head=False)),
}


@pytest.mark.parametrize("case", sorted(_SIGLIP_CASES))
def test_siglip_hub_style_parity_and_roundtrip(tmp_path, case):
  torch.manual_seed(3)
  model = _make_siglip(**_SIGLIP_CASES[case])
  pixels, ids = _inputs(seed=3)
  if case == "no_head_projection":  # HF's SiglipModel needs both towers' embeddings of one width
    pytest.importorskip("transformers").SiglipTextModel  # noqa: B018
    model = transformers.SiglipModel(
      transformers.SiglipConfig(
        text_config=_tower_cfg(vocab_size=99, max_position_embeddings=16),
        vision_config=_tower_cfg(image_size=32, patch_size=8, vision_use_head=False),
      )
    ).eval()
    save_hub_style(model, tmp_path / "hf")
    _, kwargs, params = import_hf(tmp_path / "hf")
    assert kwargs["image"]["pool_type"] == "none"
    return
  kwargs, params, ref = _hub_parity(model, tmp_path / "hf", pixels, ids)
  export_hf(kwargs, params, tmp_path / "out", "siglip")
  reloaded, info = transformers.SiglipModel.from_pretrained(tmp_path / "out", output_loading_info=True)
  assert not any(info.values()), info
  _check(_theirs(reloaded.eval(), pixels, ids), ref)


def test_wrong_default_would_show(tmp_path):
  """The Hub-style tests can fail: importing the 'defaults' SigLIP with the activation and eps that vlm
  used to assume for every model type (gelu, 1e-5) moves its outputs past the tolerance."""
  torch.manual_seed(3)
  model = _make_siglip()
  pixels, ids = _inputs(seed=3)
  save_hub_style(model, tmp_path / "hf")
  ref = _theirs(model, pixels, ids)
  name, kwargs, params = import_hf(tmp_path / "hf")
  for tower in ("image", "text"):
    kwargs[tower].update(mlp_act="gelu", norm_eps=1e-5)
  zimg, ztxt, out = build_model(name, kwargs).apply(
    {"params": params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(ids)
  )
  logits = np.asarray(out["scale"] * ztxt @ zimg.T + out["bias"])
  worst = max(np.abs(np.asarray(a) - b).max() for a, b in zip((zimg, ztxt, logits), ref))
  assert worst > 3 * TOL, worst  # the parity check above (TOL) would fail


def test_unsupported_config_values_name_key_value_and_file(tmp_path):
  torch.manual_seed(0)
  save_hub_style(_make_siglip(), tmp_path / "hf")
  import json

  cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
  cfg["vision_config"]["hidden_act"] = "mish"
  (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ConfigError, match=r"hf/config.json: vision_config.hidden_act = 'mish': not supported"):
    import_hf(tmp_path / "hf")
  cfg["vision_config"].update(hidden_act="gelu", num_channels=4)
  (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ConfigError, match=r"vision_config.num_channels = 4: the patch embedding has 3 input channels"):
    import_hf(tmp_path / "hf")


def test_export_refuses_what_hf_cannot_express(tmp_path):
  torch.manual_seed(0)
  save_hub_style(_make_siglip(), tmp_path / "hf")
  _, kwargs, params = import_hf(tmp_path / "hf")
  kwargs["text"]["pool_type"] = "map"
  with pytest.raises(ValueError, match=r"model.text.pool_type='map' has no siglip HF equivalent"):
    export_hf(kwargs, params, tmp_path / "out", "siglip")
