"""Captioning metrics: BLEU and CIDEr-D equal pycocoevalcap's on the same tokens; hand checks and errors."""

import numpy as np
import pytest

from vlm.evals.caption_metrics import bleu, caption_scores, cider, tokenize

pytest.importorskip("pycocoevalcap")
from pycocoevalcap.bleu.bleu import Bleu  # noqa: E402
from pycocoevalcap.cider.cider import Cider  # noqa: E402

_VOCAB = (
  "a man woman dog cat sits stands on the grass red blue car street next to with ball "
  "playing riding bike in of small large white black table plate food"
).split()


def _corpus(seed: int = 0, n_images: int = 50) -> tuple[list[str], list[list[str]]]:
  """Tokenized captions: 1-5 references of 3-12 words per image; candidates copy a reference, edit one,
  are short (0-2 words) or random."""
  rng = np.random.default_rng(seed)
  p = rng.dirichlet(np.full(len(_VOCAB), 0.5))  # skewed word frequencies, so higher n-grams recur

  def sentence(length):
    return list(rng.choice(_VOCAB, size=length, p=p))

  cands, refs = [], []
  for _ in range(n_images):
    image_refs = [sentence(rng.integers(3, 13)) for _ in range(rng.integers(1, 6))]
    kind = rng.integers(4)
    if kind == 0:  # a reference verbatim
      cand = list(image_refs[rng.integers(len(image_refs))])
    elif kind == 1:  # a reference with a few words replaced
      cand = list(image_refs[rng.integers(len(image_refs))])
      for j in rng.integers(len(cand), size=2):
        cand[j] = rng.choice(_VOCAB)
    elif kind == 2:  # empty or very short
      cand = sentence(rng.integers(0, 3))
    else:
      cand = sentence(rng.integers(3, 13))
    cands.append(" ".join(cand))
    refs.append([" ".join(r) for r in image_refs])
  return cands, refs


def _gts(refs):
  return {i: list(r) for i, r in enumerate(refs)}


def _res(cands):
  return {i: [c] for i, c in enumerate(cands)}


def _oracle(cands, refs):
  """pycocoevalcap's (BLEU-1..4, CIDEr, per-image CIDEr) of tokenized captions."""
  bleus, _ = Bleu(4).compute_score(_gts(refs), _res(cands), verbose=0)
  return (bleus, *Cider().compute_score(_gts(refs), _res(cands)))


@pytest.mark.parametrize("seed,n", [(0, 4), (1, 4), (2, 1), (3, 2)])
def test_bleu_parity_with_pycocoevalcap(seed, n):
  cands, refs = _corpus(seed)
  assert "" in cands or any(len(c.split()) < 3 for c in cands)
  want, _ = Bleu(n).compute_score(_gts(refs), _res(cands), verbose=0)
  np.testing.assert_allclose(bleu(cands, refs, n, tokenized=True), want, rtol=1e-9, atol=1e-12)
  assert want[-1] > 0.1  # the corpus exercises real matches, not only smoothed zeros


# pycocoevalcap's CiderScorer always counts 1..4-grams whatever its n (n < 4 raises IndexError), so
# CIDEr is compared at n=4 only.
@pytest.mark.parametrize("seed,sigma", [(0, 6.0), (1, 6.0), (4, 2.0)])
def test_cider_parity_with_pycocoevalcap(seed, sigma):
  cands, refs = _corpus(seed)
  want, want_per_image = Cider(sigma=sigma).compute_score(_gts(refs), _res(cands))
  got, got_per_image = cider(cands, refs, sigma=sigma, tokenized=True)
  np.testing.assert_allclose(got_per_image, want_per_image, rtol=1e-9, atol=1e-12)
  assert got == pytest.approx(want, rel=1e-9)
  assert want > 0.5


@pytest.mark.parametrize(
  "cands,refs",
  [
    (["a dog on the grass"], [["a dog on grass", "the dog"]]),  # one image: every idf is 0
    (["", "a cat"], [["a cat sits"], ["a cat"]]),  # empty candidate, single references
    (["a b c d", "a b c d"], [["a b c d"], ["a b c d"]]),  # n-grams in every image's references
  ],
)
def test_parity_small_corpora(cands, refs):
  want_bleu, want_cider, want_per_image = _oracle(cands, refs)
  np.testing.assert_allclose(bleu(cands, refs, tokenized=True), want_bleu, rtol=1e-9, atol=1e-12)
  got_cider, got_per_image = cider(cands, refs, tokenized=True)
  np.testing.assert_allclose(got_per_image, want_per_image, rtol=1e-9, atol=1e-12)
  assert got_cider == pytest.approx(want_cider, rel=1e-9, abs=1e-12)


def test_raw_strings_are_tokenized():
  raw_cands = ["A dog, running on the grass.", "Two cats (black) sit!"]
  raw_refs = [["A dog runs on the grass.", "The dog's running"], ["Two black cats sit.", "Cats; sitting..."]]
  cands = [" ".join(tokenize(c)) for c in raw_cands]
  refs = [[" ".join(tokenize(r)) for r in rs] for rs in raw_refs]
  want_bleu, want_cider, _ = _oracle(cands, refs)
  np.testing.assert_allclose(bleu(raw_cands, raw_refs), want_bleu, rtol=1e-9, atol=1e-12)
  assert cider(raw_cands, raw_refs)[0] == pytest.approx(want_cider, rel=1e-9)
  scores = caption_scores(raw_cands, raw_refs)
  assert scores == pytest.approx({"bleu1": want_bleu[0], "bleu4": want_bleu[3], "cider": want_cider}, rel=1e-9)


def test_tokenize():
  assert tokenize('A man\'s T-shirt, (red)... 3.5 m! "Hi" -- ok; x: y?') == [
    "a",
    "man",
    "s",
    "t-shirt",
    "red",
    "3.5",
    "m",
    "hi",
    "ok",
    "x",
    "y",
  ]
  assert tokenize("  ") == []


def test_hand_checkable():
  assert bleu(["a man rides a red bike"], [["a man rides a red bike"]]) == pytest.approx([1.0] * 4)
  assert bleu(["dogs play"], [["a man rides a red bike"]])[3] < 1e-9
  assert bleu([""], [["a man rides a red bike"]]) == pytest.approx([0.0] * 4, abs=1e-12)
  refs = [["a man rides a red bike", "a person riding a bike"], ["a cat on a table"], ["two dogs play"]]
  good = ["a man riding a red bike", "a cat on the table", "dogs play"]
  bad = ["a red table", "a cat on the table", "dogs play"]
  assert cider(good, refs)[1][0] > cider(bad, refs)[1][0] > 0
  assert caption_scores(good, refs)["cider"] > caption_scores(bad, refs)["cider"]


def test_errors():
  with pytest.raises(ValueError, match="3 candidates but 2 reference lists"):
    bleu(["a", "b", "c"], [["a"], ["b"]])
  with pytest.raises(ValueError, match="image 1 has no reference"):
    cider(["a", "b"], [["a"], []])
  with pytest.raises(ValueError, match="no captions"):
    caption_scores([], [])
  with pytest.raises(TypeError, match=r"references\[0\] is a string"):
    bleu(["a dog"], ["a dog"])
  with pytest.raises(ValueError, match="n must be"):
    bleu(["a"], [["a"]], n=0)
