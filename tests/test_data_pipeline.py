"""grain pipeline: determinism, resume, per-process slices, mesh arrays, pp checks, digits."""

import collections
import time

import jax
import numpy as np
import pytest

from vlm.data import check_config, get_default_config, load_split_numpy, make_pipeline, parse_pp
from vlm.data import preprocess

BUILDER = dict(num_train=96, num_validation=24, num_test=40, image_size=32, num_frames=0, seed=0, vocab_size=1000)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  c = get_default_config()
  c.data_dir = str(tmp_path_factory.mktemp("data"))
  c.builder.update(BUILDER)
  c.pp_train = "decode|random_resized_crop(32, scale=(0.8, 1))|flip_lr|value_range(-1, 1)"
  c.pp_eval = "resize(32)|value_range(-1, 1)"
  c.text_length = 16
  return c


def _labels(it, n):
  return [np.asarray(next(it)["label"]).tolist() for _ in range(n)]


def _ids(config, split="train", **kw):
  """Stable per-example identity: tokens of the detailed caption + label."""
  c = config.copy_and_resolve_references()
  c.extra_text_keys = ("caption_detailed",)
  c.pp_train = c.pp_eval
  args = dict(split=split, batch_size=8, mesh=None, seed=0, num_epochs=1, drop_remainder=False)
  args.update(kw)
  out = []
  for b in make_pipeline(c, **args):
    out += [tuple(t) + (int(y),) for t, y in zip(b["text_detailed"].tolist(), b["label"].tolist())]
  return out


def test_same_seed_same_order(config):
  a = make_pipeline(config, split="train", batch_size=8, mesh=None, seed=3)
  b = make_pipeline(config, split="train", batch_size=8, mesh=None, seed=3)
  ba, bb = next(a), next(b)
  np.testing.assert_array_equal(ba["text"], bb["text"])
  np.testing.assert_array_equal(ba["image"], bb["image"])
  c = make_pipeline(config, split="train", batch_size=8, mesh=None, seed=4)
  assert _labels(a, 4) != _labels(c, 4)


def test_batch_contents(config):
  b = next(make_pipeline(config, split="train", batch_size=8, mesh=None, seed=0))
  assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.float32
  assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
  assert b["text"].shape == (8, 16) and b["text"].dtype == np.int32
  assert b["label"].dtype == np.int32 and b["seen"].dtype == np.bool_


def test_resume_mid_epoch(config):
  it = make_pipeline(config, split="train", batch_size=8, mesh=None, seed=1, num_epochs=2)
  _labels(it, 3)
  state = it.get_state()
  rest = list(it)  # 21 batches, across the epoch boundary (12 batches/epoch)
  assert len(rest) == 21
  fresh = make_pipeline(config, split="train", batch_size=8, mesh=None, seed=1, num_epochs=2)
  fresh.set_state(state)
  for want in rest:
    got = next(fresh)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  with pytest.raises(StopIteration):
    next(fresh)


def test_process_slices_disjoint_and_cover(config):
  whole = _ids(config, shuffle=False)
  assert len(whole) == BUILDER["num_train"]
  twins = {x for x, n in collections.Counter(whole).items() if n > 1}  # identical scenes can occur
  for shuffle in (False, True):
    one = _ids(config, shuffle=shuffle, batch_size=8)
    parts = [_ids(config, shuffle=shuffle, batch_size=8, process_index=i, process_count=2) for i in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(whole) // 2
    assert not (set(parts[0]) & set(parts[1])) - twins
    assert sorted(parts[0] + parts[1]) == sorted(whole)
    for s in range(len(whole) // 8):  # process p holds rows [4p, 4p + 4) of global batch s
      assert parts[0][4 * s : 4 * s + 4] + parts[1][4 * s : 4 * s + 4] == one[8 * s : 8 * s + 8]


def test_processes_concatenate_to_one_process_batches(config):
  """2 simulated processes' batches, concatenated, are the 1-process batches (augmentations too),
  across an epoch boundary, and stay so after a resume."""
  one = make_pipeline(config, split="train", batch_size=8, mesh=None, seed=2)
  two = [
    make_pipeline(config, split="train", batch_size=8, mesh=None, seed=2, process_index=i, process_count=2)
    for i in range(2)
  ]
  for step in range(15):  # 12 batches per epoch
    if step == 5:
      two[1] = _resumed(config, two[1].get_state(), process_index=1)
    want = next(one)
    got = [next(it) for it in two]
    assert got[0]["label"].shape == (4,)
    for k in want:
      np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), want[k])


def _resumed(config, state, **kw):
  it = make_pipeline(config, split="train", batch_size=8, mesh=None, seed=2, process_count=2, **kw)
  it.set_state(state)
  return it


