"""Decoding library: greedy, sampling and beam search over toy models with known answers."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm import decoding

PAD, EOS = 0, 1
N = 6  # max_new_tokens, unless a test says otherwise
PROMPT = jnp.array([[2, 5], [3, 7], [9, 4]], jnp.int32)

# One jitted decoder for the whole file, as models would use it: the step function and the
# method, sizes and filters are static, so tests that decode one model one way share a compilation.
_generate = jax.jit(
  decoding.generate,
  static_argnums=0,
  static_argnames=("method", "max_new_tokens", "eos_id", "pad_id", "num_beams", "temperature", "top_k", "top_p"),
)


def _decode(step_fn, cache, prompt, method="greedy", max_new_tokens=N, **kw):
  return _generate(step_fn, cache, prompt, method=method, max_new_tokens=max_new_tokens, eos_id=EOS, **kw)


# --------------------------------------------------------------------------- toy models


@functools.cache
def _toy_tables(vocab=11):
  """Random logit tables [3, V, V]: by the current token, the previous one and the prompt's first."""
  return 2.0 * np.random.default_rng(11).standard_normal((3, vocab, vocab), np.float32)


def _toy_logits(cur, prev, first):
  """cur, prev [B, T], first [B] -> logits [B, T, V]; the same arithmetic cached or not."""
  tables = jnp.asarray(_toy_tables())
  return tables[0][cur] + tables[1][prev] + tables[2][first][:, None]


def _toy_cached_step(cache, tokens, index):
  """The toy model with a real cache: buf [B, L + 1] holds position t at column t + 1 (column 0 is
  the zero before position 0) and is written at `index`; first [B] is per-row state."""
  buf = jax.lax.dynamic_update_slice(cache["buf"], tokens, (0, index + 1))
  window = jax.lax.dynamic_slice_in_dim(buf, index, tokens.shape[1] + 1, axis=1)
  first = jnp.where(index == 0, tokens[:, 0], cache["first"])
  return _toy_logits(window[:, 1:], window[:, :-1], first), {"buf": buf, "first": first}


def _toy_logits_fn(x):
  """The toy model over a whole sequence [B, L], without a cache."""
  return _toy_logits(x, jnp.pad(x[:, :-1], ((0, 0), (1, 0))), x[:, 0])


_TOY_UNCACHED_STEP = decoding.uncached_step_fn(_toy_logits_fn)


def _toy(cached: bool):
  """(step_fn, cache) of the toy model, for PROMPT and N new tokens."""
  batch, max_len = PROMPT.shape[0], PROMPT.shape[1] + N
  if cached:
    cache = {"buf": jnp.zeros((batch, max_len + 1), jnp.int32), "first": jnp.zeros((batch,), jnp.int32)}
    return _toy_cached_step, cache
  return _TOY_UNCACHED_STEP, decoding.init_token_cache(batch, max_len)


def _trap_table():
  """Markov log-probs [5, 5]: from the start token 4, greedy takes 2 (p .52), which ends badly;
  3 (p .42) ends well."""
  return np.log(
    [
      [0.20, 0.20, 0.20, 0.20, 0.20],
      [0.20, 0.20, 0.20, 0.20, 0.20],
      [0.01, 0.30, 0.25, 0.24, 0.20],
      [0.01, 0.90, 0.03, 0.03, 0.03],
      [0.01, 0.01, 0.52, 0.42, 0.04],
    ]
  )


@functools.cache
def _table(name):
  if name == "trap":
    return _trap_table()
  vocab, scale = {"random5": (5, 1.5), "random11": (11, 1.0)}[name]
  logits = scale * np.random.default_rng(7).standard_normal((vocab, vocab))
  return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


@functools.cache
def _markov(name):
  """First-order Markov chain: position t's logits are the table's row for token t."""
  return decoding.uncached_step_fn(lambda x: jnp.asarray(_table(name), jnp.float32)[x])


