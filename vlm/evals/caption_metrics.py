"""Captioning metrics: BLEU-1..n and CIDEr-D, computed as coco-caption (pycocoevalcap) computes them.

Pure Python + numpy, no Java. On the same tokens the scores equal those of pycocoevalcap's `Bleu` and
`Cider` scorers (tests/test_caption_metrics.py checks parity), so they compare with published COCO
numbers up to tokenization: coco-caption runs the Stanford PTBTokenizer (Java) first, and `tokenize`
here approximates it.

Every function takes one candidate caption per image and a list of reference captions per image, as
raw strings (tokenized with `tokenize`) or, with `tokenized=True`, as space-joined tokens.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

# coco-caption drops these PTB tokens after tokenizing: '' ' `` ` -LRB- -RRB- -LCB- -RCB- . ? ! , : - -- ... ;
# As characters: quotes (PTB writes " as `` and ''; typographic quotes too), ( ) { }, . ? ! , : ; and
# dashes. PTB keeps a period between digits ("3.5") and a hyphen inside a word ("t-shirt") within one
# token, so those stay.
_PUNCT = re.compile(r"""["'`\u2018\u2019\u201c\u201d(){}?!,:;]|(?<!\d)\.|\.(?!\d)|(?<!\w)-|-(?!\w)""")

# pycocoevalcap.bleu's smoothing: precision (correct + tiny) / (guess + small), so no match gives ~1e-15 / guess
# (BLEU ~0, never a 0 ** x or 0 / 0), a candidate without k-grams 1e-6.
_BLEU_TINY, _BLEU_SMALL = 1e-15, 1e-9


def tokenize(text: str) -> list[str]:
  """Lowercases and splits on whitespace after replacing punctuation with spaces.

  Approximates coco-caption's PTBTokenizer + punctuation removal without Java. Differences: PTB splits
  clitics ("man's" -> "man 's", "don't" -> "do n't") where this gives "man s" / "don t" (the same number
  of tokens), keeps abbreviations ("u.s.") whole, and splits symbols such as $ or & off words.
  """
  return _PUNCT.sub(" ", text.lower()).split()


def _prepare(
  candidates: Sequence[str], references: Sequence[Sequence[str]], tokenized: bool
) -> tuple[list[list[str]], list[list[list[str]]]]:
  """Checks the shapes of the inputs and splits every caption into tokens."""
  if isinstance(candidates, str):
    raise TypeError("candidates must be a sequence of captions (one per image), not a single string")
  if len(candidates) != len(references):
    raise ValueError(
      f"got {len(candidates)} candidates but {len(references)} reference lists; "
      "need one list of references per candidate"
    )
  if not candidates:
    raise ValueError("no captions to score: candidates and references are empty")
  split = str.split if tokenized else tokenize
  cands = []
  for i, cand in enumerate(candidates):
    if not isinstance(cand, str):
      raise TypeError(f"candidates[{i}] is a {type(cand).__name__}, expected a string")
    cands.append(split(cand))
  refs = []
  for i, image_refs in enumerate(references):
    if isinstance(image_refs, str):
      raise TypeError(f"references[{i}] is a string; give a list of reference captions per image")
    if len(image_refs) == 0:
      raise ValueError(f"image {i} has no reference captions")
    refs.append([split(r) for r in image_refs])
  return cands, refs


def _ngrams(tokens: list[str], n: int) -> list[Counter]:
  """counts[k][ngram]: occurrences of each (k+1)-gram of `tokens`, for k < n."""
  return [Counter(tuple(tokens[i : i + k]) for i in range(len(tokens) - k + 1)) for k in range(1, n + 1)]


def _check_n(n: int) -> None:
  if n < 1:
    raise ValueError(f"n must be at least 1, got {n}")


def _bleu(cands: list[list[str]], refs: list[list[list[str]]], n: int) -> list[float]:
  """Corpus BLEU-1..n of pycocoevalcap (BleuScorer, option 'closest') on tokenized captions."""
  correct, guess = [0] * n, [0] * n
  test_len = ref_len = 0
  for cand, image_refs in zip(cands, refs):
    max_ref = [Counter() for _ in range(n)]  # clip counts: an n-gram's most occurrences in one reference
    for ref in image_refs:
      for k, counts in enumerate(_ngrams(ref, n)):
        max_ref[k] |= counts
    for k, counts in enumerate(_ngrams(cand, n)):
      correct[k] += sum(min(c, max_ref[k][g]) for g, c in counts.items())
      guess[k] += max(0, len(cand) - k)
    test_len += len(cand)
    # 'closest' effective reference length; ties go to the shorter reference.
    ref_len += min((abs(len(r) - len(cand)), len(r)) for r in image_refs)[1]
  scores, prod = [], 1.0
  for k in range(n):  # BLEU-k: geometric mean of the smoothed 1..k-gram precisions
    prod *= (correct[k] + _BLEU_TINY) / (guess[k] + _BLEU_SMALL)
    scores.append(prod ** (1.0 / (k + 1)))
  ratio = (test_len + _BLEU_TINY) / (ref_len + _BLEU_SMALL)
  brevity = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
  return [s * brevity for s in scores]


