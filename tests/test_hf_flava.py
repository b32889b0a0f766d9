"""Parity of our FLAVA + HF importer against a small random transformers.FlavaModel, saved the way
transformers 4.x writes the Hub's checkpoints (conftest.save_hub_style: sub-config keys at their defaults
left out) and loaded back by transformers as the reference. The image tower's activation and the multimodal
encoder's LayerNorm eps are non-default (in the file), the rest default (absent)."""

import copy
import json
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from conftest import rewrite_checkpoint, save_hub_style  # noqa: E402
from vlm.convert import import_hf  # noqa: E402
from vlm.convert.hf_config import ConfigError  # noqa: E402
from vlm.models import build_model  # noqa: E402

TOL = 1e-4
PAD = 0
IMAGE_ACT, MM_EPS = "quick_gelu", 1e-2  # transformers' defaults: 'gelu', 1e-12


def _make_flava():
  tower = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2)
  cfg = transformers.FlavaConfig(
    image_config=dict(tower, image_size=32, patch_size=8, hidden_act=IMAGE_ACT),
    text_config=dict(tower, vocab_size=99, max_position_embeddings=16, pad_token_id=PAD),
    # widths differ: checks the mm projections
    multimodal_config=dict(tower, hidden_size=40, intermediate_size=56, layer_norm_eps=MM_EPS),
    projection_dim=24,
    init_codebook=False,
  )
  model = transformers.FlavaModel(cfg).eval()
  with torch.no_grad():  # HF inits norms to 1/0 and the cls/mask tokens to 0: perturb every tensor
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  pixels = rng.normal(size=(3, 3, 32, 32)).astype(np.float32)  # NCHW
  ids = rng.integers(1, 99, size=(3, 16))
  for i, n in enumerate([5, 16, 9]):  # padded rows
    ids[i, n:] = PAD
  return pixels, ids


def _theirs(model, pixels, ids):
  mask = torch.tensor((ids != PAD).astype(np.int64))
  px, tok = torch.tensor(pixels), torch.tensor(ids)
  with torch.no_grad():
    out = model(input_ids=tok, pixel_values=px, attention_mask=mask)
    img_feat = model.get_image_features(pixel_values=px).pooler_output  # image_projection on every token
    txt_feat = model.get_text_features(input_ids=tok, attention_mask=mask).pooler_output
  zimg = torch.nn.functional.normalize(img_feat[:, 0], dim=-1)  # as FlavaForPreTraining's contrastive head
  ztxt = torch.nn.functional.normalize(txt_feat[:, 0], dim=-1)
  return dict(
    image_embeddings=out.image_embeddings,
    text_embeddings=out.text_embeddings,
    multimodal_embeddings=out.multimodal_embeddings,
    image_features=img_feat,
    text_features=txt_feat,
    zimg=zimg,
    ztxt=ztxt,
    scale=torch.exp(model.logit_scale),
  )


