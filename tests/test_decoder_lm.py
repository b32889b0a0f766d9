"""DecoderLM + its HF importer against small random Llama / Qwen2 / Gemma causal LMs (float32)."""

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vlm import decoding  # noqa: E402
from vlm.convert import import_hf  # noqa: E402
from vlm.models import build_model  # noqa: E402
from vlm.models.decoder import DecoderLM, generate  # noqa: E402
from vlm.nn.attention import MultiHeadAttention  # noqa: E402

TOL = 1e-4
VOCAB, PAD, EOS = 100, 0, 2
NEW = 8
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS)
ARCHS = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **COMMON, rope_parameters={"rope_type": "default", "rope_theta": 500.0}, tie_word_embeddings=False)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON, tie_word_embeddings=False)),
    "gemma": lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(
        **COMMON, head_dim=16, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)),
}


def _make(arch):
  torch.manual_seed(0)
  model = ARCHS[arch]().eval()
  # HF inits norms to 1 (Gemma: 0) and biases to 0: perturb every tensor. Gemma's layers get more
  # noise: against its sqrt(D)-scaled tied embeddings they would otherwise just repeat the last token.
  layer_noise = 0.3 if arch == "gemma" else 0.1
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.add_((0.1 if "embed" in name else layer_noise) * torch.randn_like(p))
  return model


@functools.cache
def _imported(arch, tmp_root):
  model = _make(arch)
  path = f"{tmp_root}/{arch}"
  # Qwen2 is saved sharded (model.safetensors.index.json + shards).
  model.save_pretrained(path, safe_serialization=True, **({"max_shard_size": "20KB"} if arch == "qwen2" else {}))
  name, kwargs, params = import_hf(path)
  assert name == "decoder_lm"
  return model, build_model(name, kwargs), params, kwargs


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("hf_llm"))


def _padded_batch():
  rng = np.random.default_rng(0)
  ids = rng.integers(3, VOCAB, size=(4, 12))
  mask = np.ones_like(ids, dtype=bool)
  mask[1, 7:] = False  # right-padded
  mask[2, :3] = False  # left-padded
  mask[3, :5] = False  # left-padded
  ids[~mask] = PAD
  return ids, mask


@pytest.mark.parametrize("arch", list(ARCHS))
def test_import_and_logits_match_hf(arch, tmp_root):
  hf, model, params, kwargs = _imported(arch, tmp_root)
  if arch == "qwen2":
    import pathlib
    assert (pathlib.Path(tmp_root) / arch / "model.safetensors.index.json").exists()
    assert kwargs["qkv_bias"] and not kwargs["out_bias"]
  if arch == "gemma":
    assert kwargs["tie_embeddings"] and kwargs["embed_scale"] and kwargs["head_dim"] == 16
    assert kwargs["mlp_act"] == "geglu" and "head" not in params
  ids, mask = _padded_batch()
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)),
                position_ids=torch.tensor(positions)).logits.numpy()
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
    out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)),
                      do_sample=False, max_new_tokens=NEW, eos_token_id=EOS, pad_token_id=PAD).numpy()
  new = out[:, ids.shape[1]:]
  return np.pad(new, ((0, 0), (0, NEW - new.shape[1])), constant_values=PAD)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_generation_matches_hf(arch, tmp_root):
  hf, model, params, _ = _imported(arch, tmp_root)
  rng = np.random.default_rng(1)
  ids = rng.integers(3, VOCAB, size=(3, 6))
  mask = np.ones_like(ids, dtype=bool)
  theirs = _hf_greedy(hf, ids, mask)
  ours = jax.jit(functools.partial(generate, model, max_new_tokens=NEW, eos_id=EOS, pad_id=PAD))(
      params, jnp.asarray(ids))
  print(f"{arch}: HF {theirs.tolist()} ours {np.asarray(ours.tokens).tolist()}")
  np.testing.assert_array_equal(np.asarray(ours.tokens), theirs)
  # Left-padded prompts (with the mask) generate what their unpadded rows do.
  lp_ids, lp_mask = ids.copy(), mask.copy()
  lp_ids[1, :2], lp_mask[1, :2] = PAD, False
  lp = generate(model, params, jnp.asarray(lp_ids), max_new_tokens=NEW, eos_id=EOS, pad_id=PAD,
                mask=jnp.asarray(lp_mask))
  alone = generate(model, params, jnp.asarray(lp_ids[1:2, 2:]), max_new_tokens=NEW, eos_id=EOS, pad_id=PAD)
  np.testing.assert_array_equal(np.asarray(lp.tokens)[1], np.asarray(alone.tokens)[0])
  np.testing.assert_array_equal(np.asarray(lp.tokens)[[0, 2]], np.asarray(ours.tokens)[[0, 2]])
  np.testing.assert_array_equal(np.asarray(lp.tokens), _hf_greedy(hf, lp_ids, lp_mask))


def _small_model(**kw):
  model = DecoderLM(**dict(dict(vocab_size=VOCAB, width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                                rope_theta=10000.0), **kw))
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
  return model, params


@pytest.mark.parametrize("kw", [{}, dict(tie_embeddings=True, embed_scale=True, mlp_act="geglu", head_dim=16,
                                         qkv_bias=True)])
def test_cached_decoding_equals_uncached_forward(kw):
  model, params = _small_model(**kw)
  rng = np.random.default_rng(2)
  prompt = jnp.asarray(rng.integers(3, VOCAB, size=(2, 5)), jnp.int32)
  # Prefill + one token at a time: the logits of the full forward.
  toks = jnp.asarray(rng.integers(3, VOCAB, size=(2, 9)), jnp.int32)
  full = model.apply({"params": params}, toks)
  _, var = model.apply({"params": params}, toks[:, :5], 0, 9, method=DecoderLM.decode_step, mutable=["cache"])
  cache = var["cache"]
  logits, var = model.apply({"params": params, "cache": cache}, toks[:, :5], 0, method=DecoderLM.decode_step,
                            mutable=["cache"])
  steps = [logits]
  for i in range(5, 9):
    logits, var = model.apply({"params": params, "cache": var["cache"]}, toks[:, i:i + 1], i,
                              method=DecoderLM.decode_step, mutable=["cache"])
    steps.append(logits)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), np.asarray(full), atol=1e-5, rtol=0)
  # The generic decoder: cached greedy == uncached greedy (full recompute each step).
  cached = generate(model, params, prompt, max_new_tokens=NEW, eos_id=EOS, pad_id=PAD)
  logits_fn = lambda t: model.apply({"params": params}, t)  # noqa: E731
  uncached = decoding.generate(decoding.uncached_step_fn(logits_fn), decoding.init_token_cache(2, 5 + NEW),
                               prompt, max_new_tokens=NEW, eos_id=EOS, pad_id=PAD)
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


def test_remat_and_registry():
  model, params = _small_model(remat_policy="full")
  toks = jnp.ones((2, 4), jnp.int32)
  loss = lambda p: model.apply({"params": p}, toks, train=True).sum()  # noqa: E731
  grads = jax.grad(loss)(params)
  ref, _ = _small_model()
  assert jax.tree.structure(grads) == jax.tree.structure(ref.init(jax.random.PRNGKey(0), toks)["params"])
  assert isinstance(build_model("decoder_lm", dict(vocab_size=10, width=8, depth=1, num_heads=2, mlp_dim=16)),
                    DecoderLM)