def _countdown(x):
  """Deterministic model: row b emits 2, 3, 4, 2, ... and EOS as its n-th new token, n = x[b, 0]."""
  pos = jnp.arange(x.shape[1])
  target = jnp.where(pos + 1 >= x[:, :1], EOS, 2 + pos % 3)
  return 20.0 * jax.nn.one_hot(target, 6)


_COUNTDOWN_STEP = decoding.uncached_step_fn(_countdown)


# --------------------------------------------------------------------------- brute force


def _brute_force(logp_table, start, n, alpha):
  """All EOS-terminated sequences of <= n tokens after `start`, as (GNMT score, tokens padded to n),
  best first."""
  scores = {}
  for seq in itertools.product(range(logp_table.shape[0]), repeat=n):
    if EOS not in seq:
      continue
    seq = seq[: seq.index(EOS) + 1]
    prev, total = start, 0.0
    for tok in seq:
      total, prev = total + logp_table[prev, tok], tok
    scores[seq] = total / ((5.0 + len(seq)) / 6.0) ** alpha
  return sorted(((score, list(seq) + [PAD] * (n - len(seq))) for seq, score in scores.items()), reverse=True)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
  "method,kw", [("greedy", {}), ("beam", {"num_beams": 3}), ("sample", {"rng": jax.random.key(3), "top_k": 5})]
)
def test_cached_equals_uncached(method, kw):
  cached = _decode(*_toy(True), PROMPT, method, **kw)
  uncached = _decode(*_toy(False), PROMPT, method, **kw)
  np.testing.assert_array_equal(cached.tokens, uncached.tokens)
  np.testing.assert_array_equal(cached.lengths, uncached.lengths)
  np.testing.assert_allclose(cached.scores, uncached.scores, rtol=1e-6)
  assert cached.tokens.shape == (3, N) and cached.tokens.dtype == jnp.int32
  assert cached.lengths.shape == cached.scores.shape == (3,)
  assert len({tuple(row) for row in np.asarray(cached.tokens)}) == 3  # the rows differ


