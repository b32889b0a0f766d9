"""The CM3 objective's span transform (vlm.data.cm3) and its place in the pipeline."""

import numpy as np
import pytest

from conftest import TINY_DATA
from vlm.data.cm3 import apply_cm3, check_cm3_config, cm3_restore, cm3_transform, draw_spans

S = (900, 901, 902)  # sentinels
EOS, BOS, PAD = 1, 3, 0


def test_known_example_moves_spans_to_the_end():
  ids = [10, 11, 12, 13, 14, 15, 16, EOS]
  out = cm3_transform(ids, [(2, 4), (5, 6)], S, eos_id=EOS)
  assert out == [10, 11, 900, 14, 901, 16, 900, 12, 13, 901, 15, EOS]
  assert cm3_restore(out, S, eos_id=EOS) == ids


@pytest.mark.parametrize("seed", range(20))
def test_random_spans_are_invertible_and_never_cover_protected_tokens(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(3, 40))
  ids = [BOS] + rng.integers(4, 800, n).tolist() + [EOS]
  maskable = np.array([t not in (BOS, EOS) for t in ids])
  spans = draw_spans(maskable, rng, int(rng.integers(1, 4)), max_span_len=int(rng.integers(1, 6)))
  assert spans and all(maskable[s:e].all() for s, e in spans)
  assert all(e1 < s2 for (_, e1), (s2, _) in zip(spans, spans[1:]))  # disjoint and not adjacent
  out = cm3_transform(ids, spans, S, eos_id=EOS)
  assert len(out) == len(ids) + 2 * len(spans) and out[0] == BOS and out[-1] == EOS
  tail = sum(e - s + 1 for s, e in spans)  # the moved spans, each after its sentinel, end the document
  assert out[-1 - tail : -1] == [t for i, (s, e) in enumerate(spans) for t in [S[i]] + ids[s:e]]
  assert cm3_restore(out, S, eos_id=EOS) == ids


def test_apply_cm3_pads_trains_every_token_and_shrinks_to_the_room():
  tokens = np.array([BOS, 5, 6, 7, 8, 9, EOS, PAD, PAD], np.int32)
  loss = np.array([0, 1, 1, 1, 1, 1, 1, 0, 0], np.int32)
  cfg = dict(sentinel_ids=S, num_spans=3, max_span_len=1)
  out, out_loss = apply_cm3(tokens, loss, cfg, np.random.default_rng(0), pad_id=PAD, bos_id=BOS, eos_id=EOS)
  assert (out != PAD).sum() == 9 and out_loss.tolist() == [1] * 9  # room for one span only (2 pads)
  assert cm3_restore(out.tolist(), S, eos_id=EOS) == tokens[:7].tolist()
  full = np.array([BOS, 5, 6, EOS], np.int32)
  same, _ = apply_cm3(full, np.ones(4, np.int32), cfg, np.random.default_rng(0), pad_id=PAD, bos_id=BOS, eos_id=EOS)
  assert same.tolist() == full.tolist()  # no room: unchanged


def test_config_errors_name_the_key():
  with pytest.raises(ValueError, match="sentinel_ids"):
    check_cm3_config(dict(sentinel_ids=()))
  with pytest.raises(ValueError, match="max_spans=4 exceeds"):
    check_cm3_config(dict(sentinel_ids=S, max_spans=4))
  with pytest.raises(ValueError, match="num_spans"):
    check_cm3_config(dict(sentinel_ids=S, num_spans=5))


def test_pipeline_documents_restore_to_the_plain_ones(data_dir):
  """lm_pretrain:demo_cm3's batches are the plain documents with spans moved: restoring them gives
  exactly what the same pipeline without data.cm3 yields."""
  from configs import lm_pretrain
  from vlm.data.pipeline import check_config, make_pipeline

  c = lm_pretrain.get_config("demo_cm3")
  c.data.data_dir = str(data_dir)
  c.data.builder.update(TINY_DATA)
  check_config(c.data)
  cm3 = next(make_pipeline(c.data, split="train", batch_size=8, mesh=None, seed=0))
  del c.data["cm3"]
  plain = next(make_pipeline(c.data, split="train", batch_size=8, mesh=None, seed=0))
  moved = 0
  for a, b in zip(np.asarray(cm3["tokens"]), np.asarray(plain["tokens"])):
    a, b = a[a != PAD].tolist(), b[b != PAD].tolist()
    moved += a != b
    assert a != b or len(b) > c.data.conversation.length - 2  # unchanged only when no room for a span
    assert cm3_restore(a, (1005, 1006, 1007), eos_id=EOS) == b
  assert moved >= 4
  bad = lm_pretrain.get_config("demo_cm3")
  bad.data.conversation.tasks = ("text", "qa")
  with pytest.raises(ValueError, match=r"data.cm3 needs data.conversation with tasks=\('text',\)"):
    check_config(bad.data)
