"""Monkey's high-resolution encoding (vlm.models.monkey): windows, per-window LoRA sets
(vlm.peft.lora_sets) and the Qwen-VL resampler (vlm.nn.resampler)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from vlm import peft
from vlm.models.monkey import Monkey, cut_windows, merge_windows
from vlm.models.vit import ViT
from vlm.nn.resampler import QwenVLResampler

IMAGE = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8, class_token=False, posemb="learn")
RESAMPLER = dict(num_queries=4, num_heads=2, out_dim=24)


def _images(b=2, size=64, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (b, size, size, 3)), jnp.float32)


def test_windows_are_row_major_crops_and_reassemble():
  x = _images(2, 96)  # a 3 x 3 grid of 32 px windows
  w = cut_windows(x, 32)
  assert w.shape == (2, 9, 32, 32, 3)
  for k in range(9):
    r, c = divmod(k, 3)
    np.testing.assert_array_equal(w[:, k], x[:, 32 * r:32 * (r + 1), 32 * c:32 * (c + 1)])
  np.testing.assert_array_equal(merge_windows(w, 3, 3), x)
  with pytest.raises(ValueError, match="not a multiple of window_size=32"):
    cut_windows(_images(1, 48), 32)


def _monkey(**kw):
  return Monkey(image=IMAGE, resampler=RESAMPLER, window_size=32, lora_attn_rank=2, lora_mlp_rank=4, **kw)


def _with_random_sets(params, seed=1):
  """Every LoRA set's B random (the init is zero, which would hide the sets)."""
  flat = traverse_util.flatten_dict(params)
  rng = np.random.default_rng(seed)
  for k, v in flat.items():
    if k[-1] == "lora_sets_b":
      flat[k] = jnp.asarray(rng.normal(0, 0.5, v.shape), v.dtype)
  return traverse_util.unflatten_dict(flat)


def _merged_vit_params(params, k):
  """The ViT's params with LoRA set k folded into the kernels (W + A_k B_k; scale alpha / r = 1)."""
  flat = traverse_util.flatten_dict(params["img"])
  out = {}
  for key, v in flat.items():
    if key[-1] in ("lora_sets_a", "lora_sets_b"):
      continue
    if key[-1] == "kernel" and key[:-1] + ("lora_sets_a",) in flat:
      a, b = flat[key[:-1] + ("lora_sets_a",)][k], flat[key[:-1] + ("lora_sets_b",)][k]
      v = v + (a @ b).reshape(v.shape)
    out[key] = v
  return traverse_util.unflatten_dict(out)


def test_window_k_uses_lora_set_k_and_the_global_view_none():
  m = _monkey()
  x = _images()
  params = nn.unbox(m.init(jax.random.key(0), x, method=Monkey.view_features))["params"]
  a = params["img"]["encoder"]["block_0"]["attn"]["query"]["lora_sets_a"]
  assert a.shape == (4, 32, 2)  # 4 window positions, rank 16 -> 2 here (attention)
  assert params["img"]["encoder"]["block_0"]["mlp"]["fc1"]["lora_sets_a"].shape == (4, 32, 4)
  params = _with_random_sets(params)
  views = m.apply({"params": params}, x, method=Monkey.views)
  feats = m.apply({"params": params}, x, method=Monkey.view_features)  # [B, 5 * 4, 24]
  vit = ViT(**dict(IMAGE, pool_type="none"))
  resampler = QwenVLResampler(**RESAMPLER)

  def plain(vit_params, view):
    enc = vit.apply({"params": vit_params}, view)[1]["encoded"]
    return resampler.apply({"params": params["resampler"]}, enc)

  for k in range(5):
    if k < 4:
      vit_params = _merged_vit_params(params, k)
    else:  # the global view: the ViT's own weights, no LoRA set
      vit_params = traverse_util.unflatten_dict({key: v for key, v in traverse_util.flatten_dict(params["img"]).items()
                                                 if key[-1] not in ("lora_sets_a", "lora_sets_b")})
    np.testing.assert_allclose(feats[:, 4 * k:4 * (k + 1)], plain(vit_params, views[:, k]), atol=2e-5,
                               err_msg=f"view {k}")
  # Changing only set 1 changes only window 1's tokens.
  flat = traverse_util.flatten_dict(params)
  for key in flat:
    if key[-1] == "lora_sets_b":
      flat[key] = flat[key].at[1].multiply(3.0)
  feats2 = m.apply({"params": traverse_util.unflatten_dict(flat)}, x, method=Monkey.view_features)
  changed = np.abs(np.asarray(feats2 - feats)).reshape(2, 5, 4, 24).max(axis=(0, 2, 3))
  assert changed[1] > 1e-3 and np.all(np.delete(changed, 1) == 0), changed