def test_greedy_tokens_and_scores():
  out = _decode(*_toy(True), PROMPT)
  seqs = np.concatenate([PROMPT, out.tokens], axis=1)
  logp = np.asarray(jax.nn.log_softmax(_toy_logits_fn(seqs), axis=-1))
  for b, length in enumerate(np.asarray(out.lengths)):
    pos = np.arange(length) + PROMPT.shape[1] - 1  # the positions that predicted the new tokens
    assert np.argmax(logp[b, pos], axis=-1).tolist() == seqs[b, pos + 1].tolist()
    np.testing.assert_allclose(out.scores[b], logp[b, pos, seqs[b, pos + 1]].sum(), rtol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_escapes_greedy_trap(alpha):
  args = (_markov("trap"), decoding.init_token_cache(1, 5), jnp.array([[4]]))
  best_score, best = _brute_force(_trap_table(), 4, 4, alpha)[0]
  out = _decode(*args, "beam", max_new_tokens=4, num_beams=4, length_penalty=alpha)
  assert out.tokens[0].tolist() == best == [3, EOS, PAD, PAD]
  np.testing.assert_allclose(out.scores[0], best_score, rtol=1e-5)
  assert out.lengths[0] == 2
  assert _decode(*args, max_new_tokens=4).tokens[0].tolist() == [2, EOS, PAD, PAD]


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_exhaustive_beam_matches_brute_force(alpha):
  """With V ** n beams nothing is ever pruned, so the beams are the brute-force ranking."""
  vocab, n = 5, 4
  prompt = jnp.array([[2], [3], [4]])
  out = _decode(
    _markov("random5"),
    decoding.init_token_cache(3, 1 + n),
    prompt,
    "beam",
    max_new_tokens=n,
    num_beams=vocab**n,
    length_penalty=alpha,
  )
  for b in range(3):
    ranked = _brute_force(_table("random5").astype(np.float64), int(prompt[b, 0]), n, alpha)
    assert out.tokens[b].tolist() == ranked[0][1]
    assert out.lengths[b] == out.beam_lengths[b, 0] == ranked[0][1].index(EOS) + 1
    assert [out.beams[b, i].tolist() for i in range(5)] == [seq for _, seq in ranked[:5]]
    np.testing.assert_allclose(out.beam_scores[b, :10], [score for score, _ in ranked[:10]], rtol=1e-5)


@pytest.mark.parametrize("model", ["toy", "trap"])
def test_one_beam_without_length_penalty_is_greedy(model):
  if model == "toy":
    args, n = (*_toy(True), PROMPT), N
  else:
    args, n = (_markov("trap"), decoding.init_token_cache(1, 5), jnp.array([[4]])), 4
  beam = _decode(*args, "beam", max_new_tokens=n, num_beams=1, length_penalty=0.0)
  greedy = _decode(*args, max_new_tokens=n)
  np.testing.assert_array_equal(beam.tokens, greedy.tokens)
  np.testing.assert_array_equal(beam.lengths, greedy.lengths)
  np.testing.assert_allclose(beam.scores, greedy.scores, rtol=1e-6)
  assert beam.beams.shape == (args[2].shape[0], 1, n)


@pytest.mark.parametrize(
  "method,kw", [("greedy", {}), ("sample", {"rng": jax.random.key(0)}), ("beam", {"num_beams": 2})]
)
def test_rows_stop_independently_and_pad_after_eos(method, kw):
  # The n-th new token is EOS: n = 1, 3, and 9 > N (never; beam search returns its best alive beam).
  out = _decode(_COUNTDOWN_STEP, decoding.init_token_cache(3, N), jnp.array([[1], [3], [9]]), method, **kw)
  assert out.tokens.tolist() == [[EOS, PAD, PAD, PAD, PAD, PAD], [2, 3, EOS, PAD, PAD, PAD], [2, 3, 4, 2, 3, 4]]
  assert out.lengths.tolist() == [1, 3, 6]
  # A model that always emits EOS at once.
  out = _decode(_COUNTDOWN_STEP, decoding.init_token_cache(3, N), jnp.array([[1], [1], [1]]), method, **kw)
  assert out.tokens.tolist() == [[EOS] + [PAD] * (N - 1)] * 3
  assert out.lengths.tolist() == [1, 1, 1]


def test_loop_stops_once_every_row_has_finished():
  """jax.debug.callback records the index of every step function execution under jit."""
  indices = []

  def counted(cache, tokens, index):
    jax.debug.callback(lambda i: indices.append(int(i)), index)
    return _COUNTDOWN_STEP(cache, tokens, index)

  run = jax.jit(functools.partial(decoding.greedy, counted, max_new_tokens=N, eos_id=EOS))
  out = run(decoding.init_token_cache(2, N), jnp.array([[1], [3]]))
  jax.effects_barrier()
  assert out.lengths.tolist() == [1, 3]
  assert indices == [0, 1, 2]  # prefill, then the first two new tokens; the third is EOS

  indices.clear()
  out = run(decoding.init_token_cache(2, N), jnp.array([[1], [1]]))
  jax.effects_barrier()
  assert out.lengths.tolist() == [1, 1] and indices == [0]  # prefill only


@pytest.mark.parametrize("kw", [{"temperature": 0.0}, {"top_k": 1}, {"top_p": 1e-6}])
def test_degenerate_sampling_is_greedy(kw):
  greedy = _decode(*_toy(True), PROMPT)
  sampled = _decode(*_toy(True), PROMPT, "sample", rng=jax.random.key(1), **kw)
  np.testing.assert_array_equal(sampled.tokens, greedy.tokens)
  np.testing.assert_allclose(sampled.scores, greedy.scores, rtol=1e-6)


@pytest.mark.parametrize("kw", [{"top_k": 3}, {"top_p": 0.6, "temperature": 1.5}])
def test_samples_stay_inside_the_filtered_set(kw):
  """Many independent draws in one batched call: 64 rows for each of the start tokens 2, 3, 4."""
  table = _table("random11")
  vocab, rows = table.shape[0], 3 * 64
  prompt = jnp.arange(rows)[:, None] % 3 + 2
  out = _decode(
    _markov("random11"), decoding.init_token_cache(rows, 1 + N), prompt, "sample", rng=jax.random.key(0), **kw
  )
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  # allowed[prev, tok]: tok survives the filters after prev.
  order = np.argsort(-table, axis=-1)
  probs = np.exp(np.take_along_axis(table, order, axis=-1) / kw.get("temperature", 1.0))
  probs /= probs.sum(-1, keepdims=True)
  size = np.minimum(kw.get("top_k", vocab), np.sum(np.cumsum(probs, -1) - probs < kw.get("top_p", 1.0), -1))
  allowed = np.zeros((vocab, vocab), bool)
  for prev in range(vocab):
    allowed[prev, order[prev, : size[prev]]] = True
  prev = np.concatenate([np.asarray(prompt), tokens[:, :-1]], axis=1)
  generated = np.arange(N) < lengths[:, None]
  assert allowed[prev, tokens][generated].all()
  assert all(len(set(tokens[start::3, 0].tolist())) > 1 for start in range(3))  # it does sample


def test_sampling_is_reproducible_and_depends_on_rng():
  run = lambda seed: _decode(*_toy(True), PROMPT, "sample", rng=jax.random.key(seed), top_k=5).tokens
  np.testing.assert_array_equal(run(4), run(4))
  assert any((run(seed) != run(4)).any() for seed in range(5))


def test_beam_outputs_are_consistent():
  out = _decode(*_toy(True), PROMPT, "beam", num_beams=3)
  assert out.beams.shape == (3, 3, N) and out.beam_scores.shape == out.beam_lengths.shape == (3, 3)
  np.testing.assert_array_equal(out.beams[:, 0], out.tokens)
  for b in range(3):
    beams, lengths, scores = out.beams[b].tolist(), out.beam_lengths[b].tolist(), out.beam_scores[b].tolist()
    finished = [beam[length - 1] == EOS for beam, length in zip(beams, lengths)]
    assert finished == sorted(finished, reverse=True)  # finished hypotheses first, then alive beams
    for group in (True, False):
      group_scores = [s for s, f in zip(scores, finished) if f == group]
      assert group_scores == sorted(group_scores, reverse=True)
    for beam, length in zip(beams, lengths):
      assert beam[length:] == [PAD] * (N - length) and EOS not in beam[: length - 1]


@pytest.mark.parametrize(
  "kw,match",
  [
    ({"prompt": jnp.array([1, 2])}, "2-D integer"),
    ({"prompt": jnp.ones((2, 3))}, "2-D integer"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"method": "beam", "num_beams": 0}, "num_beams"),
    ({"method": "sample", "rng": jax.random.key(0), "top_p": 0.0}, "top_p"),
    ({"method": "sample", "rng": jax.random.key(0), "top_p": 1.5}, "top_p"),
    ({"method": "sample", "rng": jax.random.key(0), "top_k": -1}, "top_k"),
    ({"method": "sample", "rng": jax.random.key(0), "temperature": -1.0}, "temperature"),
    ({"method": "sample"}, "rng"),
    ({"method": "nucleus"}, "'nucleus'.*greedy, sample, beam"),
  ],
)
def test_validation(kw, match):
  kw = {"prompt": PROMPT, "max_new_tokens": N, "eos_id": EOS, **kw}
  with pytest.raises(ValueError, match=match):
    decoding.generate(*_toy(True), **kw)
