"""CoCa: attentional pooler, the split decoder's masks, loss weights, cached decoding, captioning."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from vlm import decoding
from vlm.metrics_writer import read_metrics
from vlm.models import CoCa, predict_fns
from vlm.nn import AttentionalPooler
from vlm.objectives.coca import CoCaObjective

ROOT = Path(__file__).resolve().parents[1]
L = 8  # text length
PAD, EOS, BOS = 0, 1, 3


def tiny_coca(**over) -> CoCa:
  kw = dict(
    image=dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8),
    text=dict(vocab_size=40, width=32, mlp_dim=64, num_heads=2, unimodal_depth=2, multimodal_depth=2, max_len=L),
    embed_dim=16,
    num_cap_queries=4,
  )
  kw.update(over)
  return CoCa(**kw)


@pytest.fixture(scope="module")
def coca():
  model = tiny_coca()
  images = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
  tokens = jnp.array(
    [[BOS, 5, 6, 7, EOS, PAD, PAD, PAD], [BOS, 8, 9, EOS, PAD, PAD, PAD, PAD], [BOS, 10, 11, 12, 13, 14, 15, EOS]]
  )
  params = nn.meta.unbox(model.init(jax.random.key(1), images, tokens)["params"])
  return model, params, images, tokens


def test_attentional_pooler_shapes_and_masking():
  pooler = AttentionalPooler(num_queries=5, num_heads=2, width=12)
  x = jax.random.normal(jax.random.key(0), (2, 7, 8))
  mask = jnp.array([[True] * 4 + [False] * 3, [True] * 7])
  params = nn.meta.unbox(pooler.init(jax.random.key(1), x, mask))
  out = pooler.apply(params, x, mask)
  assert out.shape == (2, 5, 12)
  assert params["params"]["query"].shape == (5, 12)
  assert {"ln_q", "ln_k"} <= set(params["params"])
  # Masked tokens do not matter; unmasked ones do.
  x2 = x.at[0, 5].set(100.0)
  np.testing.assert_allclose(pooler.apply(params, x2, mask)[0], out[0], atol=1e-6)
  x3 = x.at[0, 1].set(100.0)
  assert np.abs(pooler.apply(params, x3, mask)[0] - out[0]).max() > 1e-3


@pytest.mark.slow
def test_text_tokens_never_see_the_future(coca):
  model, params, images, tokens = coca
  _, _, out = model.apply({"params": params}, images, tokens)
  changed = tokens.at[2, 4].set(20)
  _, _, out2 = model.apply({"params": params}, images, changed)
  diff = np.abs(out2["logits"][2] - out["logits"][2]).max(-1)
  np.testing.assert_allclose(diff[:4], 0.0, atol=1e-6)  # positions before the change
  assert (diff[4:] > 1e-4).all()  # the changed position and after


def test_unimodal_layers_and_text_embedding_never_see_the_image(coca):
  model, params, images, tokens = coca
  other = images[::-1]
  ztxt, aux = model.apply({"params": params}, tokens, method=model.encode_text)
  _, ztxt_b, out_b = model.apply({"params": params}, other, tokens)
  _, ztxt_a, out_a = model.apply({"params": params}, images, tokens)
  np.testing.assert_allclose(ztxt_a, ztxt, atol=1e-6)
  np.testing.assert_allclose(ztxt_b, ztxt, atol=1e-6)
  # ...while the multimodal layers do see it.
  assert np.abs(out_a["logits"] - out_b["logits"]).max() > 1e-3
  assert aux["unimodal"].shape == (3, L, 32)


@pytest.mark.slow
def test_cls_sees_the_whole_caption_but_not_padding(coca):
  model, params, _, tokens = coca
  z = model.apply({"params": params}, tokens, method=model.encode_text)[0]
  # The last real token (EOS of row 0 is at 4; change token 3) moves the text embedding.
  z2 = model.apply({"params": params}, tokens.at[0, 3].set(30), method=model.encode_text)[0]
  assert np.abs(z2[0] - z[0]).max() > 1e-4
  # Padding keys are masked for CLS: a different pad embedding leaves it unchanged.
  p2 = jax.tree.map(lambda x: x, params)
  p2["txt"]["embedding"]["embedding"] = params["txt"]["embedding"]["embedding"].at[PAD].add(5.0)
  z3 = model.apply({"params": p2}, tokens, method=model.encode_text)[0]
  np.testing.assert_allclose(z3[:2], z[:2], atol=1e-6)


def test_loss_is_weighted_sum_and_ignores_padding(coca):
  model, params, images, tokens = coca
  batch = {"image": images, "text": tokens}
  loss, m = CoCaObjective()(model, params, batch, rng=jax.random.key(0), train=False)
  np.testing.assert_allclose(loss, 1.0 * m["contrastive_loss"] + 2.0 * m["caption_loss"], rtol=1e-6)
  loss2, m2 = CoCaObjective(contrastive_weight=0.5, caption_weight=3.0)(
    model, params, batch, rng=jax.random.key(0), train=False
  )
  np.testing.assert_allclose(loss2, 0.5 * m2["contrastive_loss"] + 3.0 * m2["caption_loss"], rtol=1e-6)
  # Caption loss by hand: mean CE over non-pad targets (position t predicts token t+1).
  _, _, out = model.apply({"params": params}, images, tokens)
  logp = jax.nn.log_softmax(out["logits"][:, :-1], -1)
  targets = tokens[:, 1:]
  ce = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
  mask = targets != PAD
  np.testing.assert_allclose(m["caption_loss"], (ce * mask).sum() / mask.sum(), rtol=1e-5)
  # A different pad id would count the padding: the loss changes.
  _, m3 = CoCaObjective(pad_id=-1)(model, params, batch, rng=jax.random.key(0), train=False)
  assert abs(float(m3["caption_loss"]) - float(m["caption_loss"])) > 1e-4


@pytest.mark.parametrize(
  "method,kw", [("greedy", {}), ("beam", dict(num_beams=3)), ("sample", dict(top_k=5, temperature=0.8))]
)
@pytest.mark.slow
def test_cached_and_uncached_decoding_give_the_same_tokens(coca, method, kw):
  model, params, images, _ = coca
  rng = jax.random.key(7) if method == "sample" else None
  cached = predict_fns(model)["caption"](
    params, images, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len=L, method=method, rng=rng, **kw
  )

  def logits_fn(tokens):  # the training forward, recomputed over the whole buffer
    return model.apply({"params": params}, images if tokens.shape[0] == 3 else jnp.repeat(images, 3, 0), tokens)[2][
      "logits"
    ]

  prompt = jnp.full((3, 1), BOS, jnp.int32)
  uncached = decoding.generate(
    decoding.uncached_step_fn(logits_fn),
    decoding.init_token_cache(3, L),
    prompt,
    method=method,
    rng=rng,
    max_new_tokens=L - 1,
    eos_id=EOS,
    pad_id=PAD,
    **kw,
  )
  np.testing.assert_array_equal(cached.tokens, uncached.tokens)
  np.testing.assert_allclose(cached.scores, uncached.scores, rtol=1e-4, atol=1e-4)


def test_caption_decoding_is_jittable_and_stops_at_eos(coca):
  model, params, images, _ = coca
  # Make EOS the certain next token: every caption is [EOS] and then padding.
  p2 = jax.tree.map(lambda x: x, params)
  p2["txt"]["head"]["bias"] = params["txt"]["head"]["bias"].at[EOS].set(1e4)
  fn = jax.jit(lambda p, x: predict_fns(model)["caption"](p, x, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len=L).tokens)
  tokens = np.asarray(fn(p2, images))
  assert tokens.shape == (3, L - 1)
  assert (tokens[:, 0] == EOS).all() and (tokens[:, 1:] == PAD).all()


def test_frozen_image_encoder_gets_no_gradient(coca):
  _, params, images, tokens = coca
  model = tiny_coca(frozen=("image",))
  batch = {"image": images, "text": tokens}
  grads = jax.jit(jax.grad(lambda p: CoCaObjective()(model, p, batch, rng=jax.random.key(0), train=True)[0]))(params)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads["img"]))
  assert float(jnp.abs(grads["cap_pooler"]["query"]).max()) > 0.0


@pytest.mark.slow
def test_trainer_logs_both_losses_and_all_evaluations(coca_workdir):
  rows = read_metrics(coca_workdir)
  start = [r for r in rows if r["step"] == 0]  # eval_at_start: the untrained model
  assert start and "captioning/cider" in start[0] and "zeroshot/top1" in start[0]
  last = [r for r in rows if "train/loss" in r][-1]
  for key in ("train/caption_loss", "train/contrastive_loss", "train/token_accuracy", "train/scale"):
    assert key in last
  final = [r for r in rows if r["step"] == 150 and "captioning/bleu4" in r][-1]
  for key in ("captioning/cider", "zeroshot/top1_seen", "retrieval/i2t_r1", "probe/top1"):
    assert key in final


@pytest.mark.slow
def test_predict_prints_a_caption_and_zero_shot_labels(coca_workdir, tmp_path):
  from PIL import Image

  img = tmp_path / "x.png"
  Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(img)
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="1", PYTHONPATH=str(ROOT))
  cap = subprocess.run(
    [
      sys.executable,
      "-m",
      "vlm.predict",
      f"--workdir={coca_workdir}",
      f"--image={img}",
      "--method=beam",
      "--num_beams=2",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert cap.returncode == 0, cap.stderr[-3000:]
  assert isinstance(json.loads(cap.stdout.strip().splitlines()[-1])["caption"], str)
  zs = subprocess.run(
    [
      sys.executable,
      "-m",
      "vlm.predict",
      f"--workdir={coca_workdir}",
      f"--image={img}",
      "--labels=red circle,blue star",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert zs.returncode == 0, zs.stderr[-3000:]
  assert len(json.loads(zs.stdout[zs.stdout.index("[") :])) == 2


@pytest.mark.slow
def test_demo_learns_both_heads(coca_run):
  """A lighter demo: zero-shot well above chance and CIDEr at least twice the untrained model's."""
  wd, out = coca_run
  start = [r for r in read_metrics(wd) if r["step"] == 0][0]
  assert out["zeroshot/top1_seen"] > 5 * out["zeroshot/chance"], out
  assert out["captioning/cider"] > max(2 * start["captioning/cider"], 0.5), (start, out)
