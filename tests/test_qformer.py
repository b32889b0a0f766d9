"""BLIP-2 Q-Former: HF parity, attention-mask modes, layer layout, the stage-1 objective and a tiny run."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_DATA
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vlm import checkpoint, parallel
from vlm.models import MODELS, Blip2QFormer
from vlm.nn.qformer import QFormer, qformer_attention_mask
from vlm.losses.matching import hard_negative_indices
from vlm.objectives.blip2 import Blip2Stage1, max_query_itc_loss

TOL = 1e-4
Q, D, DV = 5, 32, 24


def _qformer(**kw):
  return QFormer(
    **{**dict(width=D, depth=4, num_heads=4, mlp_dim=48, cross_attention_frequency=2, vocab_size=99, max_len=16), **kw}
  )


def _inputs(seed=0, b=2, t=6):
  rng = np.random.default_rng(seed)
  query = jnp.asarray(rng.normal(size=(b, Q, D)), jnp.float32)
  image = jnp.asarray(rng.normal(size=(b, 7, DV)), jnp.float32)
  ids = rng.integers(4, 99, size=(b, t))
  ids[0, 4:] = 0  # padding
  return query, jnp.asarray(ids, jnp.int32), image


@pytest.fixture(scope="module")
def qformer():
  m = _qformer()
  query, ids, image = _inputs()
  params = nn.unbox(jax.jit(m.init)(jax.random.key(0), query, ids, image)["params"])
  return m, params


# -- HF parity --------------------------------------------------------------------------------------


def _perturbed(module, torch):
  with torch.no_grad():  # HF inits norms to 1/0 and biases to 0: perturb every tensor
    for p in module.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return module.eval()


@pytest.mark.slow
def test_qformer_matches_hf_blip2_qformer_model():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

  from vlm.convert import import_hf_blip2_qformer

  torch.manual_seed(0)
  qc = transformers.Blip2QFormerConfig(
    hidden_size=D,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=48,
    cross_attention_frequency=2,
    encoder_hidden_size=DV,
    use_qformer_text_input=True,
    vocab_size=99,
    max_position_embeddings=16,
  )
  hf, emb = _perturbed(transformers.Blip2QFormerModel(qc), torch), _perturbed(Blip2TextEmbeddings(qc), torch)
  state = dict(hf.state_dict())  # as in Blip2ForImageTextRetrieval: the text embeddings beside the Q-Former
  state.update({f"embeddings.{k}": v for k, v in emb.state_dict().items() if k != "position_ids"})
  kwargs, params, query_tokens = import_hf_blip2_qformer(state, qc)
  assert query_tokens is None and kwargs["vocab_size"] == 99 and kwargs["norm_eps"] == 1e-12
  m = QFormer(**kwargs)
  query, ids, image = _inputs()
  tq, ti, tids = (torch.tensor(np.asarray(x)) for x in (query, image, ids))
  valid = (tids != 0).long()
  with torch.no_grad():
    ref = {
      "queries": hf(query_embeds=tq, encoder_hidden_states=ti).last_hidden_state,
      "bidirectional": hf(
        query_embeds=emb(input_ids=tids, query_embeds=tq),
        query_length=Q,
        attention_mask=torch.cat([torch.ones(2, Q, dtype=torch.long), valid], 1),
        encoder_hidden_states=ti,
      ).last_hidden_state,
      "text": hf(query_embeds=emb(input_ids=tids), query_length=0, attention_mask=valid).last_hidden_state,
    }
  ours = {
    "queries": m.apply({"params": params}, query, None, image),
    "bidirectional": m.apply({"params": params}, query, ids, image, mode="bidirectional"),
    "text": m.apply({"params": params}, None, ids, None, mode="unimodal"),
  }
  diffs = {k: float(np.abs(np.asarray(ours[k]) - ref[k].numpy()).max()) for k in ref}
  print("Q-Former max abs diffs:", diffs)
  assert all(d <= TOL for d in diffs.values()), diffs


def _hf_retrieval(torch, transformers):
  vc = dict(
    hidden_size=DV, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40, image_size=32, patch_size=8
  )
  qc = dict(
    hidden_size=D,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=48,
    cross_attention_frequency=2,
    encoder_hidden_size=DV,
    use_qformer_text_input=True,
    vocab_size=99,
    max_position_embeddings=16,
  )
  cfg = transformers.Blip2Config(vision_config=vc, qformer_config=qc, num_query_tokens=Q, image_text_hidden_size=16)
  return _perturbed(transformers.Blip2ForImageTextRetrieval(cfg), torch)


@pytest.mark.slow
def test_stage1_model_matches_hf_blip2_for_image_text_retrieval(tmp_path):
  """Vision features (our ViT), ITC max-over-queries similarities and ITM logits of the whole model."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from vlm.convert import import_hf_blip2_stage1, import_hf_blip2_vision
  from vlm.models import ViT

  torch.manual_seed(0)
  hf = _hf_retrieval(torch, transformers)
  hf.save_pretrained(tmp_path, safe_serialization=True)
  name, kwargs, params = import_hf_blip2_stage1(tmp_path)
  assert name == "blip2_qformer" and kwargs["num_query_tokens"] == Q and kwargs["dec_id"] == 98
  rng = np.random.default_rng(1)
  pixels = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
  _, ids, _ = _inputs(1)
  tp, tids = torch.tensor(pixels), torch.tensor(np.asarray(ids))
  valid = (tids != 0).long()
  with torch.no_grad():
    feats = hf.vision_model(pixel_values=tp).last_hidden_state.numpy()
    itm = hf(pixel_values=tp, input_ids=tids, attention_mask=valid, use_image_text_matching_head=True)
    itc = hf(pixel_values=tp, input_ids=tids, attention_mask=valid)
  images = jnp.asarray(pixels.transpose(0, 2, 3, 1))
  vkw, vparams = import_hf_blip2_vision(tmp_path)
  ours_feats = ViT(**vkw).apply({"params": vparams}, images)[1]["encoded"]
  model = MODELS.get(name)(**kwargs)
  init = nn.unbox(jax.jit(model.init)(jax.random.key(0), images, ids)["params"])
  params = checkpoint.merge_params(init, params)  # HF has no ITG head nor temperature
  zimg, _ = model.apply({"params": params}, images, method=Blip2QFormer.encode_image)
  ztxt, _ = model.apply({"params": params}, ids, method=Blip2QFormer.encode_text)
  logits = model.apply({"params": params}, images, ids, method=Blip2QFormer.itm_logits)
  sim = np.einsum("iqe,te->itq", np.asarray(zimg), np.asarray(ztxt)).max(-1)
  diffs = {
    "vision": np.abs(np.asarray(ours_feats) - feats).max(),
    "itc": np.abs(sim - itc.logits_per_image.numpy()).max(),
    "itm": np.abs(np.asarray(logits) - itm.logits_per_image.numpy()).max(),
  }
  print("BLIP-2 stage-1 max abs diffs:", diffs)
  assert all(d <= TOL for d in diffs.values()), diffs


