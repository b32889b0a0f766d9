"""Batched autoregressive decoding (greedy, sampling, beam search) for any model.

The library knows nothing about models: a model supplies a step function and a cache.

Protocol::

  StepFn = Callable[[Cache, jax.Array, jax.Array], tuple[jax.Array, Cache]]
  step_fn(cache, tokens [B, T] int32, index scalar int32) -> (logits [B, T, V] float32, new cache)

- `index` is the position (cache slot) of the first of the T tokens. The prompt is fed once
  ("prefill") with T = P (the prompt length) at index 0; then one token at a time (T = 1) at
  index P, P+1, ... The last generated token is never fed, so the cache needs room for at least
  P + max_new_tokens - 1 positions.
- The cache is any pytree whose EVERY leaf is batch-major: its leading axis is the B batch rows.
  Beam search repeats rows for its beams (`jnp.repeat(x, K, axis=0)`, row b * K + k is beam k of
  example b) and reorders them (`x[idx]`) with `jax.tree.map`, without knowing the model.
  Per-row state (e.g. left-padding offsets) may live in the cache as [B, ...] leaves.
- `step_fn` must return a cache of the same structure, shapes and dtypes as it was given (it is
  the carry of a `jax.lax.while_loop`).
- Every row's prompt has the same length P; a model that needs ragged prompts left-pads them
  and handles the padding inside its step_fn.

All entry points are pure functions that trace under `jax.jit`; the step function and the
method/size/filter arguments are static, e.g.::

  decode = jax.jit(functools.partial(generate, step_fn),
                   static_argnames=("method", "max_new_tokens", "eos_id", "pad_id", "num_beams",
                                    "temperature", "top_k", "top_p"))
  out = decode(cache, prompt, method="beam", max_new_tokens=32, eos_id=1, num_beams=4)

Decoding runs in a `jax.lax.while_loop` that stops as soon as every row (every beam) has
finished, and after at most `max_new_tokens` generated tokens.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

Cache = Any
StepFn = Callable[[Cache, jax.Array, jax.Array], tuple[jax.Array, Cache]]

_NEG_INF = float("-inf")


@flax.struct.dataclass
class DecodeOutput:
  """What every decoding method returns (N = max_new_tokens, K = num_beams).

  tokens: [B, N] int32, the generated tokens, EOS included, pad_id after EOS.
  lengths: [B] int32, number of generated tokens, EOS included (N for a row that never ended).
  scores: [B] float32, sum of the model's log-probs of the generated tokens; for beam search
    the GNMT length-penalised score of the returned hypothesis.
  beams, beam_lengths, beam_scores: beam search only, [B, K, N], [B, K], [B, K]: the K
    hypotheses of each example, best first (beams[:, 0] == tokens). A slot that holds no
    hypothesis scores -inf.
  """

  tokens: jax.Array
  lengths: jax.Array
  scores: jax.Array
  beams: jax.Array | None = None
  beam_lengths: jax.Array | None = None
  beam_scores: jax.Array | None = None


# ----------------------------------------------------------------------------- validation


def _check_prompt(prompt) -> jax.Array:
  prompt = jnp.asarray(prompt)
  if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise ValueError(
      f"prompt must be a 2-D integer array [batch, prompt_len], got shape {prompt.shape} and dtype {prompt.dtype}"
    )
  if prompt.shape[1] < 1:
    raise ValueError("prompt must hold at least one token per row")
  return prompt.astype(jnp.int32)


def _check_at_least_one(name: str, value) -> None:
  if not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be an int >= 1, got {value!r}")


# ----------------------------------------------------------------------------- shared steps


def _next_logp(step_fn: StepFn, cache: Cache, tokens: jax.Array, index: jax.Array) -> tuple[jax.Array, Cache]:
  """Feeds tokens [B, T] at `index`; returns the log-probs [B, V] after the last one, and the cache."""
  logits, cache = step_fn(cache, tokens, jnp.asarray(index, jnp.int32))
  return jax.nn.log_softmax(logits[:, -1].astype(jnp.float32), axis=-1), cache


def _top_k_filter(logits: jax.Array, k: int) -> jax.Array:
  """Sets every logit [..., V] below the k-th largest to -inf (ties with it are kept); k = 0 is off."""
  if k == 0 or k >= logits.shape[-1]:
    return logits
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits < kth, _NEG_INF, logits)


def _top_p_filter(logits: jax.Array, p: float) -> jax.Array:
  """Nucleus filter: keeps the smallest set of most likely tokens whose mass reaches p; 1.0 is off.

  The most likely token is always kept, so a tiny p is greedy (up to exact ties).
  """
  if p >= 1.0:
    return logits
  sorted_logits = jax.lax.top_k(logits, logits.shape[-1])[0]  # descending
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  keep = jnp.cumsum(probs, axis=-1) - probs < p  # the mass before this token is still short of p
  cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < cutoff, _NEG_INF, logits)


# ----------------------------------------------------------------------------- greedy / sampling


class _LoopState(NamedTuple):
  i: jax.Array  # scalar int32, tokens generated so far
  cache: Cache
  tokens: jax.Array  # [B, N] int32
  lengths: jax.Array  # [B] int32
  scores: jax.Array  # [B] float32
  done: jax.Array  # [B] bool, the row has emitted EOS


def _decode(
  step_fn: StepFn,
  cache: Cache,
  prompt,
  select: Callable[[jax.Array, jax.Array], jax.Array],
  max_new_tokens: int,
  eos_id: int,
  pad_id: int,
) -> DecodeOutput:
  """One token per row per step; `select(logp [B, V], i) -> tokens [B]` picks the i-th new token."""
  prompt = _check_prompt(prompt)
  _check_at_least_one("max_new_tokens", max_new_tokens)
  batch, prompt_len = prompt.shape

  def emit(s: _LoopState, logp: jax.Array) -> _LoopState:
    tok = jnp.where(s.done, pad_id, select(logp, s.i)).astype(jnp.int32)
    tok_logp = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
    return _LoopState(
      i=s.i + 1,
      cache=s.cache,
      tokens=s.tokens.at[:, s.i].set(tok),
      lengths=s.lengths + (~s.done).astype(jnp.int32),
      scores=s.scores + jnp.where(s.done, 0.0, tok_logp),
      done=s.done | (tok == eos_id),
    )

  def cond(s: _LoopState) -> jax.Array:
    return (s.i < max_new_tokens) & ~jnp.all(s.done)

  def body(s: _LoopState) -> _LoopState:
    logp, cache = _next_logp(step_fn, s.cache, s.tokens[:, s.i - 1, None], prompt_len + s.i - 1)
    return emit(s._replace(cache=cache), logp)

  logp, cache = _next_logp(step_fn, cache, prompt, 0)
  init = _LoopState(
    i=jnp.zeros((), jnp.int32),
    cache=cache,
    tokens=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
    lengths=jnp.zeros((batch,), jnp.int32),
    scores=jnp.zeros((batch,), jnp.float32),
    done=jnp.zeros((batch,), bool),
  )
  s = jax.lax.while_loop(cond, body, emit(init, logp))
  return DecodeOutput(tokens=s.tokens, lengths=s.lengths, scores=s.scores)


def greedy(
  step_fn: StepFn, cache: Cache, prompt: jax.Array, *, max_new_tokens: int, eos_id: int, pad_id: int = 0
) -> DecodeOutput:
  """Greedy decoding: the most likely token at every step.

  prompt: [B, P] int. Returns DecodeOutput with tokens [B, max_new_tokens].
  """
  return _decode(step_fn, cache, prompt, lambda logp, i: jnp.argmax(logp, axis=-1), max_new_tokens, eos_id, pad_id)


def sample(
  step_fn: StepFn,
  cache: Cache,
  prompt: jax.Array,
  rng: jax.Array,
  *,
  max_new_tokens: int,
  eos_id: int,
  pad_id: int = 0,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
) -> DecodeOutput:
  """Ancestral sampling with temperature, top-k and nucleus (top-p) filtering.

  Logits are divided by `temperature`, then filtered to the top_k most likely tokens (0 = off),
  then to the nucleus of mass top_p (1.0 = off; Holtzman et al. 2020), and one token per row is
  drawn from what is left. temperature = 0 is greedy. Step i uses `jax.random.fold_in(rng, i)`,
  so the same rng gives the same tokens. `scores` are log-probs under the model's own
  distribution (unscaled and unfiltered), comparable with those of the other methods.

  prompt: [B, P] int; rng: a PRNG key. Temperature, top_k and top_p are static Python numbers.
  """
  if not isinstance(top_k, (int, np.integer)) or top_k < 0:
    raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must lie in (0, 1] (1.0 = off), got {top_p!r}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")

  def select(logp: jax.Array, i: jax.Array) -> jax.Array:
    if temperature == 0:
      return jnp.argmax(logp, axis=-1)
    logits = _top_p_filter(_top_k_filter(logp / temperature, top_k), top_p)
    return jax.random.categorical(jax.random.fold_in(rng, i), logits, axis=-1)

  return _decode(step_fn, cache, prompt, select, max_new_tokens, eos_id, pad_id)


# ----------------------------------------------------------------------------- beam search


def _gnmt_length_penalty(length, alpha) -> jax.Array:
  """lp(Y) = ((5 + |Y|) / 6) ** alpha, the length normaliser of GNMT (Wu et al. 2016,
  "Google's Neural Machine Translation System", arXiv:1609.08144, Sec. 7); alpha = 0 gives 1."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