def test_drop_remainder_cuts_to_whole_global_batches(config):
  kw = dict(split="train", batch_size=64, mesh=None, seed=0, num_epochs=1)  # 96 = 1.5 global batches
  assert [len(list(make_pipeline(config, process_index=i, process_count=2, **kw))) for i in range(2)] == [1, 1]
  tail = [list(make_pipeline(config, process_index=i, process_count=2, drop_remainder=False, **kw)) for i in range(2)]
  assert [[len(b["label"]) for b in t] for t in tail] == [[32, 32], [32]]


def test_global_arrays_on_mesh(config):
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  it = make_pipeline(config, split="train", batch_size=16, mesh=mesh, seed=0)
  b = next(it)
  assert b["image"].shape == (16, 32, 32, 3)
  assert b["text"].sharding.spec[0] == ("data", "fsdp")  # batch over both data axes, rest replicated
  assert all(ax is None for ax in b["image"].sharding.spec[1:])
  assert len(b["label"].addressable_shards) == 8


def test_load_split_numpy_and_metadata(config):
  arrays, meta = load_split_numpy(config, "test")
  assert arrays["image"].shape == (40, 32, 32, 3) and arrays["seen"].shape == (40,)
  assert len(meta["class_names"]) == 56 and meta["templates"] and meta["held_out_classes"]
  assert meta["stats"]["skipped"] == 0


def test_answer_labels_index_the_answer_vocab(config, tmp_path):
  from vlm.data import get_tokenizer, scenes

  c = config.copy_and_resolve_references()
  c.extra_text_keys = ("question", "answer")
  c.answer_vocab = scenes.answer_vocab()
  arrays, _ = load_split_numpy(c, "test")
  tok = get_tokenizer(c)
  answers = [tok.decode(a) for a in arrays["answer"]]
  assert [c.answer_vocab[i] for i in arrays["answer_label"]] == answers
  (tmp_path / "answers.txt").write_text("red\nblue\n")
  with c.ignore_type():
    c.answer_vocab = str(tmp_path / "answers.txt")  # a file works too; answers outside it get -1
  arrays, _ = load_split_numpy(c, "test")
  expect = [{"red": 0, "blue": 1}.get(a, -1) for a in answers]
  assert arrays["answer_label"].tolist() == expect and -1 in expect
  with c.ignore_type():
    c.answer_vocab = ["red", "red"]
  with pytest.raises(ValueError, match="duplicate answers"):
    check_config(c)
  c.extra_text_keys = ()
  with pytest.raises(ValueError, match="needs 'question'"):
    check_config(c)


def test_check_config_names_bad_op_and_argument(config):
  c = config.copy_and_resolve_references()
  c.pp_train = "decode|flipp|value_range(-1, 1)"
  with pytest.raises(ValueError, match=r"data.pp_train: unknown op 'flipp' at position 2; known ops"):
    check_config(c)
  with c.ignore_type():
    c.pp_train = ["decode", "resize(-3)"]
  with pytest.raises(ValueError, match=r"data.pp_train: bad argument for op 'resize' at position 2"):
    check_config(c)
  with c.ignore_type():
    c.pp_train = "resize(32)|value_range(1, -1)"
  with pytest.raises(ValueError, match="value_range"):
    check_config(c)
  with c.ignore_type():
    c.pp_train = "resize(32, bogus=1)"
  with pytest.raises(ValueError, match="resize"):
    check_config(c)
  with c.ignore_type():
    c.pp_train = "resize(32"
  with pytest.raises(ValueError, match="cannot parse"):
    check_config(c)
  with c.ignore_type():
    c.pp_train = config.pp_train
  c.source = "ftp:foo"
  with pytest.raises(ValueError, match="data.source"):
    check_config(c)


def test_flip_swaps_left_right_and_boxes():
  (flip,) = parse_pp("flip_lr(p=1.0)")
  img = np.zeros((4, 8, 3), np.uint8)
  img[:, 0] = 255
  ex = {
    "image": img,
    "caption": "a red circle on the left",
    "answers": ["right"],
    "boxes": np.array([[0, 0, 2, 4]], np.float32),
    "motion": np.int32(0),
  }
  out = flip(ex, np.random.default_rng(0))
  assert out["caption"] == "a red circle on the right" and out["answers"] == ["left"]
  assert out["image"][:, -1].min() == 255
  np.testing.assert_array_equal(out["boxes"], [[6, 0, 8, 4]])
  assert out["motion"] == 1