def test_import_reports_unused_tensors():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from vlm.convert import import_hf_blip2_stage1

  hf = _hf_retrieval(torch, transformers)
  state = dict(hf.state_dict(), **{"qformer.extra.weight": torch.zeros(2)})
  with pytest.raises(ValueError, match="qformer.extra.weight"):
    import_hf_blip2_stage1(state, hf.config)
  state = dict(hf.state_dict())
  del state["qformer.encoder.layer.2.crossattention.attention.key.weight"]
  with pytest.raises(ValueError, match="layer.2.crossattention.attention.key.weight"):
    import_hf_blip2_stage1(state, hf.config)


# -- masks and layout -------------------------------------------------------------------------------


def _run(qformer, query, ids, image, mode, text_mask=None):
  m, params = qformer
  return np.asarray(m.apply({"params": params}, query, ids, image, mode=mode, text_mask=text_mask))


def test_unimodal_mode_keeps_queries_and_text_apart(qformer):
  query, ids, image = _inputs()
  base = _run(qformer, query, ids, image, "unimodal")
  other_text = _run(qformer, query, ids.at[:, 1:4].set(7), image, "unimodal")
  np.testing.assert_array_equal(other_text[:, :Q], base[:, :Q])  # queries do not see the text
  assert not np.allclose(other_text[:, Q:], base[:, Q:])
  other_query = _run(qformer, query + 1.0, ids, image, "unimodal")
  np.testing.assert_array_equal(other_query[:, Q:], base[:, Q:])  # nor the text the queries
  # The query outputs equal a queries-only call, the text outputs a text-only call (the ITC encoders).
  # Different sequence lengths change the float32 summation order (CI saw 1.2e-6), hence 1e-5.
  np.testing.assert_allclose(_run(qformer, query, None, image, "unimodal"), base[:, :Q], atol=1e-5)
  np.testing.assert_allclose(_run(qformer, None, ids, None, "unimodal"), base[:, Q:], atol=1e-5)


