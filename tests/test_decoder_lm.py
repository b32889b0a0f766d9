"""DecoderLM + its HF importer against small random Llama / Qwen2 / Gemma causal LMs (float32): configs
as transformers 5 writes them and as the Hub's 4.x files are (defaults left out), scaled RoPE."""

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from conftest import rewrite_checkpoint, save_hub_style  # noqa: E402
from hf_builders import (  # noqa: E402
  ARCHS,
  COMMON,
  EOS,
  ORIG,
  PAD,
  ROPE,
  VOCAB,
  hub_import,
  imported_lm,
  make_lm,
  padded_batch,
  rope_llama,
)
from vlm import decoding  # noqa: E402
from vlm.convert import import_hf  # noqa: E402
from vlm.convert.hf_config import ConfigError  # noqa: E402
from vlm.models import build_model  # noqa: E402
from vlm.models import predict_fns  # noqa: E402
from vlm.models.decoder import DecoderLM  # noqa: E402
from vlm.nn.attention import MultiHeadAttention  # noqa: E402

TOL = 1e-4
NEW = 8


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("hf_llm"))


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHS))
def test_import_and_logits_match_hf(arch, tmp_root):
  hf, model, params, kwargs = imported_lm(arch, tmp_root)
  if arch == "qwen2":
    import pathlib

    assert (pathlib.Path(tmp_root) / arch / "model.safetensors.index.json").exists()
    assert kwargs["qkv_bias"] and not kwargs["out_bias"]
  if arch == "gemma":
    assert kwargs["tie_embeddings"] and kwargs["embed_scale"] and kwargs["head_dim"] == 16
    assert kwargs["mlp_act"] == "geglu" and "head" not in params
  ids, mask = padded_batch()
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    theirs = hf(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(mask.astype(np.int64)),
      position_ids=torch.tensor(positions),
    ).logits.numpy()
  ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), mask=jnp.asarray(mask)))
  diff = np.abs(ours - theirs)[mask].max()
  print(f"{arch}: max abs logit diff (padded batch, real tokens) {diff:.2e}")
  assert diff <= TOL
  # A padded row's real tokens give the logits of the same tokens unpadded.
  alone = np.asarray(model.apply({"params": params}, jnp.asarray(ids[2:3, 3:])))
  np.testing.assert_allclose(alone[0], ours[2, 3:], atol=TOL, rtol=0)
  # inputs_embeds path = tokens path.
  emb = model.apply({"params": params}, jnp.asarray(ids), method=DecoderLM.embed)
  via_embeds = model.apply({"params": params}, inputs_embeds=emb, mask=jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(via_embeds), ours, atol=1e-6, rtol=0)


def _hf_greedy(hf, ids, mask):
  with torch.no_grad():
    out = hf.generate(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(mask.astype(np.int64)),
      do_sample=False,
      max_new_tokens=NEW,
      eos_token_id=EOS,
      pad_token_id=PAD,
    ).numpy()
  new = out[:, ids.shape[1] :]
  return np.pad(new, ((0, 0), (0, NEW - new.shape[1])), constant_values=PAD)


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_generation_matches_hf(arch, tmp_root):
  hf, model, params, _ = imported_lm(arch, tmp_root)
  rng = np.random.default_rng(1)
  ids = rng.integers(3, VOCAB, size=(3, 6))
  mask = np.ones_like(ids, dtype=bool)
  theirs = _hf_greedy(hf, ids, mask)
  ours = jax.jit(functools.partial(predict_fns(model)["generate"], max_new_tokens=NEW, eos_id=EOS, pad_id=PAD))(
    params, None, jnp.asarray(ids)
  )
  print(f"{arch}: HF {theirs.tolist()} ours {np.asarray(ours.tokens).tolist()}")
  np.testing.assert_array_equal(np.asarray(ours.tokens), theirs)
  # Left-padded prompts (with the mask) generate what their unpadded rows do.
  lp_ids, lp_mask = ids.copy(), mask.copy()
  lp_ids[1, :2], lp_mask[1, :2] = PAD, False
  lp = predict_fns(model)["generate"](
    params, None, jnp.asarray(lp_ids), max_new_tokens=NEW, eos_id=EOS, pad_id=PAD, mask=jnp.asarray(lp_mask)
  )
  alone = predict_fns(model)["generate"](
    params, None, jnp.asarray(lp_ids[1:2, 2:]), max_new_tokens=NEW, eos_id=EOS, pad_id=PAD
  )
  np.testing.assert_array_equal(np.asarray(lp.tokens)[1], np.asarray(alone.tokens)[0])
  np.testing.assert_array_equal(np.asarray(lp.tokens)[[0, 2]], np.asarray(ours.tokens)[[0, 2]])
  np.testing.assert_array_equal(np.asarray(lp.tokens), _hf_greedy(hf, lp_ids, lp_mask))


