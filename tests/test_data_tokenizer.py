"""Tokenizer: padding, truncation keeping EOS, BOS, batches, any .model by path."""

import numpy as np
import pytest

from vlm.data.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "t.model"
  sentences = [f"a {c} {s} number {i}" for c in ("red", "blue", "green") for s in ("circle", "star") for i in range(30)]
  train_tokenizer(sentences, path, vocab_size=400)
  return Tokenizer(path)


def test_pad_truncate_bos_eos(tok):
  ids = tok.encode("a red circle", length=24, add_bos=True)
  assert ids[0] == tok.bos_id and tok.eos_id in ids and ids[-1] == tok.pad_id
  long = tok.encode("a red circle " * 20, length=8)
  assert long.shape == (8,) and long[-1] == tok.eos_id
  no_eos = tok.encode("a red circle " * 20, length=8, add_eos=False)
  assert tok.eos_id not in no_eos
  assert tok.encode("a red circle").ndim == 1


def test_batch_and_decode(tok):
  texts = ["a red circle", "a blue star number 7", ""]
  ids = tok.encode_batch(texts, length=32)
  assert ids.shape == (3, 32) and ids.dtype == np.int32
  assert tok.decode_batch(ids) == texts
  assert tok.decode([*tok.encode("a green star"), 5, 6]) == "a green star"  # stops at EOS
  assert tok.decode(tok.encode("ünïcode ok")) == "ünïcode ok"  # byte fallback


def test_missing_model_path():
  with pytest.raises(FileNotFoundError, match="nope.model"):
    Tokenizer("/nonexistent/nope.model")