def test_normalize_stats():
  (norm,) = parse_pp("normalize('clip')")
  out = norm({"image": np.full((2, 2, 3), 255, np.uint8)}, None)["image"]
  mean, std = preprocess.STATS["clip"]
  np.testing.assert_allclose(out[0, 0], (1 - np.array(mean)) / np.array(std), rtol=1e-5)


def test_digits_source(config):
  c = config.copy_and_resolve_references()
  c.source = "digits"
  c.image_size = 32
  arrays, meta = load_split_numpy(c, "validation")
  assert arrays["image"].shape == (200, 32, 32, 3)
  assert meta["class_names"][7] == "seven"
  from vlm.data.digits import DigitsSource

  assert DigitsSource("test", 32)[0]["caption"].startswith("a handwritten digit ")


def test_worker_processes_match_in_process(config):
  c = config.copy_and_resolve_references()
  c.worker_count = 1
  got = next(make_pipeline(c, split="train", batch_size=8, mesh=None, seed=5))
  want = next(make_pipeline(config, split="train", batch_size=8, mesh=None, seed=5))
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])


# -- prefetch: batches made ahead on a background thread --------------------------------------------


def _batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))


def test_prefetch_keeps_the_stream_and_the_consumers_state(config):
  plain, ahead = config.copy_and_resolve_references(), config.copy_and_resolve_references()
  plain.prefetch, ahead.prefetch = 0, 3
  a = make_pipeline(plain, split="train", batch_size=8, mesh=None, seed=2, num_epochs=2)
  b = make_pipeline(ahead, split="train", batch_size=8, mesh=None, seed=2, num_epochs=2)
  for _ in range(4):
    _batches_equal(next(a), next(b))
  # The state and the counters are the consumer's (after 4 batches), not the producer's (up to 3
  # ahead): let the thread fill its queue first, so a producer-side count would show.
  time.sleep(0.5)
  assert b.get_state() == a.get_state()
  assert b.stats() == a.stats() and a.stats()["batches"] == 4 and a.stats()["examples"] == 32
  resumed = make_pipeline(ahead, split="train", batch_size=8, mesh=None, seed=2, num_epochs=2)
  resumed.set_state(b.get_state())
  rest = list(a)
  assert len(rest) == 20
  for want in rest:
    _batches_equal(next(resumed), want)
  with pytest.raises(StopIteration):
    next(resumed)


def test_read_threads_keep_the_stream_and_its_resume_state(config):
  """data.read_threads > 0 (grain's thread read-ahead) yields the same batches, and a state taken
  from it resumes a read_threads = 0 pipeline at the same place; negative values are refused."""
  plain, threaded = config.copy_and_resolve_references(), config.copy_and_resolve_references()
  plain.prefetch = threaded.prefetch = 0
  plain.read_threads, threaded.read_threads = 0, 3
  a = make_pipeline(plain, split="train", batch_size=8, mesh=None, seed=4)
  b = make_pipeline(threaded, split="train", batch_size=8, mesh=None, seed=4)
  for _ in range(3):
    _batches_equal(next(a), next(b))
  resumed = make_pipeline(plain, split="train", batch_size=8, mesh=None, seed=4)
  resumed.set_state(b.get_state())
  _batches_equal(next(resumed), next(a))
  threaded.read_threads = -1
  with pytest.raises(ValueError, match="data.read_threads"):
    make_pipeline(threaded, split="train", batch_size=8, mesh=None, seed=4)


def _iterator(n: int, fail_at: int | None, prefetch: int):
  import grain
  from vlm.data.pipeline import DataIterator

  def make(i):
    if i == fail_at:
      raise ValueError(f"bad record {i}")
    return {"label": np.full((2,), i, np.int32)}

  ds = grain.MapDataset.range(n).map(make).to_iter_dataset()
  return DataIterator(ds, collections.Counter(), None, 2, prefetch=prefetch)


def test_prefetch_raises_a_pipeline_error_at_its_place():
  it = _iterator(10, fail_at=3, prefetch=2)
  assert [int(next(it)["label"][0]) for _ in range(3)] == [0, 1, 2]
  with pytest.raises(ValueError, match="bad record 3"):
    next(it)


def test_prefetch_thread_stops_when_the_iterator_is_dropped_or_closed():
  import gc
  import threading
  import time

  def prefetchers():
    return {t for t in threading.enumerate() if t.name == "vlm-data-prefetch" and t.is_alive()}

  before = prefetchers()
  closed, dropped = _iterator(100, None, 2), _iterator(100, None, 2)
  next(closed), next(dropped)
  ours = prefetchers() - before
  assert len(ours) == 2
  closed.close()
  del dropped
  gc.collect()
  deadline = time.monotonic() + 10
  while any(t.is_alive() for t in ours) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert not any(t.is_alive() for t in ours)
