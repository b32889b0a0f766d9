"""FLAVA: the ViT mask token, shapes, tokenizer grid, the six loss terms and their masking, ITM
negatives, a frozen tokenizer through the trainer, and learning on the tiny scenes."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from helpers import TINY_DATA, shuffled
from vlm import checkpoint
from vlm.losses import hard_negative_indices
from vlm.metrics_writer import read_metrics
from vlm.models import FLAVA, ViT, VQTokenizer
from vlm.objectives.flava import FlavaObjective
from vlm.train import train

PAD, EOS, BOS = 0, 1, 3
L, V = 8, 41  # text length; vocabulary incl. the [MASK] row (id 40)
TOK = dict(width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=8, codebook_size=24, code_dim=8)
WEIGHTS = ("contrastive", "mlm", "mim", "mmm_text", "mmm_image", "itm")


def tiny_flava(**over) -> FLAVA:
  kw = dict(image=dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8),
            text=dict(vocab_size=V, width=32, depth=1, mlp_dim=64, num_heads=2, max_len=L),
            multimodal=dict(width=48, depth=1, mlp_dim=64, num_heads=2), tokenizer=TOK, embed_dim=16)
  kw.update(over)
  return FLAVA(**kw)


def make_batch(b: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  text = np.zeros((b, L), np.int32)
  for i in range(b):
    n = rng.integers(2, L - 1)  # words; BOS + words + EOS <= L
    text[i, 0], text[i, 1:n + 1], text[i, n + 1] = BOS, rng.integers(4, V - 1, n), EOS
  images = rng.uniform(-1, 1, (b, 32, 32, 3)).astype(np.float32)
  return {"image": jnp.asarray(images), "text": jnp.asarray(text)}


def init_params(model, batch):
  return nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), batch["image"][:1], batch["text"][:1])["params"])


def run(obj, model, params, batch, seed=0, train=False):
  """(loss, metrics) of the objective, jitted (much faster than eager dispatch)."""
  return jax.jit(lambda p, b, k: obj(model, p, b, rng=k, train=train))(params, batch, jax.random.key(seed))


@pytest.fixture(scope="module")
def flava():
  model = tiny_flava()
  batch = make_batch(16)
  return model, init_params(model, batch), batch


# --- the image encoder's mask token -----------------------------------------------------------

def vit(**over):
  kw = dict(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=8, class_token=True, pool_type="cls")
  kw.update(over)
  return ViT(**kw)


def test_vit_without_mask_token_is_unchanged():
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  plain = nn.meta.unbox(vit().init(jax.random.key(1), images)["params"])
  assert "mask_token" not in plain
  with pytest.raises(ValueError, match="mask_token=True"):
    vit().apply({"params": plain}, images, patch_mask=jnp.zeros((2, 4), bool))
  # The same parameters (plus the token) give the same outputs when no patch is masked.
  masked = nn.meta.unbox(vit(mask_token=True).init(jax.random.key(1), images)["params"])
  assert set(masked) == set(plain) | {"mask_token"}
  out = vit().apply({"params": plain}, images)[0]
  out2 = vit(mask_token=True).apply({"params": dict(plain, mask_token=masked["mask_token"])}, images,
                                    patch_mask=jnp.zeros((2, 4), bool))[0]
  np.testing.assert_allclose(out2, out, atol=1e-6)


def test_masked_patches_are_replaced_by_the_mask_token():
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  mask = jnp.array([[True, False, False, True], [False, True, False, False]])
  model = vit(mask_token=True)
  params = nn.meta.unbox(model.init(jax.random.key(1), images)["params"])
  enc = lambda p, x: model.apply({"params": p}, x, patch_mask=mask)[1]["encoded"]
  ref = enc(params, images)
  # The pixels of a masked patch (row 0, patch 0 = top-left 8x8) never reach the encoder...
  np.testing.assert_allclose(enc(params, images.at[0, :8, :8].add(3.0)), ref, atol=1e-5)
  # ...those of an unmasked one do.
  assert np.abs(enc(params, images.at[0, :8, 8:].add(3.0)) - ref).max() > 1e-3
  # Without encoder layers, the outputs are LN(token + position) at masked patches, and an unmasked
  # patch's output does not depend on the mask token at all.
  shallow = vit(mask_token=True, depth=0)
  p0 = nn.meta.unbox(shallow.init(jax.random.key(1), images)["params"])
  enc0 = lambda p: shallow.apply({"params": p}, images, patch_mask=mask)[1]["encoded"]
  bump = jax.random.normal(jax.random.key(9), p0["mask_token"].shape)  # not a constant: LN ignores those
  p_other = dict(p0, mask_token=p0["mask_token"] + bump)
  a, b = enc0(p0), enc0(p_other)
  tokens_masked = np.concatenate([[False], np.asarray(mask[0])])  # the class token first
  np.testing.assert_allclose(a[0, ~tokens_masked], b[0, ~tokens_masked], atol=1e-6)
  assert np.abs(a[0, tokens_masked] - b[0, tokens_masked]).max(-1).min() > 1e-3
  pos = p0["pos_embedding"]["pos_embedding"][0]
  ln = lambda x: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
  expect = ln(p0["mask_token"][0, 0] + pos[1]) * p0["encoder_norm"]["scale"] + p0["encoder_norm"]["bias"]
  np.testing.assert_allclose(a[0, 1], expect, atol=1e-4)
  # With encoder layers, unmasked outputs change with the mask token, through attention only.
  assert np.abs(enc(dict(params, mask_token=params["mask_token"] + bump), images)[0, 2] - ref[0, 2]).max() > 1e-4


# --- the model ----------------------------------------------------------------------------------

def test_shapes_and_parameters(flava):
  model, params, batch = flava
  b = batch["text"].shape[0]
  zimg, ztxt, out = jax.jit(lambda p: model.apply({"params": p}, batch["image"], batch["text"]))(params)
  assert zimg.shape == ztxt.shape == (b, 16)
  np.testing.assert_allclose(np.linalg.norm(zimg, axis=-1), 1.0, rtol=1e-5)
  assert out["mlm_logits"].shape == out["mmm_text_logits"].shape == (b, L, V)
  assert out["mim_logits"].shape == out["mmm_image_logits"].shape == (b, 16, TOK["codebook_size"])
  assert out["itm_logits"].shape == (b, 2) and out["codes"].shape == (b, 16) and out["codes"].dtype == jnp.int32
  assert {"tokenizer", "img", "txt", "mm", "mlm_head", "mim_head", "mmm_text_head", "mmm_image_head", "itm_head",
          "img_proj", "txt_proj", "t"} <= set(params)
  assert "mask_token" in params["img"] and "cls" in params["mm"]
  # Only the tokenizer's encoder side is part of FLAVA; its names are VQTokenizer's own.
  assert {"embedding", "encoder", "codebook"} == set(params["tokenizer"])
  # The TwoTower signatures of the zero-shot / retrieval evaluations.
  z, aux = model.apply({"params": params}, batch["image"], method=model.encode_image)
  np.testing.assert_allclose(z, zimg, atol=1e-5)
  assert aux["encoded"].shape == (b, 17, 32)
  z, aux = model.apply({"params": params}, batch["text"], train=False, method=model.encode_text)
  np.testing.assert_allclose(z, ztxt, atol=1e-5)


def test_text_padding_is_masked_and_bos_is_cls(flava):
  model, params, batch = flava
  z = model.apply({"params": params}, batch["text"], method=model.encode_text)[0]
  p2 = jax.tree.map(lambda x: x, params)
  p2["txt"]["embedding"]["embedding"] = params["txt"]["embedding"]["embedding"].at[PAD].add(5.0)
  np.testing.assert_allclose(model.apply({"params": p2}, batch["text"], method=model.encode_text)[0], z, atol=1e-5)
  # The last word moves [CLS_T] (bidirectional attention).
  t2 = batch["text"].at[:, 1].set(5)
  assert np.abs(model.apply({"params": params}, t2, method=model.encode_text)[0] - z).max() > 1e-4


def test_tokenizer_grid_must_match_the_patch_grid(flava):
  _, _, batch = flava
  model = tiny_flava(tokenizer=dict(TOK, patch_size=4))
  with pytest.raises(ValueError, match=r"code grid \(8, 8\).*patch grid \(4, 4\)"):
    model.init(jax.random.key(0), batch["image"][:1], batch["text"][:1])


def test_mask_id_must_be_in_the_vocabulary(flava):
  model, params, batch = flava
  with pytest.raises(ValueError, match="mask_id=41"):
    FlavaObjective(mask_id=V)(model, params, batch, rng=jax.random.key(0), train=False)
  with pytest.raises(ValueError, match="tokenizer"):
    FlavaObjective(mask_id=V - 1)(tiny_flava(tokenizer=None), params, batch, rng=jax.random.key(0), train=False)


# --- the objective ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def terms(flava):
  """The default objective on a 64-pair batch, single device."""
  model, params, _ = flava
  batch = make_batch(64, seed=1)
  loss, m = run(FlavaObjective(mask_id=V - 1), model, params, batch, seed=3, train=True)
  return batch, loss, m


def test_loss_terms_finite_and_masking_rates(terms):
  batch, loss, m = terms
  assert np.isfinite(float(loss))
  for name in WEIGHTS:
    assert np.isfinite(float(m[f"{name}_loss"])) and float(m[f"{name}_loss"]) > 0, name
  np.testing.assert_allclose(loss, sum(m[f"{n}_loss"] for n in WEIGHTS), rtol=1e-5)  # every weight 1
  # MIM / MMM-image: exactly round(0.4 * 16) = 6 of the 16 patches of every image (blockwise).
  np.testing.assert_allclose(m["mim_masked_fraction"], 6 / 16, atol=1e-6)
  np.testing.assert_allclose(m["mmm_image_masked_fraction"], 6 / 16, atol=1e-6)
  # MLM: 15% of the non-special tokens (the metric's fraction is over all positions).
  eligible = float(np.mean(np.asarray(batch["text"]) > BOS))
  assert abs(float(m["mlm_masked_fraction"]) / eligible - 0.15) < 0.05, (m["mlm_masked_fraction"], eligible)
  # Chance-level predictions at initialisation.
  assert float(m["mlm_loss"]) == pytest.approx(np.log(V), rel=0.3)
  assert float(m["mim_loss"]) == pytest.approx(np.log(TOK["codebook_size"]), rel=0.3)
  assert float(m["itm_loss"]) == pytest.approx(np.log(2), rel=0.3)


def test_weights_are_fields_and_random_patch_masking(flava):
  model, params, batch = flava
  w = dict(contrastive_weight=0.5, mlm_weight=2.0, mim_weight=0.0, mmm_text_weight=1.5, mmm_image_weight=0.25,
           itm_weight=3.0)
  obj = FlavaObjective(mask_id=V - 1, mim_masking="random", mim_ratio=0.25, **w)
  loss, m = run(obj, model, params, batch)
  assert "mim_loss" not in m  # a zero weight drops its term
  np.testing.assert_allclose(loss, sum(w[f"{n}_weight"] * m[f"{n}_loss"] for n in WEIGHTS if n != "mim"), rtol=1e-5)
  np.testing.assert_allclose(m["mmm_image_masked_fraction"], 4 / 16, atol=1e-6)


def test_without_tokenizer_the_other_terms_train(flava):
  """Traced only (shapes, no compile): the model has no tokenizer or image heads; the other terms remain."""
  _, _, batch = flava
  bare = tiny_flava(tokenizer=None)
  p = jax.eval_shape(lambda: nn.meta.unbox(bare.init(jax.random.key(1), batch["image"][:1], batch["text"][:1]))
                     )["params"]
  assert "tokenizer" not in p and "mim_head" not in p and "mmm_image_head" not in p
  obj = FlavaObjective(mask_id=V - 1, mim_weight=0.0, mmm_image_weight=0.0)
  loss, m = jax.eval_shape(lambda q: obj(bare, q, batch, rng=jax.random.key(0), train=True), p)
  assert loss.shape == () and {"contrastive_loss", "mlm_loss", "mmm_text_loss", "itm_loss"} <= set(m)
  assert "mim_loss" not in m and "mmm_image_loss" not in m


def test_sharded_objective_matches_single_device(flava, terms):
  """On 8 data devices the masks and every term but ITM (its negatives are drawn per device) match."""
  model, params, _ = flava
  batch, _, ref = terms
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P("data"))), batch)
  obj = FlavaObjective(mask_id=V - 1, mesh=mesh)
  with jax.set_mesh(mesh):
    got = run(obj, model, params, sharded, seed=3, train=True)[1]
  for name in ("contrastive_loss", "mlm_loss", "mim_loss", "mmm_text_loss", "mmm_image_loss", "mlm_masked_fraction"):
    np.testing.assert_allclose(got[name], ref[name], rtol=2e-5, err_msg=name)
  assert np.isfinite(float(got["itm_loss"]))


@pytest.mark.parametrize("hard", [True, False])
def test_itm_negatives_are_never_the_positive(hard):
  """The objective's sampling (global batch over 8 devices, duplicate captions excluded)."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  b = 32
  text = make_batch(b, seed=2)["text"].at[1].set(make_batch(b, seed=2)["text"][0])  # rows 0, 1: same caption
  z = jax.random.normal(jax.random.key(0), (b, 8))
  z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
  fn = jax.jit(lambda k: hard_negative_indices(put(z), put(z), k, scale=100.0, tokens=put(text), hard=hard,
                                               mesh=mesh))
  with jax.set_mesh(mesh):
    draws = [jax.device_get(fn(jax.random.key(i))) for i in range(20)]
  rows = np.arange(b)
  for neg_txt, neg_img in draws:
    assert (neg_txt != rows).all() and (neg_img != rows).all()
    assert neg_txt[0] != 1 and neg_txt[1] != 0 and neg_img[0] != 1 and neg_img[1] != 0
  # Every device draws from the whole global batch, not only its own rows.
  local = np.concatenate([d[0] // (b // 8) == rows // (b // 8) for d in draws])
  assert local.mean() < 0.9


# --- what each head reads, the MIM targets, the ITM negatives (through the objective) ------------

def perturbed(tree, seed: int, scale: float = 0.5):
  """tree + scale * N(0, 1) noise on every leaf."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def eval_terms(flava):
  """The default objective's metrics, jitted once with a fixed rng (the same masks and negatives each call),
  train=False (no dropout)."""
  model, _, _ = flava
  obj = FlavaObjective(mask_id=V - 1)
  return jax.jit(lambda p, b: obj(model, p, b, rng=jax.random.key(3), train=False)[1])


def test_mmm_reads_the_fused_states_and_mlm_mim_the_unimodal_ones(flava, eval_terms):
  """Through the objective: another image moves MMM-text (the fused encoder attends to the image) and
  leaves MLM exactly as it was; another text moves MMM-image and leaves MIM; other multimodal-encoder
  parameters move MMM and ITM and none of the unimodal terms. A head fed the unimodal states where
  it should read h_M (or the reverse) fails one of these."""
  model, params, batch = flava
  ref = eval_terms(params, batch)
  new_image = eval_terms(params, dict(batch, image=jnp.asarray(shuffled(batch["image"], seed=1))))
  new_text = eval_terms(params, dict(batch, text=jnp.asarray(shuffled(batch["text"], seed=1))))
  new_mm = eval_terms(dict(params, mm=perturbed(params["mm"], seed=2)), batch)
  moved = lambda got, name: abs(float(got[name]) - float(ref[name])) > 1e-3 * float(ref[name])
  for got, what, same, changed in [
      (new_image, "another image", ("mlm_loss", "mlm_accuracy"), ("mmm_text_loss",)),
      (new_text, "another text", ("mim_loss", "mim_accuracy"), ("mmm_image_loss",)),
      (new_mm, "other multimodal-encoder weights", ("contrastive_loss", "mlm_loss", "mim_loss"),
       ("mmm_text_loss", "mmm_image_loss", "itm_loss"))]:
    for name in same:
      np.testing.assert_allclose(got[name], ref[name], rtol=1e-6, err_msg=f"{what} moved {name}")
    for name in changed:
      assert moved(got, name), f"{what} left {name} at {float(ref[name]):.6f}: it does not read the fused states"

  # The model's own forward (init, conversion) wires its heads the same way: logits at every position.
  fwd = jax.jit(lambda p, img, txt: model.apply({"params": p}, img, txt)[2])
  image, text = batch["image"], batch["text"]
  out = fwd(params, image, text)
  out_img = fwd(params, jnp.asarray(shuffled(image, seed=1)), text)
  out_txt = fwd(params, image, jnp.asarray(shuffled(text, seed=1)))
  out_mm = fwd(dict(params, mm=perturbed(params["mm"], seed=2)), image, text)
  diff = lambda a, b, k: float(np.abs(np.asarray(a[k]) - np.asarray(b[k])).max())
  assert diff(out_img, out, "mlm_logits") == 0 and diff(out_img, out, "mmm_text_logits") > 1e-3
  assert diff(out_txt, out, "mim_logits") == 0 and diff(out_txt, out, "mmm_image_logits") > 1e-3
  assert diff(out_mm, out, "mlm_logits") == diff(out_mm, out, "mim_logits") == 0
  assert min(diff(out_mm, out, k) for k in ("mmm_text_logits", "mmm_image_logits", "itm_logits")) > 1e-3


class OracleFLAVA(FLAVA):
  """FLAVA whose MIM and MMM-image heads ignore their inputs and return the parameter 'oracle' [B, N, K]:
  with 30 on the logit of one code per patch, the objective's MIM accuracy is 1 exactly when its
  targets are those codes."""

  def mim_logits(self, h_img):
    return self.get_variable("params", "oracle")

  def mmm_image_logits(self, h_mm, num_patches):
    return self.get_variable("params", "oracle")


def test_mim_targets_are_the_frozen_tokenizers_codes_of_the_unmasked_image(flava):
  """The targets of MIM and MMM-image are VQTokenizer.encode of the unmasked images (computed here with
  the tokenizer alone, on FLAVA's 'tokenizer' parameters) in the ViT's row-major patch order, so
  another tokenizer gives other targets; and no gradient reaches the tokenizer."""
  model, params, batch = flava
  vq = VQTokenizer(**TOK)
  encode = jax.jit(lambda p, x: vq.apply({"params": p}, x, method=vq.encode).reshape(x.shape[0], -1))
  codes = np.asarray(encode(params["tokenizer"], batch["image"]))
  assert len(np.unique(codes)) > 3  # a test of something: not one code everywhere
  np.testing.assert_array_equal(
      jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.image_codes))(params, batch["image"]), codes)
  other_tok = perturbed(params["tokenizer"], seed=4, scale=1.0)
  other_codes = np.asarray(encode(other_tok, batch["image"]))
  assert (other_codes != codes).mean() > 0.3

  oracle_model = OracleFLAVA(**{f.name: getattr(model, f.name) for f in dataclasses.fields(FLAVA)
                                if f.init and f.name not in ("parent", "name")})
  obj = FlavaObjective(mask_id=V - 1)
  metrics = jax.jit(lambda p: obj(oracle_model, p, batch, rng=jax.random.key(5), train=False)[1])

  def accuracy(oracle, p):
    got = metrics(dict(p, oracle=30.0 * jax.nn.one_hot(oracle, TOK["codebook_size"])))
    return float(got["mim_accuracy"]), float(got["mmm_image_accuracy"])

  assert accuracy(codes, params) == (1.0, 1.0)
  # The targets move with the tokenizer's parameters (they are that tokenizer's codes)...
  assert max(accuracy(codes, dict(params, tokenizer=other_tok))) < 0.8
  assert accuracy(other_codes, dict(params, tokenizer=other_tok)) == (1.0, 1.0)
  # ...and are each pair's own image's codes, not another example's.
  assert max(accuracy(np.asarray(shuffled(codes, seed=0)), params)) < 0.8

  # No gradient reaches the tokenizer (argmax codes, stop-gradient'ed): exactly zero, not merely small.
  # (test_frozen_tokenizer_loaded_and_unchanged_by_training: the trainer also keeps it frozen.)
  loss = lambda tok: obj(model, dict(params, tokenizer=tok), batch, rng=jax.random.key(3), train=True)[0]
  grads = jax.jit(jax.grad(loss))(params["tokenizer"])
  for path, g in traverse_util.flatten_dict(grads, sep="/").items():
    assert not np.asarray(g).any(), f"tokenizer/{path} got a gradient"


@pytest.mark.parametrize("hard", [True, False])
def test_objective_draws_itm_negatives_from_the_whole_global_batch(flava, monkeypatch, hard):
  """On 8 devices (8 pairs each) the objective samples with the mesh over the global batch of 64 and fuses
  the drawn rows: the negatives a device uses come mostly from the other devices' examples (7/8 expected),
  are never the positive or a pair with the same caption, and are the indices take_rows gathers."""
  import vlm.objectives.flava as objective_module
  model, params, _ = flava
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  b = 64
  batch = make_batch(b, seed=6)
  batch["text"] = batch["text"].at[9].set(batch["text"][1])  # pairs 1 (device 0) and 9 (device 1): one caption
  calls, draws, gathered = [], [], []
  real_sample, real_take = objective_module.hard_negative_indices, objective_module.take_rows

  def sample(zimg, ztxt, rng, **kw):
    calls.append((zimg.shape[0], kw.get("mesh"), kw.get("hard", True)))
    neg = real_sample(zimg, ztxt, rng, **kw)
    jax.debug.callback(lambda t, i: draws.append((np.asarray(t), np.asarray(i))), *neg)
    gathered.append({id(x): name for x, name in zip(neg, ("text", "image"))})
    return neg

  def take(x, index, mesh=None):
    gathered.append((id(index), mesh))
    return real_take(x, index, mesh)

  monkeypatch.setattr(objective_module, "hard_negative_indices", sample)
  monkeypatch.setattr(objective_module, "take_rows", take)
  obj = FlavaObjective(mask_id=V - 1, mesh=mesh, itm_hard_negatives=hard)
  sharded = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P("data"))), batch)
  fn = jax.jit(lambda p, bt, k: obj(model, p, bt, rng=k, train=True)[0])
  with jax.set_mesh(mesh):
    for i in range(8):
      jax.block_until_ready(fn(params, sharded, jax.random.key(i)))
  jax.effects_barrier()
  assert calls == [(b, mesh, hard)]  # traced once: the global batch, the objective's mesh
  ids, (txt_take, img_take) = gathered[0], gathered[1:]
  assert ids.get(txt_take[0]) == "text" and ids.get(img_take[0]) == "image", "take_rows got other indices"
  assert txt_take[1] is mesh and img_take[1] is mesh
  assert len(draws) == 8
  rows, device = np.arange(b), np.arange(b) // (b // 8)
  for neg_txt, neg_img in draws:
    assert neg_txt.shape == neg_img.shape == (b,)
    assert (neg_txt != rows).all() and (neg_img != rows).all()
    assert neg_txt[1] != 9 and neg_txt[9] != 1 and neg_img[1] != 9 and neg_img[9] != 1
  other_device = np.mean([device[d] != device for pair in draws for d in pair])
  assert other_device > 0.7, f"only {other_device:.0%} of the negatives come from another device"


# --- through the trainer ------------------------------------------------------------------------

def tiny_config(data_dir, steps: int, tokenizer_dir=None):
  from configs import flava_base
  c = flava_base.get_config("demo")
  c.data.data_dir = str(data_dir)
  c.data.builder.update(TINY_DATA)
  w = dict(width=64, mlp_dim=128, num_heads=4)
  c.model["image"].update(depth=2, **w)
  c.model["text"].update(depth=1, **w)
  c.model["multimodal"].update(depth=1, **w)
  c.model["embed_dim"] = 64
  c.model["tokenizer"] = dict(TOK)
  c.init.path = str(tokenizer_dir) if tokenizer_dir else None
  c.batch_size = 64
  c.total_steps = steps
  c.log_every = 10
  c.checkpoint_every = 1000
  c.schedule.warmup_steps = 10
  c.lr = 2e-3
  for name in ("zeroshot", "retrieval"):
    c.evals[name].every = 0
    c.evals[name].max_examples = 256
  c.tensorboard = False
  return c


@pytest.fixture(scope="module")
def vq_workdir(tmp_path_factory):
  """A VQ workdir holding a randomly initialised tokenizer (random codes are valid MIM targets), saved as
  the trainer saves: `<wd>/checkpoints/<step>/state` with the parameters under 'params'."""
  from vlm.models import VQTokenizer
  model = VQTokenizer(**TOK)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(7), jnp.zeros((1, 32, 32, 3)))["params"])
  wd = tmp_path_factory.mktemp("vq")
  ckpt = checkpoint.Checkpointer(wd, save_every=1, async_save=False)
  ckpt.save(1, {"params": params, "step": jnp.ones((), jnp.int32)}, force=True)
  ckpt.close()
  return wd


@pytest.fixture(scope="module")
def flava_run(tmp_path_factory, data_dir, vq_workdir):
  wd = tmp_path_factory.mktemp("flava")
  out = train(tiny_config(data_dir, steps=120, tokenizer_dir=vq_workdir), wd)
  return wd, out


def test_frozen_tokenizer_loaded_and_unchanged_by_training(flava_run, vq_workdir):
  wd, _ = flava_run
  vq = traverse_util.flatten_dict(checkpoint.load_params(vq_workdir), sep="/")
  assert {"codebook", "decoder/encoder/block_0/attn/query/kernel"} <= set(vq)  # the whole VQ model
  trained = traverse_util.flatten_dict(checkpoint.load_params(wd), sep="/")
  tok = {k[len("tokenizer/"):]: v for k, v in trained.items() if k.startswith("tokenizer/")}
  assert tok and set(tok) <= set(vq)
  for k, v in tok.items():
    np.testing.assert_array_equal(v, vq[k], err_msg=k)


def test_every_term_is_logged_and_learning_happens(flava_run):
  wd, out = flava_run
  rows = [r for r in read_metrics(wd) if "train/loss" in r]
  for name in WEIGHTS:
    assert f"train/{name}_loss" in rows[-1], name
  for key in ("train/mlm_accuracy", "train/mim_accuracy", "train/itm_accuracy", "train/scale"):
    assert key in rows[-1]
  assert rows[-1]["train/contrastive_loss"] < 0.7 * rows[0]["train/contrastive_loss"]
  assert rows[-1]["train/mlm_loss"] < rows[0]["train/mlm_loss"]
  assert out["zeroshot/top1_seen"] > 5 * out["zeroshot/chance"], out
  assert out["retrieval/t2i_r5"] > 0.2, out  # 5 of ~150 distinct captions: chance ~3%


def test_missing_tokenizer_checkpoint_says_how_to_make_it(data_dir, tmp_path):
  c = tiny_config(data_dir, steps=1, tokenizer_dir=tmp_path / "nothing_here")
  with pytest.raises(FileNotFoundError, match=r"nothing_here.*configs/vq_tokenizer.py:demo"):
    train(c, tmp_path / "wd")