def _cider(cands: list[list[str]], refs: list[list[list[str]]], n: int, sigma: float) -> np.ndarray:
  """Per-image CIDEr-D of pycocoevalcap (CiderScorer) on tokenized captions."""
  ref_counts = [[_ngrams(r, n) for r in image_refs] for image_refs in refs]
  doc_freq = Counter()  # number of images whose references contain the n-gram
  for image_counts in ref_counts:
    doc_freq.update({g for counts in image_counts for c in counts for g in c})
  log_images = math.log(len(cands))

  def tfidf(counts: list[Counter]) -> tuple[list[dict], list[float]]:
    vec = [{g: tf * (log_images - math.log(max(1.0, doc_freq[g]))) for g, tf in c.items()} for c in counts]
    return vec, [math.sqrt(sum(x * x for x in v.values())) for v in vec]

  scores = np.zeros(len(cands))
  for i, (cand, image_counts, image_refs) in enumerate(zip(cands, ref_counts, refs)):
    vec, norm = tfidf(_ngrams(cand, n))
    total = np.zeros(n)
    for counts, ref in zip(image_counts, image_refs):
      vec_ref, norm_ref = tfidf(counts)
      # pycocoevalcap measures length in bigrams (words - 1, 0 for an empty caption): the same difference
      # unless one caption is empty, and then the similarity is 0 anyway.
      penalty = math.exp(-((len(cand) - len(ref)) ** 2) / (2 * sigma**2))
      for k in range(n):
        # Cosine similarity with each candidate weight clipped to the reference's (CIDEr-D).
        sim = sum(min(x, vec_ref[k].get(g, 0.0)) * vec_ref[k].get(g, 0.0) for g, x in vec[k].items())
        if norm[k] != 0 and norm_ref[k] != 0:
          sim /= norm[k] * norm_ref[k]
        total[k] += sim * penalty
    scores[i] = np.mean(total) / len(image_counts) * 10.0
  return scores


def bleu(
  candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, *, tokenized: bool = False
) -> list[float]:
  """Corpus-level [BLEU-1, ..., BLEU-n] as pycocoevalcap.bleu computes it.

  Clipped n-gram counts and candidate lengths are summed over the corpus; the effective reference
  length of an image is that of its reference closest in length to the candidate; zero precisions are
  smoothed with coco-caption's 1e-15 / 1e-9 constants; one brevity penalty for the whole corpus.
  """
  _check_n(n)
  return _bleu(*_prepare(candidates, references, tokenized), n)


def cider(
  candidates: Sequence[str],
  references: Sequence[Sequence[str]],
  n: int = 4,
  sigma: float = 6.0,
  *,
  tokenized: bool = False,
) -> tuple[float, np.ndarray]:
  """CIDEr-D as pycocoevalcap.cider computes it: (corpus mean, per-image scores).

  Per n-gram order: tf-idf vectors with document frequencies over the references of the whole corpus
  (idf = log(#images) - log(max(1, df))), cosine similarity with the candidate's weights clipped to the
  reference's, times a Gaussian penalty on the length difference (sigma). Averaged over orders 1..n and
  the references of the image, times 10. The idf depends on the corpus: a one-image corpus scores 0.
  """
  _check_n(n)
  if sigma <= 0:
    raise ValueError(f"sigma must be positive, got {sigma}")
  scores = _cider(*_prepare(candidates, references, tokenized), n, sigma)
  return float(np.mean(scores)), scores


def caption_scores(
  candidates: Sequence[str], references: Sequence[Sequence[str]], *, tokenized: bool = False
) -> dict[str, float]:
  """{'bleu1', 'bleu4', 'cider'} of a captioning evaluation, tokenizing the captions once."""
  cands, refs = _prepare(candidates, references, tokenized)
  bleus = _bleu(cands, refs, 4)
  return {"bleu1": bleus[0], "bleu4": bleus[3], "cider": float(np.mean(_cider(cands, refs, 4, 6.0)))}
