"""The CM3 causal-masked objective's data transform (Aghajanyan et al. 2022, "CM3: A Causal Masked
Multimodal Model of the Internet", sec. 2; CM3Leon, Yu et al. 2023, trains with it).

A document keeps left-to-right next-token training, but n spans are cut out, each replaced in place
by a sentinel `<mask:i>`, and appended at the end after the same sentinel:

    x0 x1 [x2 x3] x4 [x5] x6 <eos>  ->  x0 x1 <mask:0> x4 <mask:1> x6 <mask:0> x2 x3 <mask:1> x5 <eos>

so the model learns to fill a span with both its left and right context in view (the span's
right context comes before it). n is drawn from Poisson(lambda) clipped to [1, max_spans] (the
paper: lambda = 1) unless `num_spans` fixes it; span lengths are uniform in [1, max_span_len];
spans never overlap, never touch each other (a sentinel between two spans would be ambiguous to
restore otherwise) and never cover a protected token (BOS, EOS, and `protected_ids` such as the
begin / end-of-image markers of an early-fusion sequence). `cm3_restore` inverts the transform.

Config (`data.cm3`, with data.conversation tasks=('text',): whole documents, every token trained):
    sentinel_ids   ids of <mask:0>, <mask:1>, ... (as many as the most spans; unused by the text)
    num_spans      None (Poisson) or a fixed count; poisson_lambda, max_spans, max_span_len
    protected_ids  ids a span must not cover
A document that has no room (length) or no maskable tokens left stays as it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def draw_spans(
  maskable: np.ndarray, rng: np.random.Generator, num_spans: int, max_span_len: int
) -> list[tuple[int, int]]:
  """Up to num_spans non-overlapping, non-adjacent [start, end) spans inside runs of maskable [T] (bool).

  Spans are placed one at a time at uniformly drawn free positions with uniform lengths (cut at
  the end of their run); fewer come back when the document has no room for more."""
  free = np.asarray(maskable, bool).copy()
  spans: list[tuple[int, int]] = []
  for _ in range(num_spans):
    starts = np.flatnonzero(free)
    if not starts.size:
      break
    s = int(starts[rng.integers(starts.size)])
    length = int(rng.integers(1, max_span_len + 1))
    e = s
    while e < s + length and e < free.size and free[e]:
      e += 1
    spans.append((s, e))
    free[max(s - 1, 0) : min(e + 1, free.size)] = False  # no overlap, no adjacency
  return sorted(spans)


def cm3_transform(
  ids: Sequence[int], spans: Sequence[tuple[int, int]], sentinel_ids: Sequence[int], eos_id: int | None = None
) -> list[int]:
  """ids with each span i replaced by sentinel i, then every (sentinel i, span i) at the end (before a
  final eos_id if ids ends with it). Spans: sorted, non-overlapping [start, end)."""
  ids = list(ids)
  if len(spans) > len(sentinel_ids):
    raise ValueError(f"data.cm3: {len(spans)} spans but only {len(sentinel_ids)} sentinel_ids")
  tail = [ids.pop()] if eos_id is not None and ids and ids[-1] == eos_id else []
  prefix, moved, pos = [], [], 0
  for i, (s, e) in enumerate(spans):
    if not (pos <= s < e <= len(ids)):
      raise ValueError(f"cm3_transform: spans must be sorted, non-empty and inside the document, got {spans}")
    prefix += ids[pos:s] + [sentinel_ids[i]]
    moved += [sentinel_ids[i]] + ids[s:e]
    pos = e
  return prefix + ids[pos:] + moved + tail


def cm3_restore(ids: Sequence[int], sentinel_ids: Sequence[int], eos_id: int | None = None) -> list[int]:
  """The inverse of cm3_transform: each sentinel in the prefix gets its span back from the end."""
  ids = list(ids)
  tail = [ids.pop()] if eos_id is not None and ids and ids[-1] == eos_id else []
  sentinels = {int(s): i for i, s in enumerate(sentinel_ids)}
  where = [j for j, t in enumerate(ids) if t in sentinels]
  n = len(where) // 2
  if len(where) % 2 or [ids[j] for j in where[:n]] != [ids[j] for j in where[n:]]:
    raise ValueError("cm3_restore: the sentinels do not come in matching prefix / suffix pairs")
  bounds = where[n:] + [len(ids)]
  spans = {ids[where[n + i]]: ids[bounds[i] + 1 : bounds[i + 1]] for i in range(n)}
  out = []
  for t in ids[: where[n]] if n else ids:
    out += spans[t] if t in sentinels else [t]
  return out + tail


def check_cm3_config(cm3: Mapping[str, Any]) -> None:
  """Validates data.cm3; ValueError names the bad key."""
  sentinels = cm3.get("sentinel_ids")
  if (
    isinstance(sentinels, (str, bytes))
    or not sentinels
    or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in sentinels)
  ):
    raise ValueError(f"data.cm3.sentinel_ids: a non-empty tuple of token ids, got {sentinels!r}")
  for key in ("max_spans", "max_span_len"):
    v = cm3.get(key, 1)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f"data.cm3.{key}: a positive int, got {v!r}")
  n = cm3.get("num_spans")
  if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(sentinels)):
    raise ValueError(f"data.cm3.num_spans: None or an int in [1, {len(sentinels)}] (one sentinel each), got {n!r}")
  if int(cm3.get("max_spans", 1)) > len(sentinels):
    raise ValueError(f"data.cm3.max_spans={cm3.get('max_spans')} exceeds the {len(sentinels)} sentinel_ids")
  lam = cm3.get("poisson_lambda", 1.0)
  if not isinstance(lam, (int, float)) or lam <= 0:
    raise ValueError(f"data.cm3.poisson_lambda: a positive number, got {lam!r}")


def apply_cm3(
  tokens: np.ndarray,
  loss_mask: np.ndarray,
  cm3: Mapping[str, Any],
  rng: np.random.Generator,
  *,
  pad_id: int,
  bos_id: int,
  eos_id: int,
) -> tuple[np.ndarray, np.ndarray]:
  """A padded document (tokens, loss_mask [L]) -> its CM3 version, padded to L, loss on every real
  token. The span count shrinks to what fits in L (two sentinels per span)."""
  length = tokens.shape[0]
  real = np.flatnonzero(tokens != pad_id)
  ids = tokens[: int(real[-1]) + 1].tolist() if real.size else []
  sentinels = [int(s) for s in cm3["sentinel_ids"]]
  n = cm3.get("num_spans")
  if n is None:
    n = int(np.clip(rng.poisson(float(cm3.get("poisson_lambda", 1.0))), 1, int(cm3.get("max_spans", 1))))
  n = min(int(n), (length - len(ids)) // 2)
  protected = {pad_id, bos_id, eos_id, *sentinels, *(int(p) for p in cm3.get("protected_ids", ()) or ())}
  maskable = np.array([t not in protected for t in ids], bool)
  spans = draw_spans(maskable, rng, n, int(cm3.get("max_span_len", 1))) if n > 0 else []
  if not spans:
    return tokens, loss_mask
  out = cm3_transform(ids, spans, sentinels, eos_id)
  new_tokens = np.full((length,), pad_id, np.int32)
  new_tokens[: len(out)] = out
  new_loss = np.zeros((length,), np.int32)
  new_loss[: len(out)] = 1
  return new_tokens, new_loss