def test_multimodal_causal_mode(qformer):
  query, ids, image = _inputs()
  ids = ids.at[0].set(jnp.arange(10, 16))  # no padding in this test
  base = _run(qformer, query, ids, image, "multimodal_causal")
  t = 2
  later = _run(qformer, query, ids.at[:, t + 1 :].set(50), image, "multimodal_causal")
  np.testing.assert_array_equal(later[:, : Q + t + 1], base[:, : Q + t + 1])  # text <= t ignores tokens > t
  assert not np.allclose(later[:, Q + t + 1 :], base[:, Q + t + 1 :])
  # Queries never see the text: their outputs are the queries-only outputs (what stage 2 consumes).
  np.testing.assert_allclose(base[:, :Q], _run(qformer, query, None, image, "unimodal"), atol=1e-6)
  # The text sees the queries (and through them the image).
  assert not np.allclose(_run(qformer, query, ids, image + 1.0, "multimodal_causal")[:, Q:], base[:, Q:])
  # In the bidirectional mode the queries do see the text.
  bi = _run(qformer, query, ids, image, "bidirectional")
  assert not np.allclose(_run(qformer, query, ids.at[:, 3].set(50), image, "bidirectional")[:, :Q], bi[:, :Q])


@pytest.mark.slow
def test_padded_text_is_never_attended(qformer):
  query, ids, image = _inputs()
  for mode in ("unimodal", "bidirectional", "multimodal_causal"):
    base = _run(qformer, query, ids, image, mode)
    # Row 0 is padded from position 4: other ids there (still marked padding) change nothing else.
    mask = np.asarray(ids) != 0
    changed = _run(qformer, query, ids.at[0, 4:].set(9), image, mode, text_mask=jnp.asarray(mask))
    np.testing.assert_allclose(changed[0, : Q + 4], base[0, : Q + 4], atol=1e-6, err_msg=mode)


def test_mask_layout():
  m = np.asarray(qformer_attention_mask(2, jnp.asarray([[True, True, False]]), "multimodal_causal"))[0, 0]
  expected = np.array([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]], bool)
  np.testing.assert_array_equal(m, expected)
  uni = np.asarray(qformer_attention_mask(2, None, "unimodal", num_text=2))[0, 0]
  np.testing.assert_array_equal(uni, np.kron(np.eye(2), np.ones((2, 2))).astype(bool))
  with pytest.raises(ValueError, match="mode"):
    qformer_attention_mask(2, None, "causal")


