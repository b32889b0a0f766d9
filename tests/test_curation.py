"""Curation: rules, MetaCLIP balancing, LSH dedup, resumable chunk stores, the noisy dataset flag
and `vlm.curate` end to end (output readable by the trainer's pipeline)."""

import io
import json

import numpy as np
import pytest
from conftest import TINY_DATA
from PIL import Image

from vlm.curation import dedup, filters
from vlm.curation.store import ChunkStore
from vlm.data import embedded

NOISY = dict(TINY_DATA, num_train=256, noise_shuffled=50, noise_duplicates=20)


def _png(h, w):
  buf = io.BytesIO()
  Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


@pytest.mark.parametrize(
  "caption,reason",
  [
    ("a red circle on the left", "ok"),
    ("一只红色的猫坐在 垫子上", "ok"),  # non-Latin letters pass the same rules
    ("кошка сидит на ковре", "ok"),
    ("cat", "too_few_words"),
    ("soooooooo cute cat", "char_repeat"),
    ("IMG_2031 #### 12345 ////", "few_letters"),
    ("buy buy buy buy now", "word_repeat"),
    ("see https://example.com for more", "url_or_markup"),
    ("a photo <b>cat</b> here", "url_or_markup"),
    ("DSC_0001.jpg on a table", "url_or_markup"),
  ],
)
def test_caption_rules(caption, reason):
  assert filters.caption_reason(caption) == reason


def test_image_rules_read_sizes_without_decoding():
  assert filters.heuristic_reason(_png(64, 48), "a red circle") == "ok"
  assert filters.heuristic_reason(_png(8, 64), "a red circle") == "image_too_small"
  assert filters.heuristic_reason(_png(32, 128), "a red circle") == "aspect_ratio"
  assert filters.heuristic_reason(b"not an image", "a red circle") == "bad_image"
  assert filters.heuristic_reason(b"", "a red circle") == "no_image"


def test_balance_keeps_rare_concepts_and_caps_frequent_ones():
  captions = ["a red cat"] * 900 + ["a blue dog"] * 50 + ["nothing here"] * 10
  matches = filters.find_concepts(captions, ["red", "blue", "cat", "red cat"])
  assert matches[0] == [3] and matches[900] == [1]  # the longest phrase wins ("red cat", not "red")
  keep, counts = filters.balance(matches, 4, max_per_concept=100, seed=0)
  assert counts.tolist() == [0, 50, 0, 900]
  assert keep[900:950].all() and keep[950:].all()  # rare concept and unmatched: all kept
  assert 70 < keep[:900].sum() < 130  # ~t of the frequent one
  np.testing.assert_array_equal(keep, filters.balance(matches, 4, 100, seed=0)[0])


def _planted(n=600, d=32, seed=0):
  rng = np.random.default_rng(seed)
  z = rng.standard_normal((n, d))
  copies = rng.choice(n, 60, replace=False)
  dups = z[copies] + 0.05 * rng.standard_normal((60, d))  # cosine ~0.999 to their originals
  return np.concatenate([z, dups]), copies


def test_lsh_dedup_finds_the_exact_clusters_deterministically():
  z, copies = _planted()
  exact = dedup.near_duplicates(z, 0.95, num_tables=0)
  approx = dedup.near_duplicates(z, 0.95, num_bits=12, num_tables=16, seed=0)
  np.testing.assert_array_equal(approx, exact)
  np.testing.assert_array_equal(approx, dedup.near_duplicates(z, 0.95, seed=0))
  assert (exact[600:] == copies).all()  # each copy joins its original's cluster (smallest index)
  prio = np.zeros(len(z))
  prio[600:] = 1.0  # the copies score higher: they survive instead of the originals
  keep = dedup.keep_one_per_cluster(exact, prio)
  assert keep.sum() == 600 and keep[600:].all() and not keep[copies].any()


def test_thumbnail_embedding_ignores_brightness_but_not_content():
  rng = np.random.default_rng(0)
  a = rng.integers(0, 255, (2, 64, 64, 3)).astype(np.float32)
  t = dedup.thumbnail_embedding(np.stack([a[0], a[0] * 0.9 + 3, a[1]]))
  t /= np.linalg.norm(t, axis=1, keepdims=True)
  assert t[0] @ t[1] > 0.999 and t[0] @ t[2] < 0.5
  with pytest.raises(ValueError, match="multiple of size"):
    dedup.thumbnail_embedding(np.zeros((1, 30, 30, 3)))


def test_chunk_store_resumes_after_an_interruption(tmp_path):
  calls = []

  def fn(start, stop):
    calls.append(start)
    if start == 20 and len(calls) == 3:
      raise KeyboardInterrupt
    return {"x": np.arange(start, stop) * 2, "s": np.asarray([str(i) for i in range(start, stop)])}

  s = ChunkStore(tmp_path, "stage", {"k": 1}, n=25, chunk_size=10)
  with pytest.raises(KeyboardInterrupt):
    s.compute(fn, "stage")
  assert calls == [0, 10, 20] and s.missing() == [2]
  out = ChunkStore(tmp_path, "stage", {"k": 1}, n=25, chunk_size=10).compute(fn, "stage")
  assert calls == [0, 10, 20, 20]  # only the missing chunk ran again
  np.testing.assert_array_equal(out["x"], np.arange(25) * 2)
  assert out["s"][24] == "24"
  assert ChunkStore(tmp_path, "stage", {"k": 2}, n=25, chunk_size=10).missing() == [0, 1, 2]  # new inputs