def _small_model(**kw):
  model = DecoderLM(
    **dict(dict(vocab_size=VOCAB, width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64, rope_theta=10000.0), **kw)
  )
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
  return model, params


@pytest.mark.parametrize(
  "kw",
  [
    {},
    dict(tie_embeddings=True, embed_scale=True, mlp_act="geglu", head_dim=16, qkv_bias=True),
    dict(
      rope_scaling=dict(
        rope_type="yarn",
        factor=4.0,
        original_max_position_embeddings=4,
        beta_fast=32.0,
        beta_slow=1.0,
        truncate=True,
        attention_factor=1.2,
      )
    ),
  ],
)
@pytest.mark.slow
def test_cached_decoding_equals_uncached_forward(kw):
  model, params = _small_model(**kw)
  rng = np.random.default_rng(2)
  prompt = jnp.asarray(rng.integers(3, VOCAB, size=(2, 5)), jnp.int32)
  # Prefill + one token at a time: the logits of the full forward.
  toks = jnp.asarray(rng.integers(3, VOCAB, size=(2, 9)), jnp.int32)
  # Jitted (op by op, every apply would compile each of its ops); positions are traced, as in generate.
  full = jax.jit(model.apply)({"params": params}, toks)
  _, var = jax.jit(lambda p, t: model.apply({"params": p}, t, 0, 9, method=DecoderLM.decode_step, mutable=["cache"]))(
    params, toks[:, :5]
  )
  step = jax.jit(
    lambda p, c, t, i: model.apply({"params": p, "cache": c}, t, i, method=DecoderLM.decode_step, mutable=["cache"])
  )
  logits, var = step(params, var["cache"], toks[:, :5], 0)
  steps = [logits]
  for i in range(5, 9):
    logits, var = step(params, var["cache"], toks[:, i : i + 1], i)
    steps.append(logits)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), np.asarray(full), atol=1e-5, rtol=0)
  # The generic decoder: cached greedy == uncached greedy (full recompute each step).
  cached = jax.jit(lambda p, t: predict_fns(model)["generate"](p, None, t, max_new_tokens=NEW, eos_id=EOS, pad_id=PAD))(
    params, prompt
  )
  logits_fn = jax.jit(lambda t: model.apply({"params": params}, t))
  uncached = decoding.generate(
    decoding.uncached_step_fn(logits_fn),
    decoding.init_token_cache(2, 5 + NEW),
    prompt,
    max_new_tokens=NEW,
    eos_id=EOS,
    pad_id=PAD,
  )
  np.testing.assert_array_equal(np.asarray(cached.tokens), np.asarray(uncached.tokens))
  np.testing.assert_allclose(np.asarray(cached.scores), np.asarray(uncached.scores), atol=1e-4, rtol=1e-4)


def test_rope_off_keeps_attention_unchanged():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 16))
  mha = MultiHeadAttention(num_heads=4)
  params = mha.init(jax.random.PRNGKey(1), x)
  rope = MultiHeadAttention(num_heads=4, rope_theta=10000.0)
  assert jax.tree.structure(rope.init(jax.random.PRNGKey(1), x)) == jax.tree.structure(params)
  y0 = mha.apply(params, x, causal=True)
  y1 = rope.apply(params, x, causal=True)
  assert not np.allclose(np.asarray(y0), np.asarray(y1))
  # RoPE is relative: shifting every position leaves the output unchanged.
  y2 = rope.apply(params, x, causal=True, positions=jnp.arange(5) + 7)
  np.testing.assert_allclose(np.asarray(y1), np.asarray(y2), atol=1e-5)