def test_cross_attention_every_other_layer_and_queries_only_variant(qformer):
  _, params = qformer
  has_cross = [("cross_attn" in params[f"block_{i}"], "norm_cross" in params[f"block_{i}"]) for i in range(4)]
  assert has_cross == [(True, True), (False, False), (True, True), (False, False)]
  assert all({"mlp_query", "mlp_text"} <= set(params[f"block_{i}"]) for i in range(4))
  assert params["block_0"]["cross_attn"]["key"]["kernel"].shape == (DV, 4, D // 4)  # keys from the image width
  # The stage-2 Q-Former: no text side at all.
  m = _qformer(vocab_size=None, cross_attention_frequency=1)
  query, ids, image = _inputs()
  p = nn.unbox(jax.jit(m.init)(jax.random.key(0), query, None, image)["params"])
  assert "word_embed" not in p and all("mlp_text" not in p[f"block_{i}"] for i in range(4))
  assert all("cross_attn" in p[f"block_{i}"] for i in range(4))
  with pytest.raises(ValueError, match="text"):
    m.apply({"params": p}, query, ids, image)
  with pytest.raises(ValueError, match="image"):
    _run(qformer, query, ids, None, "unimodal")


# -- model and objective ----------------------------------------------------------------------------


def _tiny_model(**kw):
  return Blip2QFormer(
    image=dict(width=24, depth=1, mlp_dim=48, num_heads=2, patch_size=8, class_token=True, pool_type="none"),
    qformer=dict(width=D, depth=2, num_heads=4, mlp_dim=48, vocab_size=1001, max_len=16),
    **{**dict(num_query_tokens=4, embed_dim=16, dec_id=1000), **kw},
  )


def _batch(b=16, seed=0):
  rng = np.random.default_rng(seed)
  text = np.concatenate([np.full((b, 1), 3), rng.integers(4, 1000, (b, 6)), np.ones((b, 1)), np.zeros((b, 2))], 1)
  text[1] = text[0]  # a repeated caption
  return {"image": jnp.asarray(rng.uniform(-1, 1, (b, 32, 32, 3)), jnp.float32), "text": jnp.asarray(text, jnp.int32)}


def _sharded(x, mesh):
  return jax.device_put(x, NamedSharding(mesh, P(parallel.data_axes(mesh), *([None] * (np.ndim(x) - 1)))))


@pytest.mark.slow
def test_model_api_shapes():
  m = _tiny_model()
  batch = _batch(2)
  params = nn.unbox(jax.jit(m.init)(jax.random.key(0), batch["image"], batch["text"])["params"])
  zimg, ztxt, out = m.apply({"params": params}, batch["image"], batch["text"])
  assert zimg.shape == (2, 4, 16) and ztxt.shape == (2, 16)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(zimg), axis=-1), 1.0, rtol=1e-5)
  assert out["itm"].shape == (2, 2) and out["itg"].shape == (2, 10, 1001)
  q = m.apply({"params": params}, batch["image"], method=Blip2QFormer.query_features)
  assert q.shape == (2, 4, D)
  z, aux = m.apply({"params": params}, batch["image"], method=Blip2QFormer.encode_image)
  np.testing.assert_allclose(z, zimg, atol=1e-6)
  np.testing.assert_allclose(aux["query_features"], q, atol=1e-6)
  # ITG's first position is [DEC], whatever the first token was.
  a = m.apply({"params": params}, batch["image"], batch["text"], method=Blip2QFormer.itg_logits)
  b = m.apply({"params": params}, batch["image"], batch["text"].at[:, 0].set(5), method=Blip2QFormer.itg_logits)
  np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="dec_id"):
    _tiny_model(dec_id=1001).init(jax.random.key(0), batch["image"], batch["text"])


def test_itc_is_max_over_queries_and_hard_negatives_skip_positives():
  rng = np.random.default_rng(0)
  b = 16
  zimg = rng.normal(size=(b, 3, 8)).astype(np.float32)
  zimg /= np.linalg.norm(zimg, axis=-1, keepdims=True)
  ztxt = rng.normal(size=(b, 8)).astype(np.float32)
  ztxt /= np.linalg.norm(ztxt, axis=-1, keepdims=True)
  sim = 5.0 * np.einsum("iqe,te->itq", zimg, ztxt).max(-1)

  def ce(logits):
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return -np.diag(logp).mean()

  ref = 0.5 * (ce(sim) + ce(sim.T))
  mesh = parallel.make_mesh([("data", -1)])
  local, _ = max_query_itc_loss(jnp.asarray(zimg), jnp.asarray(ztxt), 5.0)
  with jax.set_mesh(mesh):
    dist, m = jax.jit(lambda a, c: max_query_itc_loss(a, c, 5.0, mesh=mesh))(_sharded(zimg, mesh), _sharded(ztxt, mesh))
  np.testing.assert_allclose(local, ref, rtol=1e-5)
  np.testing.assert_allclose(dist, ref, rtol=1e-5)
  np.testing.assert_allclose(m["i2t_accuracy"], np.mean(sim.argmax(1) == np.arange(b)), rtol=1e-6)
  # Negatives: never the pair itself; with a huge scale, the hardest one (found on any device).
  tokens = np.arange(b)[:, None].repeat(3, 1)
  with jax.set_mesh(mesh):
    nt, ni = jax.jit(lambda a, c, t, k: hard_negative_indices(a, c, k, scale=1e4, tokens=t, mesh=mesh))(
      _sharded(zimg, mesh), _sharded(ztxt, mesh), _sharded(tokens, mesh), jax.random.key(0)
    )
  masked = np.where(np.eye(b, dtype=bool), -np.inf, sim)
  np.testing.assert_array_equal(np.asarray(nt), masked.argmax(1))
  np.testing.assert_array_equal(np.asarray(ni), masked.T.argmax(1))