def test_noisy_builder_flag_shuffles_captions_and_duplicates_images():
  args = embedded.BuildArgs(**NOISY)
  clean = embedded.BuildArgs(**dict(TINY_DATA, num_train=256))
  noise = np.array([embedded.noise_of(args, "train", i) for i in range(256)])
  assert 0.4 < (noise[:, 1] >= 0).mean() < 0.6 and 0.12 < (noise[:, 0] >= 0).mean() < 0.28
  assert embedded.noise_of(args, "test", 5) == (-1, -1)
  i = int(np.flatnonzero((noise[:, 0] >= 0) & (noise[:, 1] < 0))[0])
  j = int(noise[i, 0])
  assert embedded.noise_of(args, "train", j)[0] == -1  # duplicates point at an original
  a, b = embedded.make_example(args, "train", i), embedded.make_example(args, "train", j)
  assert a["caption"] == b["caption"] and a["image"] != b["image"]  # a near copy, not a byte copy
  ia, ib = (np.asarray(Image.open(io.BytesIO(x)), np.float32) for x in (a["image"], b["image"]))
  assert np.corrcoef(ia.ravel(), ib.ravel())[0, 1] > 0.95
  k = int(np.flatnonzero((noise[:, 1] >= 0) & (noise[:, 0] < 0))[0])
  shuffled, own = embedded.make_example(args, "train", k), embedded.make_example(clean, "train", k)
  assert shuffled["image"] == own["image"] and shuffled["label"] == own["label"]
  assert shuffled["caption"] == embedded.make_example(clean, "train", int(noise[k, 1]))["caption"]
  c = int(np.flatnonzero((noise[:, 0] < 0) & (noise[:, 1] < 0))[0])
  assert embedded.make_example(args, "train", c)["image"] == embedded.make_example(clean, "train", c)["image"]


def _config(data_dir, scorer, captioner, name):
  from configs import curate

  c = curate.get_config("full")
  c.data.data_dir = str(data_dir)
  c.data.builder.update(NOISY)
  c.clip_score.workdir = str(scorer)
  c.recaption.workdir = str(captioner)
  c.balance.max_per_concept = 20
  c.chunk_size = 128
  c.batch_size = 64
  c.output.name = name
  return c


def test_curate_end_to_end_writes_a_dataset_the_trainer_reads(data_dir, siglip_workdir, coca_workdir, tmp_path):
  from configs.siglip_b16 import get_config as siglip_config

  from vlm.curate import curate
  from vlm.data import make_pipeline, make_source

  c = _config(data_dir, siglip_workdir, coca_workdir, "t_full")
  report = curate(c, tmp_path / "wd")
  steps = report["steps"]
  assert list(steps) == ["heuristic", "clip_score", "dedup", "balance", "recaption"]
  assert steps["clip_score"]["kept"] == round(0.5 * steps["heuristic"]["kept"])
  assert (
    steps["dedup"]["removed"] > 0 and steps["balance"]["concepts"]["red"][1] <= steps["balance"]["concepts"]["red"][0]
  )
  noise = report["injected_noise"]
  assert sum(noise[k]["total"] for k in ("duplicate", "shuffled", "clean")) == 256
  assert json.loads((tmp_path / "wd" / "report.json").read_text())["output"] == report["output"]

  # The result is a TFDS dataset with the source's features, metadata and the synthetic captions.
  data = siglip_config("demo").data
  data.source, data.data_dir = "tfds:vlm_curated/t_full", str(data_dir)
  data.builder.update(TINY_DATA)  # the tokenizer of the tiny embedded set
  src = make_source(data, "train")
  assert len(src) == report["output"]["examples"] == steps["recaption"]["kept"]
  rec = src[0]
  assert {"boxes", "questions", "caption_varied", "caption_synthetic"} <= set(rec)
  assert src.metadata["class_names"] and len(make_source(data, "test")) == TINY_DATA["num_test"]
  batch = next(iter(make_pipeline(data, split="train", batch_size=16, mesh=None, seed=0)))
  assert batch["image"].shape == (16, 32, 32, 3)

  # A rerun loads every stage from the cache (same selection) and refuses to overwrite the output.
  with pytest.raises(FileExistsError, match="t_full"):
    curate(c, tmp_path / "wd")
  c.output.name = "t_full_again"
  again = curate(c, tmp_path / "wd")
  assert again["steps"] == steps


def test_curate_config_errors_name_the_key(data_dir):
  from configs import curate as cfg

  from vlm.curate import curate

  c = cfg.get_config("demo")
  c.clip_score.workdir = ""
  with pytest.raises(ValueError, match="clip_score.workdir"):
    curate(c, "/tmp/unused")
  c = cfg.get_config("demo")
  c.clip_score.threshold = 0.1
  with pytest.raises(ValueError, match="exactly one of keep_fraction and threshold"):
    curate(c, "/tmp/unused")
  c = cfg.get_config("demo")
  c.steps = ("dedupe",)
  with pytest.raises(ValueError, match="steps: unknown"):
    curate(c, "/tmp/unused")