@pytest.mark.slow
def test_remat_and_registry():
  model, params = _small_model(remat_policy="full")
  toks = jnp.ones((2, 4), jnp.int32)
  loss = lambda p: model.apply({"params": p}, toks, train=True).sum()  # noqa: E731
  grads = jax.grad(loss)(params)
  ref, _ = _small_model()
  assert jax.tree.structure(grads) == jax.tree.structure(ref.init(jax.random.PRNGKey(0), toks)["params"])
  assert isinstance(
    build_model("decoder_lm", dict(vocab_size=10, width=8, depth=1, num_heads=2, mlp_dim=16)), DecoderLM
  )


# ------------------------------------------------------------------ configs as the Hub has them


def _max_diff(hf, model, params, ids, mask=None):
  """max |logits diff| over real tokens, HF given the positions vlm derives from the mask."""
  mask = np.ones_like(ids, dtype=bool) if mask is None else mask
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    theirs = hf(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(mask.astype(np.int64)),
      position_ids=torch.tensor(positions),
    ).logits.numpy()
  ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), mask=jnp.asarray(mask)))
  return float(np.abs(ours - theirs)[mask].max())


def _set(**kv):
  return lambda cfg: cfg.update(kv)


# Per case: the kwargs a wrong reading would get wrong, and keys the file leaves out. A top-level 4.x file
# drops the keys equal to PretrainedConfig's defaults that the class shares (Gemma's tie_word_embeddings)
# and spells rope as rope_theta / rope_scaling; nested ones drop every class default (tests/test_hf_llava.py).
HUB = {
  # Llama: rms_norm_eps 1e-6 (the class default, left out), theta 500 (written, 4.x spelling rope_theta).
  "llama": (
    lambda: transformers.LlamaForCausalLM(
      transformers.LlamaConfig(**COMMON, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    ),
    None,
    dict(norm_eps=1e-6, rope_theta=500.0, mlp_act="swiglu", tie_embeddings=False),
    ("rope_parameters",),
  ),
  # Qwen2: theta 10000 and eps 1e-6 left out; q/k/v biases without a config key.
  "qwen2": (
    lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON, rms_norm_eps=1e-5)),
    None,
    dict(norm_eps=1e-5, rope_theta=10000.0, qkv_bias=True, out_bias=False),
    ("rope_parameters",),
  ),
  # Gemma with only hidden_act (no hidden_activation key), a non-default one: transformers 5 runs silu.
  "gemma_hidden_act": (
    lambda: transformers.GemmaForCausalLM(
      transformers.GemmaConfig(
        **COMMON, head_dim=16, hidden_act="silu", rope_parameters={"rope_type": "default", "rope_theta": 300.0}
      )
    ),
    None,
    dict(mlp_act="swiglu", tie_embeddings=True, rope_theta=300.0, norm_eps=1e-6),
    ("hidden_activation", "tie_word_embeddings", "rope_parameters"),
  ),
  # Gemma with the legacy hidden_act 'gelu' of the official releases: the tanh approximation.
  "gemma_legacy_gelu": (
    lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(**COMMON, head_dim=16)),
    _set(hidden_act="gelu"),
    dict(mlp_act="geglu", tie_embeddings=True),
    ("hidden_activation", "tie_word_embeddings"),
  ),
}


@pytest.mark.parametrize("case", list(HUB))
def test_hub_style_config_imports_exactly(case, tmp_path):
  factory, edit, expect, absent = HUB[case]
  hf, model, params, kwargs, file_cfg = hub_import(case.split("_")[0], factory, tmp_path / case, edit)
  assert not set(absent) & set(file_cfg), "the file should leave these to the class defaults"
  assert {k: kwargs[k] for k in expect} == expect
  ids, mask = padded_batch()
  diff = _max_diff(hf, model, params, ids, mask)
  print(f"{case}: hub-style config {sorted(file_cfg)}; max abs logit diff {diff:.2e}")
  assert diff <= TOL