class _BeamState(NamedTuple):
  i: jax.Array  # scalar int32, tokens generated so far
  cache: Cache  # B * K rows, row b * K + k is alive beam k of example b
  alive_seqs: jax.Array  # [B, K, N] int32, no EOS yet
  alive_logp: jax.Array  # [B, K] float32, sum of log-probs, sorted descending
  fin_seqs: jax.Array  # [B, K, N] int32, EOS-terminated, pad after
  fin_lengths: jax.Array  # [B, K] int32
  fin_scores: jax.Array  # [B, K] float32, length-penalised, sorted descending; -inf = empty slot


def _take_beams(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x [B, M, ...], idx [B, K] -> [B, K, ...]: x[b, idx[b, k]]."""
  return jax.vmap(lambda row, i: row[i])(x, idx)


def beam_search(
  step_fn: StepFn,
  cache: Cache,
  prompt: jax.Array,
  *,
  max_new_tokens: int,
  eos_id: int,
  pad_id: int = 0,
  num_beams: int = 4,
  length_penalty: float = 0.6,
) -> DecodeOutput:
  """Beam search with K = num_beams alive beams and K finished hypotheses per example.

  The prompt is prefilled once per example; the cache is then repeated K times. Each step takes
  the top 2K continuations over K x V by summed log-prob. Those ending in EOS *among the top K
  ranks* move to the finished set (the fairseq / Hugging Face rule, which makes num_beams=1 with
  length_penalty=0 exactly greedy), scored sum-log-prob / lp(length incl. EOS) with the GNMT
  penalty lp = ((5 + length) / 6) ** length_penalty (length_penalty = 0: the raw sum); the best
  K that do not end in EOS stay alive.

  Stopping rule (exact, so it never changes the result): an example is done once it holds K
  finished hypotheses and its worst one scores >= the best score any alive beam could still
  reach, i.e. best alive log-prob / max(lp(i + 1), lp(max_new_tokens)) (log-probs only fall as
  a beam grows, and lp is monotone in the length). The loop stops when every example is done,
  or after max_new_tokens tokens.

  Returned: each example's finished hypotheses best first; only if it has fewer than K do its
  alive beams fill the remaining slots, scored by their log-prob / lp(their length). So an
  example that never finishes returns its best alive beam.

  prompt: [B, P] int. Returns DecodeOutput with tokens [B, N] (the best hypothesis), beams
  [B, K, N], beam_lengths and beam_scores [B, K].
  """
  prompt = _check_prompt(prompt)
  _check_at_least_one("max_new_tokens", max_new_tokens)
  _check_at_least_one("num_beams", num_beams)
  batch, prompt_len = prompt.shape
  k, n = num_beams, max_new_tokens

  def expand(s: _BeamState, logp: jax.Array) -> _BeamState:
    """Extends the alive beams by one token given their next-token log-probs [B, K, V]."""
    vocab = logp.shape[-1]
    cand = (s.alive_logp[:, :, None] + logp).reshape(batch, k * vocab)
    top_logp, top_idx = jax.lax.top_k(cand, min(2 * k, k * vocab))  # [B, 2K], descending
    parent, tok = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
    seqs = _take_beams(s.alive_seqs, parent).at[:, :, s.i].set(tok)  # [B, 2K, N]
    is_eos = tok == eos_id
    rank = jnp.arange(top_idx.shape[1])

    new_fin = jnp.where(is_eos & (rank < k), top_logp / _gnmt_length_penalty(s.i + 1, length_penalty), _NEG_INF)
    fin_scores, fin_idx = jax.lax.top_k(jnp.concatenate([s.fin_scores, new_fin], axis=1), k)
    fin_seqs = _take_beams(jnp.concatenate([s.fin_seqs, seqs], axis=1), fin_idx)
    fin_lengths = _take_beams(
      jnp.concatenate([s.fin_lengths, jnp.full(tok.shape, s.i + 1, jnp.int32)], axis=1), fin_idx
    )

    alive_logp, alive_idx = jax.lax.top_k(jnp.where(is_eos, _NEG_INF, top_logp), k)
    rows = (jnp.arange(batch)[:, None] * k + _take_beams(parent, alive_idx)).reshape(-1)
    return _BeamState(
      i=s.i + 1,
      cache=jax.tree.map(lambda x: x[rows], s.cache),
      alive_seqs=_take_beams(seqs, alive_idx),
      alive_logp=alive_logp,
      fin_seqs=fin_seqs,
      fin_lengths=fin_lengths,
      fin_scores=fin_scores,
    )

  def cond(s: _BeamState) -> jax.Array:
    best_lp = jnp.maximum(_gnmt_length_penalty(s.i + 1, length_penalty), _gnmt_length_penalty(n, length_penalty))
    done = s.fin_scores[:, -1] >= s.alive_logp[:, 0] / best_lp
    return (s.i < n) & ~jnp.all(done)

  def body(s: _BeamState) -> _BeamState:
    last = s.alive_seqs[:, :, s.i - 1].reshape(batch * k, 1)
    logp, cache = _next_logp(step_fn, s.cache, last, prompt_len + s.i - 1)
    return expand(s._replace(cache=cache), logp.reshape(batch, k, -1))

  logp, cache = _next_logp(step_fn, cache, prompt, 0)
  init = _BeamState(
    i=jnp.zeros((), jnp.int32),
    cache=jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), cache),
    alive_seqs=jnp.full((batch, k, n), pad_id, jnp.int32),
    # Only beam 0 is live at first, so the first step does not pick the same token K times.
    alive_logp=jnp.tile(jnp.array([0.0] + [_NEG_INF] * (k - 1), jnp.float32), (batch, 1)),
    fin_seqs=jnp.full((batch, k, n), pad_id, jnp.int32),
    fin_lengths=jnp.zeros((batch, k), jnp.int32),
    fin_scores=jnp.full((batch, k), _NEG_INF, jnp.float32),
  )
  first = expand(init, jnp.broadcast_to(logp[:, None], (batch, k, logp.shape[-1])))
  s = jax.lax.while_loop(cond, body, first)

  # Finished hypotheses first (best first), then alive beams, then empty slots.
  alive_scores = s.alive_logp / _gnmt_length_penalty(s.i, length_penalty)
  scores = jnp.concatenate([s.fin_scores, alive_scores], axis=1)
  group = jnp.concatenate([jnp.zeros_like(s.fin_lengths), jnp.ones_like(s.fin_lengths)], axis=1)
  group = jnp.where(scores == _NEG_INF, 2, group)
  order = jnp.lexsort((-scores, group), axis=-1)[:, :k]
  beams = _take_beams(jnp.concatenate([s.fin_seqs, s.alive_seqs], axis=1), order)
  beam_lengths = _take_beams(jnp.concatenate([s.fin_lengths, jnp.full_like(s.fin_lengths, s.i)], axis=1), order)
  beam_scores = _take_beams(scores, order)
  return DecodeOutput(
    tokens=beams[:, 0],
    lengths=beam_lengths[:, 0],
    scores=beam_scores[:, 0],
    beams=beams,
    beam_lengths=beam_lengths,
    beam_scores=beam_scores,
  )


# ----------------------------------------------------------------------------- dispatch


_METHODS = {"greedy": greedy, "sample": sample, "beam": beam_search}


def generate(
  step_fn: StepFn, cache: Cache, prompt: jax.Array, *, method: str = "greedy", rng: jax.Array | None = None, **kw
) -> DecodeOutput:
  """Decodes with `method` in {'greedy', 'sample', 'beam'}; `kw` go to that function.

  rng is required by 'sample' and ignored by the deterministic methods.
  """
  if method not in _METHODS:
    raise ValueError(f"unknown decoding method {method!r}; known: {', '.join(_METHODS)}")
  if method == "sample":
    if rng is None:
      raise ValueError("decoding method 'sample' needs an rng key (rng=jax.random.key(seed))")
    return sample(step_fn, cache, prompt, rng, **kw)
  return _METHODS[method](step_fn, cache, prompt, **kw)


def guided_step_fn(
  run: StepFn,
  cache: Cache,
  batch: int,
  guidance: float,
  second: Callable[[jax.Array], jax.Array] = lambda tokens: tokens,
  plausibility: float = 0.0,
) -> tuple[Cache, StepFn]:
  """Decodes two streams per example and mixes their logits: l_2 + guidance * (l_1 - l_2).

  `run` steps a model whose `cache` holds 2 * batch rows: rows [0, batch) the primary stream
  (e.g. conditioned on the caption, or the full image), rows [batch, 2 * batch) the contrasting
  one (caption-free; the image with a region masked). `second(tokens)` is what the contrasting
  stream is fed (default: the same tokens). Classifier-free guidance (Ho & Salimans 2022) and
  contrastive region guidance (Wan et al. 2024: (1 + a) l_full - a l_masked, guidance = 1 + a)
  are both this. plausibility = b > 0 adds contrastive decoding's adaptive plausibility constraint
  (Li et al. 2023, eq. 2 and sec. 3.2; VCD, Leng et al. 2024, eq. 4): only tokens with
  p_primary >= b * max p_primary may win, so guidance re-ranks what the primary stream finds
  plausible instead of promoting tokens it rules out. Returns (cache, step_fn) for `generate`
  ('greedy' or 'sample'): the cache is regrouped [batch, 2, ...] so that it stays batch-major.
  """
  pair = lambda x: x.reshape(2, batch, *x.shape[1:]).swapaxes(0, 1)  # noqa: E731
  unpair = lambda x: x.swapaxes(0, 1).reshape(2 * x.shape[0], *x.shape[2:])  # noqa: E731

  def step_fn(cache, tokens, index):
    logits, new = run(jax.tree.map(unpair, cache), jnp.concatenate([tokens, second(tokens)]), index)
    primary, contrast = logits[:batch], logits[batch:]
    mixed = contrast + guidance * (primary - contrast)
    if plausibility > 0:
      logp = jax.nn.log_softmax(primary.astype(jnp.float32), axis=-1)
      keep = logp >= jnp.log(plausibility) + logp.max(axis=-1, keepdims=True)
      mixed = jnp.where(keep, mixed, jnp.finfo(mixed.dtype).min)
    return mixed, jax.tree.map(pair, new)

  return jax.tree.map(pair, cache), step_fn


# ----------------------------------------------------------------------------- testing helpers


def init_token_cache(batch: int, max_len: int) -> jax.Array:
  """The cache of `uncached_step_fn`: a token buffer [batch, max_len] int32.

  max_len must be at least prompt_len + max_new_tokens - 1.
  """
  return jnp.zeros((batch, max_len), jnp.int32)


def uncached_step_fn(logits_fn: Callable[[jax.Array], jax.Array]) -> StepFn:
  """A StepFn for a model without a cache, to compare against its cached decoding.

  logits_fn(tokens [B, L]) -> logits [B, L, V] must be causal (position t may only depend on
  tokens <= t), as any autoregressive model is: it sees the whole buffer [B, max_len], whose
  positions past the fed tokens hold zeros. The cache is the token buffer made by
  `init_token_cache`; each step writes the tokens at `index` and recomputes every position.
  """

  def step_fn(cache: jax.Array, tokens: jax.Array, index: jax.Array) -> tuple[jax.Array, jax.Array]:
    cache = jax.lax.dynamic_update_slice(cache, tokens.astype(cache.dtype), (0, index))
    logits = jax.lax.dynamic_slice_in_dim(logits_fn(cache), index, tokens.shape[1], axis=1)
    return logits, cache

  return step_fn