def test_global_only_baseline_has_no_lora_and_one_view():
  m = _monkey(windows=False)
  x = _images()
  params = nn.unbox(m.init(jax.random.key(0), x, method=Monkey.view_features))["params"]
  assert not any(k[-1].startswith("lora_sets") for k in traverse_util.flatten_dict(params))
  assert m.apply({"params": params}, x, method=Monkey.view_features).shape == (2, 4, 24)


def test_lora_sets_name_what_matches_nothing():
  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      with peft.lora_sets([("nothing", 2)], 2, jnp.zeros((x.shape[0],), jnp.int32)):
        return nn.Dense(3, name="fc")(x)

  with pytest.raises(ValueError, match=r"LoRA set targets \['nothing'\] match no linear layer.*fc"):
    M().init(jax.random.key(0), jnp.ones((2, 4)))


def test_resampler_shapes_positions_and_mask():
  r = QwenVLResampler(num_queries=9, num_heads=2, width=16, out_dim=12)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 8)), jnp.float32)
  params = nn.unbox(jax.jit(r.init)(jax.random.key(0), x))["params"]
  assert params["kv_proj"]["kernel"].shape == (8, 16)  # features 8 wide -> width 16, no bias
  assert r.apply({"params": params}, x).shape == (2, 9, 12)
  # Another feature grid (6 x 6): the key position embedding is interpolated, queries unchanged.
  assert r.apply({"params": params}, jnp.concatenate([x, x, x[:, :4]], 1)).shape == (2, 9, 12)
  # Keys carry positions: permuting the features changes the output (a set function would not).
  perm = x[:, ::-1]
  assert float(jnp.max(jnp.abs(r.apply({"params": params}, perm) - r.apply({"params": params}, x)))) > 1e-4
  # Masked features are ignored.
  mask = jnp.arange(16)[None] < 10
  y = r.apply({"params": params}, x, mask)
  x2 = x.at[:, 10:].set(5.0)
  np.testing.assert_allclose(r.apply({"params": params}, x2, mask), y, atol=1e-5)
  with pytest.raises(ValueError, match="num_queries must be a square number"):
    QwenVLResampler(num_queries=10).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"number of image features \(15\)"):
    r.apply({"params": params}, x[:, :15])


# ------------------------------------------------------------------ the demo chain, tiny


def test_monkey_demo_chain_trains_lora_sets_resampler_and_lm(vlm_bed, data_dir, tmp_path):
  """Monkey (tiny) on the text-rich scenes from the CLIP tower and the LM: the ViT's own weights stay
  frozen while its per-window LoRA sets, the resampler and the LM learn; the text-reading VQA
  eval and the paper's prompt format run end to end."""
  from helpers import TINY_LM, TINY_VISION, flat_params, shrink
  from vlm.train import train

  from configs import monkey
  c = shrink(monkey.get_config("demo"), data_dir, 2)
  assert c.data.builder.text_rich == 1 and c.data.question_regex
  c.model.lm_config.update(TINY_LM)
  c.model.vision_config.image.update(TINY_VISION)
  c.model.vision_config.resampler.update(num_queries=4, num_heads=2, out_dim=TINY_LM["width"])
  c.data.conversation.update(image_tokens=5 * 4, length=64, prompt_length=44)
  c.init.vision.path, c.init.lm.path = str(vlm_bed / "clip"), str(vlm_bed / "lm")
  c.evals.vqa.max_examples = 16
  out = train(c, tmp_path / "monkey")
  assert out["train/image_token_mismatch"] == 0.0 and 0.0 <= out["vqa/accuracy"] <= 1.0
  p, clip, lm = flat_params(tmp_path / "monkey"), flat_params(vlm_bed / "clip"), flat_params(vlm_bed / "lm")
  sets = [k for k in p if "lora_sets_b" in k]
  assert sets and all(p[k].shape[0] == 4 for k in sets)
  assert any(np.abs(p[k]).max() > 0 for k in sets)  # B starts at zero: the sets learned
  for k, v in p.items():
    if k.startswith("vision/img/") and "lora_sets" not in k:
      np.testing.assert_array_equal(v, clip[k[7:]], err_msg=k)
  assert any(not np.array_equal(v, lm[k[3:]]) for k, v in p.items() if k.startswith("lm/"))
  from vlm.data import get_tokenizer
  from vlm.data.pipeline import make_pipeline
  batch = next(make_pipeline(c.data, split="test", batch_size=2, mesh=None, seed=0))
  prompt = get_tokenizer(c.data).decode(np.asarray(batch["prompt"])[0][np.asarray(batch["prompt"])[0] < 1000])
  assert prompt.endswith("what does the text say? Answer:"), prompt
