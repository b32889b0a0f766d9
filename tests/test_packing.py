"""Sequence packing: block-diagonal causal attention with per-segment positions (DecoderLM,
VisionLanguageModel), vlm.data.conversation.pack_examples, the packed pipeline and a packed LM run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_DATA
from vlm.data.conversation import check_conversation_config, pack_examples
from vlm.models.decoder import DecoderLM, positions_from_segments
from vlm.models.vision_lm import VisionLanguageModel

LM = dict(vocab_size=1008, width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64, tie_embeddings=True)
VISION = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8)
N = 16  # image tokens of a 32 px image with 8 px patches
PAD, IMG = 0, 1000


def _pack(seqs, length):
  """Sequences -> (tokens [1, length], segment_ids [1, length]) packed back to back."""
  tokens, seg = np.full(length, PAD, np.int32), np.zeros(length, np.int32)
  pos = 0
  for j, s in enumerate(seqs):
    tokens[pos : pos + len(s)], seg[pos : pos + len(s)] = s, j + 1
    pos += len(s)
  return jnp.asarray(tokens[None]), jnp.asarray(seg[None])


def test_positions_restart_per_segment():
  seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0]])
  np.testing.assert_array_equal(positions_from_segments(seg), [[0, 1, 2, 0, 1, 0, 0, 0]])


def _right_pad(seqs):
  width = max(len(s) for s in seqs)
  return jnp.asarray(np.stack([np.r_[s, [PAD] * (width - len(s))] for s in seqs]), jnp.int32)


@pytest.mark.slow
def test_decoder_packed_row_equals_each_sequence_alone():
  rng = np.random.default_rng(0)
  seqs = [rng.integers(3, 900, n) for n in (5, 7, 3)]
  tokens, seg = _pack(seqs, 19)  # 15 real tokens, 4 pads
  m = DecoderLM(**LM)
  params = jax.jit(m.init)(jax.random.key(0), tokens)["params"]
  # Row 0 packed; row 1 the same tokens as one segment (plain causal attention over the row).
  out = m.apply(
    {"params": params}, jnp.concatenate([tokens, tokens]), segment_ids=jnp.concatenate([seg, jnp.ones_like(seg)])
  )
  packed, plain = out[0], out[1]
  assert np.isfinite(np.asarray(packed)).all()  # padded rows still attend to themselves
  alone = m.apply({"params": params}, _right_pad(seqs))  # causal: right padding changes nothing before it
  pos = 0
  for i, s in enumerate(seqs):
    np.testing.assert_allclose(packed[pos : pos + len(s)], alone[i, : len(s)], atol=2e-5)
    pos += len(s)
  np.testing.assert_allclose(plain, m.apply({"params": params}, tokens)[0], atol=2e-5)
  assert not np.allclose(plain[5:12], packed[5:12], atol=1e-3)  # unpacked, later sequences see earlier ones


@pytest.mark.slow
def test_vision_lm_packed_examples_get_their_own_images():
  m = VisionLanguageModel(lm_config=LM, vision_config=VISION, feature_layer=-2)
  rng = np.random.default_rng(1)
  imgs = jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  ex1 = np.asarray([3, 1002] + [IMG] * N + [270, 268, 301, 1])
  ex2 = np.asarray([3, 1002] + [IMG] * N + [280, 1003, 290, 299, 300, 1])
  length = len(ex1) + len(ex2) + 5
  both, only1 = _pack([ex1, ex2], length), _pack([ex1], length)
  params = jax.jit(m.init)(jax.random.key(0), imgs[:1], both[0])["params"]
  # Row 0: both examples, each with its image; row 1: ex1 alone (its second image is surplus).
  packed, stats = m.apply(
    {"params": params},
    jnp.stack([imgs, imgs]),
    jnp.concatenate([both[0], only1[0]]),
    segment_ids=jnp.concatenate([both[1], only1[1]]),
    return_stats=True,
  )
  assert float(stats["image_token_mismatch"]) == 0.0
  alone = m.apply({"params": params}, imgs, _right_pad([ex1, ex2]))
  np.testing.assert_allclose(packed[0, : len(ex1)], alone[0, : len(ex1)], atol=2e-5)
  np.testing.assert_allclose(packed[0, len(ex1) : len(ex1) + len(ex2)], alone[1, : len(ex2)], atol=2e-5)
  np.testing.assert_allclose(packed[1, : len(ex1)], alone[0, : len(ex1)], atol=2e-5)


def _ex(ids, loss, length, label):
  tokens, mask = np.full(length, PAD, np.int32), np.zeros(length, np.int32)
  tokens[: len(ids)], mask[: len(loss)] = ids, loss
  return {
    "tokens": tokens,
    "loss_mask": mask,
    "label": np.int32(label),
    "image": np.full((2, 2, 3), label, np.float32),
    "prompt": np.full(4, label, np.int32),
  }


def test_pack_examples_segments_losses_and_never_cuts_an_image():
  length = 16
  a = _ex([3, 1002, IMG, IMG, IMG, 5, 1], [0, 0, 0, 0, 0, 1, 1], length, 10)  # 7 tokens, image
  b = _ex([3, 7, 8, 1], [0, 1, 1, 1], length, 11)  # 4 tokens, text only
  c = _ex([3, 1002, 20, 21, IMG, IMG, IMG, 6, 1], [0] * 7 + [1, 1], length, 12)  # 5 left: image cut, dropped
  d = _ex([3, 1002, IMG, IMG, IMG, 7, 1], [0, 0, 0, 0, 0, 1, 1], length, 13)  # image fits, answer truncated
  row = pack_examples([a, b, c, d], length, PAD, IMG)
  np.testing.assert_array_equal(row["segment_ids"], [1] * 7 + [2] * 4 + [4] * 5)
  np.testing.assert_array_equal(row["tokens"], [3, 1002, IMG, IMG, IMG, 5, 1, 3, 7, 8, 1, 3, 1002, IMG, IMG, IMG])
  np.testing.assert_array_equal(row["loss_mask"], [0, 0, 0, 0, 0, 1, 1, 0, 1, 1, 1, 0, 0, 0, 0, 0])
  assert row["packed_dropped"] == 1 and row["packed_truncated"] == 1
  # Per-example keys keep example order; images follow the placeholder runs (a's, then d's), then the rest.
  np.testing.assert_array_equal(row["label"], [10, 11, 12, 13])
  assert row["prompt"].shape == (4, 4) and row["image"].shape == (4, 2, 2, 3)
  np.testing.assert_array_equal(row["image"][:, 0, 0, 0], [10, 13, 11, 12])
  # Every placeholder run in the row is whole (3 tokens each).
  runs = np.diff(np.flatnonzero(np.diff(np.r_[0, row["tokens"] == IMG, 0])))[::2]
  assert list(runs) == [3, 3]
  # Room for nothing: the rest are dropped; all-padding (empty) examples are not counted.
  row = pack_examples([_ex(list(range(3, 19)), [1] * 16, length, 1), b, _ex([], [], length, 0)], length, PAD, IMG)
  assert row["packed_dropped"] == 1 and row["packed_truncated"] == 0 and set(row["segment_ids"]) == {1}
  with pytest.raises(ValueError, match="pack"):
    check_conversation_config({"pack": 0})


def _tiny_data(c, data_dir):
  c.data.data_dir = str(data_dir)
  c.data.builder.update(TINY_DATA)
  return c


def test_packed_pipeline_shapes_and_unpacked_evals(data_dir):
  from configs import lm_pretrain
  from vlm.data import load_split_numpy, make_pipeline

  c = _tiny_data(lm_pretrain.get_config("demo"), data_dir)
  c.data.extra_text_keys = ("caption_detailed", "question", "answer")
  c.data.conversation = lm_pretrain.conversation(("qa", "caption"), image_tokens=N, length=96, pack=2)
  it = make_pipeline(c.data, split="train", batch_size=4, mesh=None, seed=0)
  batch = next(it)
  assert batch["tokens"].shape == batch["loss_mask"].shape == batch["segment_ids"].shape == (4, 96)
  assert batch["image"].shape == (4, 2, 32, 32, 3) and batch["label"].shape == batch["seen"].shape == (4, 2)
  assert batch["prompt"].shape == (4, 2, N + 24) and batch["question"].shape[:2] == (4, 2)
  stats = it.stats()
  assert stats["examples"] == 8 and stats["batches"] == 1
  for r in range(4):  # each segment's placeholders are one whole image; dropped ones counted
    segs = set(batch["segment_ids"][r].tolist()) - {0}
    assert segs <= {1, 2} and 1 in segs
    assert np.sum(batch["tokens"][r] == 1000) == N * len(segs)
  assert sum(2 - len(set(batch["segment_ids"][r].tolist()) - {0}) for r in range(4)) == stats["packed_dropped"]
  # Two processes: each packs its contiguous rows; together they give the one-process batch.
  parts = [
    next(make_pipeline(c.data, split="train", batch_size=4, mesh=None, seed=0, process_index=p, process_count=2))
    for p in (0, 1)
  ]
  for key in ("tokens", "segment_ids", "image", "label"):
    np.testing.assert_array_equal(np.concatenate([q[key] for q in parts]), batch[key])
  # Evaluation splits (and load_split_numpy, whatever the split) stay unpacked.
  arrays, _ = load_split_numpy(c, "train", max_examples=4)
  assert arrays["tokens"].shape == (4, 96) and "segment_ids" not in arrays and arrays["image"].ndim == 4
  val = next(make_pipeline(c.data, split="validation", batch_size=4, mesh=None, seed=0))
  assert val["label"].shape == (4,) and "segment_ids" not in val


@pytest.mark.slow
def test_packed_lm_pretraining_runs(data_dir, tmp_path):
  from configs import lm_pretrain
  from vlm.train import train

  c = _tiny_data(lm_pretrain.get_config("demo"), data_dir)
  c.model.update(LM)
  c.data.conversation.pack = 2
  c.batch_size, c.total_steps, c.log_every, c.checkpoint_every = 8, 2, 1, 1000
  c.schedule.warmup_steps = 1
  c.tensorboard = False
  out = train(c, tmp_path / "lm")
  assert np.isfinite(out["train/loss"])