@pytest.mark.slow
def test_objective_on_8_devices_matches_one_and_has_finite_gradients():
  m = _tiny_model(freeze_image=True)
  batch = _batch()
  params = nn.unbox(jax.jit(m.init)(jax.random.key(0), batch["image"][:1], batch["text"][:1])["params"])
  mesh = parallel.make_mesh([("data", -1)])
  assert jax.device_count() == 8
  _, local = jax.jit(lambda p, bt: Blip2Stage1()(m, p, bt, rng=jax.random.key(1), train=False))(params, batch)
  sharded = {k: _sharded(v, mesh) for k, v in batch.items()}

  def loss(p, bt):
    return Blip2Stage1(mesh=mesh)(m, p, bt, rng=jax.random.key(1), train=False)

  with jax.set_mesh(mesh):
    (value, dist), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, sharded)
  for k in ("itc_loss", "itg_loss", "itc/i2t_accuracy", "itg/token_accuracy"):
    np.testing.assert_allclose(dist[k], local[k], rtol=1e-5, err_msg=k)
  assert np.isfinite(float(dist["itm_loss"])) and np.isfinite(float(value))
  flat = traverse_util.flatten_dict(grads, sep="/")
  assert all(np.isfinite(np.asarray(g)).all() for g in flat.values())
  for k in (
    "itm_head/kernel",
    "vision_proj/kernel",
    "text_proj/kernel",
    "lm_transform/kernel",
    "query_tokens",
    "qformer/block_0/cross_attn/key/kernel",
    "qformer/word_embed/embedding",
    "t",
  ):
    assert float(jnp.abs(flat[k]).max()) > 0, k
  assert all(float(jnp.abs(g).max()) == 0 for k, g in flat.items() if k.startswith("img/"))  # frozen ViT


@pytest.mark.slow
def test_tiny_stage1_training_run_and_retrieval_eval(data_dir, tmp_path):
  from configs import blip2_stage1
  from vlm.train import train

  c = blip2_stage1.get_config("demo")
  c.data.data_dir = str(data_dir)
  c.data.builder.update(TINY_DATA)
  c.model["image"].update(width=32, depth=1, mlp_dim=64, num_heads=2)
  c.model["qformer"].update(width=32, depth=2, mlp_dim=64, num_heads=2)
  c.model["num_query_tokens"] = 4
  c.batch_size, c.total_steps, c.log_every, c.checkpoint_every = 16, 3, 1, 1000
  c.schedule.warmup_steps = 1
  c.tensorboard = False
  c.evals.retrieval.every = c.evals.zeroshot.every = 3
  c.evals.retrieval.max_examples = c.evals.zeroshot.max_examples = 64
  out = train(c, tmp_path / "run")
  for k in ("train/itc_loss", "train/itm_loss", "train/itg_loss", "train/loss", "retrieval/i2t_r1", "zeroshot/top1"):
    assert np.isfinite(out[k]), (k, out)
  params = checkpoint.load_params(tmp_path / "run")
  assert params["query_tokens"].shape == (1, 4, 32)
