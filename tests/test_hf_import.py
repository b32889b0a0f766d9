"""Parity of our two-tower model + HF importer/exporter against small random transformers models."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from vlm.convert import export_hf, import_hf  # noqa: E402
from vlm.models import build_model  # noqa: E402

TOL = 1e-4


def _tower_cfg(**kw):
  return dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, **kw)


def _make_clip(eos_token_id: int):
  cfg = transformers.CLIPConfig(
      text_config=_tower_cfg(vocab_size=99, max_position_embeddings=16, eos_token_id=eos_token_id,
                             pad_token_id=1, bos_token_id=0),
      vision_config=_tower_cfg(image_size=32, patch_size=8),
      projection_dim=24,
  )
  return transformers.CLIPModel(cfg).eval()


def _make_siglip():
  cfg = transformers.SiglipConfig(
      text_config=_tower_cfg(vocab_size=99, max_position_embeddings=16),
      vision_config=_tower_cfg(image_size=32, patch_size=8),
  )
  model = transformers.SiglipModel(cfg).eval()
  with torch.no_grad():  # non-default scale/bias so that the logits check them
    model.logit_scale.fill_(1.7)
    model.logit_bias.fill_(-3.0)
  return model


def _inputs(seed=0, eos_token_id=None):
  rng = np.random.default_rng(seed)
  pixels = rng.normal(size=(3, 3, 32, 32)).astype(np.float32)  # NCHW
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