# ------------------------------------------------------------------ scaled RoPE


@pytest.mark.slow
@pytest.mark.parametrize("rope_type", list(ROPE))
def test_scaled_rope_matches_hf(rope_type, tmp_path):
  """Each rope_type, from a 4.x-style file (rope_theta + rope_scaling), on 40 tokens (> ORIG): HF's logits;
  the same params without the scaling are far off."""
  hf, model, params, kwargs, file_cfg = hub_import("llama", rope_llama(rope_type), tmp_path / rope_type)
  assert file_cfg["rope_scaling"]["rope_type"] == ROPE[rope_type]["rope_type"] and "rope_parameters" not in file_cfg
  assert kwargs["rope_scaling"]["rope_type"] == ROPE[rope_type]["rope_type"]
  ids = np.random.default_rng(3).integers(3, VOCAB, size=(2, 40))
  mask = np.ones_like(ids, dtype=bool)
  mask[1, :5] = False  # left padding: the dynamic length is the longest row's
  diff = _max_diff(hf, model, params, ids, mask)
  unscaled = DecoderLM(**{k: v for k, v in kwargs.items() if k != "rope_scaling"})
  off = _max_diff(hf, unscaled, params, ids, mask)
  print(f"{rope_type}: {kwargs['rope_scaling']}: max abs logit diff {diff:.2e}; without the scaling {off:.2e}")
  assert diff <= TOL and off > 100 * TOL


@pytest.mark.slow
def test_dynamic_rope_cached_decoding_matches_hf_generate(tmp_path):
  """NTK-dynamic under KV caching: each step's frequencies follow its own length (as HF's generate from a
  fresh model), so our cached logits equal HF's at every step while the prompt + new tokens cross
  max_position_embeddings; one uncached forward over the whole sequence differs (HF's too)."""
  hf, model, params, _, _ = hub_import("llama", rope_llama("dynamic"), tmp_path / "dyn")
  rng = np.random.default_rng(1)
  ids = rng.integers(3, VOCAB, size=(2, 12))
  mask = np.ones_like(ids, dtype=bool)
  mask[1, :3] = False
  ids[~mask] = PAD
  new, p = 10, ids.shape[1]
  with torch.no_grad():
    out = hf.generate(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(mask.astype(np.int64)),
      do_sample=False,
      max_new_tokens=new,
      min_new_tokens=new,
      pad_token_id=PAD,
      output_logits=True,
      return_dict_in_generate=True,
    )
  seq, theirs = out.sequences.numpy(), np.stack([x.numpy() for x in out.logits], 1)
  apply = functools.partial(model.apply, method=DecoderLM.decode_step, mutable=["cache"])
  _, var = apply({"params": params}, jnp.asarray(ids), 0, p + new, jnp.asarray(mask))
  logits, var = apply({"params": params, "cache": var["cache"]}, jnp.asarray(ids), 0)
  steps = [np.asarray(logits)[:, -1]]
  for i in range(new - 1):  # fed HF's tokens
    logits, var = apply({"params": params, "cache": var["cache"]}, jnp.asarray(seq[:, p + i : p + i + 1]), p + i)
    steps.append(np.asarray(logits)[:, -1])
  diff = float(np.abs(np.stack(steps, 1) - theirs).max())
  full_mask = np.concatenate([mask, np.ones((2, new), bool)], 1)
  full = np.asarray(model.apply({"params": params}, jnp.asarray(seq), mask=jnp.asarray(full_mask)))[:, p - 1 : -1]
  print(
    f"dynamic, cached decoding {p} -> {p + new} tokens (max_position_embeddings {ORIG}): max abs logit diff "
    f"{diff:.2e}; one uncached forward differs by {np.abs(full - theirs).max():.2e}"
  )
  assert diff <= TOL and np.abs(full - theirs).max() > 100 * TOL