def _ours(path, pixels, ids, scan=False, change=None):
  """Our outputs for the imported directory; change(kwargs) -> kwargs edits the model before it is built."""
  name, kwargs, params = import_hf(path, scan=scan)
  assert name == "flava" and kwargs["tokenizer"] is None and kwargs["fuse_prenorm"]
  model = build_model(name, change(copy.deepcopy(kwargs)) if change else kwargs)

  def forward(m, images, tokens):
    hi, ht = m.image_states(images), m.text_states(tokens)
    hm = m.fuse(hi, ht, m.text_valid(tokens))
    zimg, aux_i = m.encode_image(images)
    ztxt, aux_t = m.encode_text(tokens)
    return dict(
      image_embeddings=m.image_normed(hi),
      text_embeddings=m.text_normed(ht),
      multimodal_embeddings=hm,
      image_features=m.img_proj(aux_i["encoded"]),
      text_features=m.txt_proj(aux_t["encoded"]),
      zimg=zimg,
      ztxt=ztxt,
      scale=m.scale_and_bias()[0],
    )

  out = model.apply({"params": params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(ids), method=forward)
  return {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
def test_flava_parity(tmp_path, scan):
  torch.manual_seed(0)
  save_hub_style(_make_flava(), tmp_path)
  assert not list(tmp_path.glob("*.bin"))
  written = json.load(open(tmp_path / "config.json"))
  assert "hidden_act" not in written["text_config"] and "layer_norm_eps" not in written["image_config"]
  assert written["image_config"]["hidden_act"] == IMAGE_ACT and written["multimodal_config"]["layer_norm_eps"] == MM_EPS
  model = transformers.FlavaModel.from_pretrained(tmp_path).eval()
  pixels, ids = _inputs()
  ref = {k: v.detach().numpy() for k, v in _theirs(model, pixels, ids).items()}
  ours = _ours(tmp_path, pixels, ids, scan=scan)
  assert ref["multimodal_embeddings"].shape == (3, 1 + 17 + 16, 40)
  diffs = {}
  for k, v in ref.items():
    assert ours[k].shape == v.shape, (k, ours[k].shape, v.shape)
    diffs[k] = float(np.max(np.abs(ours[k] - v)))
  print("max abs diffs:", diffs)
  bad = {k: d for k, d in diffs.items() if not d <= TOL}
  assert not bad, bad
  if scan:
    return
  # Each non-default value replaced by transformers' default (an importer ignoring the key) would show.
  off = {}
  for what, change in (
    ("image_config.hidden_act", lambda kw: dict(kw, image=dict(kw["image"], mlp_act="gelu"))),
    ("multimodal_config.layer_norm_eps", lambda kw: dict(kw, multimodal=dict(kw["multimodal"], norm_eps=1e-12))),
  ):
    wrong = _ours(tmp_path, pixels, ids, change=change)
    off[what] = max(float(np.max(np.abs(wrong[k] - v))) for k, v in ref.items())
  print("max abs diffs with a default instead of the file's value:", off)
  assert all(d > 1e-3 for d in off.values()), off


@pytest.mark.parametrize(
  "sub,key,value",
  [
    ("image_config", "hidden_act", "relu6"),
    ("text_config", "qkv_bias", False),
    ("multimodal_config", "use_cls_token", False),
  ],
)
def test_unsupported_value_names_file_key_and_value(tmp_path, sub, key, value):
  torch.manual_seed(0)
  src = save_hub_style(_make_flava(), tmp_path / "hf")
  written = json.load(open(tmp_path / "hf" / "config.json"))
  dst = rewrite_checkpoint(src, tmp_path / "bad", config={sub: dict(written[sub], **{key: value})})
  with pytest.raises(ConfigError, match=rf"^{re.escape(dst)}/config.json: {sub}\.{key} = {re.escape(repr(value))}:"):
    import_hf(dst)


def test_flava_import_reports_missing_tensors(tmp_path):
  from safetensors.numpy import load_file, save_file

  torch.manual_seed(0)
  _make_flava().save_pretrained(tmp_path, safe_serialization=True)
  tensors = load_file(str(tmp_path / "model.safetensors"))
  del tensors["text_model.embeddings.LayerNorm.weight"]
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match="text_model.embeddings.LayerNorm.weight"):
    import_hf(tmp_path)


@pytest.mark.slow
def test_fuse_prenorm_full_model():
  """FLAVA(fuse_prenorm=True) runs every head; the towers' final norms move to img_norm / txt_norm."""
  import jax
  from vlm.models import FLAVA

  model = FLAVA(
    image=dict(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=8),
    text=dict(vocab_size=20, width=16, depth=1, mlp_dim=32, num_heads=2, max_len=6, embed_norm=True),
    multimodal=dict(width=24, depth=1, mlp_dim=32, num_heads=2),
    embed_dim=8,
    fuse_prenorm=True,
  )
  images, tokens = jnp.zeros((2, 16, 16, 3)), jnp.array([[3, 5, 6, 1, 0, 0], [3, 7, 1, 0, 0, 0]])
  params = jax.jit(model.init)(jax.random.key(0), images, tokens)["params"]
  assert {"img_norm", "txt_norm"} <= set(params) and "encoder_norm" not in params["img"]
  assert "encoder_norm" not in params["txt"] and "embed_norm" in params["txt"]
  zimg, ztxt, out = model.apply({"params": params}, images, tokens)
  assert zimg.shape == ztxt.shape == (2, 8) and out["mlm_logits"].shape == (2, 6, 20)
  assert out["itm_logits"].shape == (2, 2) and out["mmm_text_logits"].shape == (2, 6, 20)