def test_unsupported_config_values_raise_naming_them(tmp_path):
  src = str(tmp_path / "src")
  save_hub_style(make_lm("llama"), src)

  def raises(name, match, **config):
    with pytest.raises(ConfigError, match=match):
      import_hf(rewrite_checkpoint(src, tmp_path / name, config=config))

  raises(
    "longrope",
    r"config.json: rope_scaling = .*rope_type 'longrope' is not supported by vlm",
    rope_scaling=dict(rope_type="longrope", short_factor=[1.0] * 4, long_factor=[2.0] * 4),
  )
  raises("act", r"config.json: hidden_act = 'gelu': not supported", hidden_act="gelu")
  raises("no_factor", r"rope_scaling = .*needs 'factor'", rope_scaling=dict(rope_type="linear"))
  raises(
    "gemma",
    r"hidden_activation = 'silu': disagrees with hidden_act = 'gelu'",
    model_type="gemma",
    head_dim=8,
    hidden_act="gelu",
    hidden_activation="silu",
  )
  raises(
    "qwen2",
    r"use_sliding_window = True: sliding-window attention",
    model_type="qwen2",
    use_sliding_window=True,
    sliding_window=4,
    max_window_layers=0,
  )


# ------------------------------------------------------------------ layer scan (scan_layers=True)

SCAN_KW = dict(vocab_size=VOCAB, width=32, depth=3, num_heads=4, num_kv_heads=2, mlp_dim=64)


def _stack(params):
  from vlm.convert import stack_encoder_blocks

  return stack_encoder_blocks(jax.tree.map(np.asarray, params), names=("decoder",))


@functools.cache
def _scan_pair():
  """(unrolled model, scanned model, unrolled params, the same params stacked) for SCAN_KW."""
  from flax import linen as nn

  model, scanned = DecoderLM(**SCAN_KW), DecoderLM(**SCAN_KW, scan_layers=True)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
  params = jax.tree.map(
    lambda x: np.asarray(x) + 0.05 * np.random.default_rng(x.size).normal(size=x.shape).astype(np.float32), params
  )  # norms away from 1
  return model, scanned, params, _stack(params)


def test_scan_layers_same_params_logits_and_gradients():
  from flax import linen as nn

  model, scanned, params, stacked = _scan_pair()
  init = jax.eval_shape(scanned.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
  q = init["decoder"]["layers"]["attn"]["query"]["kernel"]
  assert q.names == ("layers", "embed", "heads", "kv") and q.value.shape == (3, 32, 4, 8)
  assert jax.tree.map(np.shape, stacked) == jax.tree.map(np.shape, nn.meta.unbox(init))
  ids, mask = padded_batch()
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)

  def loss(m):
    def f(p):
      logits = m.apply({"params": p}, ids, mask=mask)
      return (logits**2).mean(), logits

    return jax.jit(jax.value_and_grad(f, has_aux=True))

  (_, ref), g_ref = loss(model)(params)
  (_, ours), g_ours = loss(scanned)(stacked)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-5, rtol=0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), _stack(g_ref), g_ours)


def test_scan_layers_with_remat_and_dropout_trains():
  import optax

  kw = dict(SCAN_KW, dropout=0.1, scan_layers=True)
  remat, plain = DecoderLM(**kw, remat_policy="dots"), DecoderLM(**kw)
  toks = jnp.asarray(np.random.default_rng(0).integers(3, VOCAB, size=(4, 10)), jnp.int32)
  params = _scan_pair()[3]
  tx = optax.adamw(3e-3)

  def loss(model, p, rng):
    logits = model.apply({"params": p}, toks[:, :-1], train=True, rngs={"dropout": rng})
    return optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:]).mean()

  @jax.jit
  def step(p, opt, rng):
    value, grads = jax.value_and_grad(functools.partial(loss, remat))(p, rng)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), opt, value, grads

  rng = jax.random.PRNGKey(1)
  opt, losses = tx.init(params), []
  # Remat inside the scan changes nothing but memory (the same dropout masks: rngs split per layer).
  l0, g0 = jax.jit(jax.value_and_grad(functools.partial(loss, plain)))(params, rng)
  for i in range(12):
    new, opt, value, grads = step(params, opt, jax.random.fold_in(rng, i) if i else rng)
    if i == 0:
      np.testing.assert_allclose(value, l0, rtol=1e-6)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads, g0)
    params = new
    losses.append(float(value))
  print(f"scan + remat 'dots' + dropout: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
  assert losses[-1] < losses[0] - 0.5


@pytest.mark.slow
def test_scan_layers_cached_greedy_and_beam_equal_unrolled():
  model, scanned, params, stacked = _scan_pair()
  rng = np.random.default_rng(4)
  prompt = rng.integers(3, VOCAB, size=(3, 5))
  mask = np.ones_like(prompt, dtype=bool)
  prompt[1, :2], mask[1, :2] = PAD, False  # left-padded
  prompt, mask = jnp.asarray(prompt, jnp.int32), jnp.asarray(mask)
  from vlm.models.generation import init_cache

  cache = init_cache(scanned, stacked, prompt, 5 + NEW, mask)
  # Batch-major: the stacked layer axis comes second.
  assert cache["decoder"]["layers"]["attn"]["key"].shape == (3, 3, 5 + NEW, 2, 8)
  assert cache["valid"].shape == (3, 5 + NEW)
  for method, kw in (("greedy", {}), ("beam", dict(num_beams=3))):
    run = jax.jit(
      lambda m, p, method=method, kw=kw: predict_fns(m)["generate"](
        p, None, prompt, max_new_tokens=NEW, eos_id=EOS, pad_id=PAD, mask=mask, method=method, **kw
      ),
      static_argnums=0,
    )
    ours, ref = run(scanned, stacked), run(model, params)
    print(f"{method}: scanned {np.asarray(ours.tokens).tolist()}")
    np.testing.assert_array_equal(np.asarray(ours.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(ours.scores), np.asarray(ref.scores), atol=1e-4, rtol=1e-4)


def test_llama_imported_with_scan_matches_hf_and_loads_into_scanned_init(tmp_root):
  from vlm import checkpoint
  from vlm.convert import stack_encoder_blocks

  hf, _, params, _ = imported_lm("llama", tmp_root)
  name, kwargs, scanned_params = import_hf(f"{tmp_root}/llama", scan=True)
  assert name == "decoder_lm" and kwargs["scan_layers"] is True
  assert set(scanned_params["decoder"]) == {"layers"}
  assert scanned_params["decoder"]["layers"]["attn"]["query"]["kernel"].shape[0] == kwargs["depth"]
  jax.tree.map(np.testing.assert_array_equal, scanned_params, stack_encoder_blocks(params, names=("decoder",)))
  model = build_model(name, kwargs)
  ids, mask = padded_batch()
  diff = _max_diff(hf, model, scanned_params, ids, mask)
  print(f"llama imported with scan=True: max abs logit diff {diff:.2e}")
  assert diff <= TOL
  # An HF dir as config.init.path of a scan_layers=True model: load_params imports it unrolled and
  # merge_params restacks it into the scanned layout (and back into an unrolled model).
  from flax import linen as nn

  target = jax.tree.map(
    np.zeros_like,
    jax.tree.map(np.asarray, nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])),
  )
  loaded = checkpoint.load_params(f"{tmp_root}/llama")
  merged = checkpoint.merge_params(target, loaded)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), merged, scanned_params)
  back = checkpoint.merge_params(jax.tree.map(np.zeros_like, params), scanned_params, {"": ""})
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), back, params)
  deeper = dict(
    target,
    decoder={"layers": jax.tree.map(lambda x: np.zeros((3,) + x.shape[1:], x.dtype), target["decoder"]["layers"])},
  )
  with pytest.raises(ValueError, match=r"decoder/layers/attn/query/kernel: shape \(3, .*restacked"):
    checkpoint.merge_params(deeper, loaded, {"": ""})


def test_scan_layers_refused_where_blocks_are_interleaved():
  from vlm.models.flamingo import Flamingo, FlamingoLM

  toks = jnp.zeros((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="FlamingoLM: scan_layers=True is not supported"):
    FlamingoLM(**SCAN_KW, scan_layers=True).init(jax.random.PRNGKey(0), toks)
  with pytest.raises(ValueError, match="Flamingo: lm_config.scan_layers=True is not supported"):
    Flamingo(lm_config=dict(SCAN_KW, scan_layers=True), vision_config={}).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), toks
    )
