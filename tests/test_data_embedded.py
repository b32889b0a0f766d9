"""Embedded scenes dataset: deterministic build, held-out splits, TFDS by name, tokenizer."""

import hashlib
from pathlib import Path

import numpy as np
import pytest

from vlm.data import embedded, scenes
from vlm.data.sources import TfdsSource
from vlm.data.tokenizer import Tokenizer

TINY = dict(num_train=120, num_validation=40, num_test=60, image_size=32, num_frames=4)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("scenes")
  embedded.build(str(d), **TINY)
  return str(d)


def _digests(path: Path) -> dict:
  return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def test_build_is_deterministic_and_atomic(data_dir, tmp_path):
  again = embedded.build(str(tmp_path), **TINY)
  first = embedded.dataset_dir(data_dir, **TINY)
  assert _digests(first) == _digests(again)
  assert "tokenizer.model" in _digests(first)
  assert not [p for p in Path(data_dir).rglob("*") if "incomplete" in p.name]


def test_held_out_combos_absent_from_train(data_dir):
  name = embedded.tfds_name(**TINY)
  train = TfdsSource(name, "train", data_dir)
  held = set(train.metadata["held_out_classes"])
  assert 0.15 < len(held) / len(scenes.class_names()) < 0.25
  train_labels = {int(train[i]["label"]) for i in range(len(train))}
  assert not train_labels & held
  assert all(bool(train[i]["seen"]) for i in range(len(train)))
  for split in ("validation", "test"):
    src = TfdsSource(name, split, data_dir)
    seen = np.array([bool(src[i]["seen"]) for i in range(len(src))])
    labels = np.array([int(src[i]["label"]) for i in range(len(src))])
    assert seen.any() and (~seen).any()
    np.testing.assert_array_equal(~seen, np.isin(labels, list(held)))
  # every colour and every shape is still seen in train
  seen_combos = embedded.combos("train")
  assert {c for c, _ in seen_combos} == set(scenes.COLOUR_NAMES)
  assert {s for _, s in seen_combos} == set(scenes.SHAPES)


def test_example_fields_and_metadata(data_dir):
  src = TfdsSource(embedded.tfds_name(**TINY), "test", data_dir)
  assert len(src) == 60
  meta = src.metadata
  assert meta["class_names"][0] == "red circle" and "{}" in meta["templates"][0]
  ex = src[0]
  assert ex["image"][:4] == b"\x89PNG"
  cap = ex["caption"].decode()
  colour, shape = meta["class_names"][int(ex["label"])].split()
  assert colour in cap and shape in cap
  assert ex["boxes"].shape[1] == 4 and len(ex["box_labels"]) == len(ex["boxes"])
  assert ex["box_labels"][0] == ex["label"]
  assert len(ex["questions"]) == len(ex["answers"]) >= 5
  assert len(ex["frames"]) == 4 and 0 <= int(ex["motion"]) < 4


def test_tokenizer_path_and_roundtrip(data_dir):
  tok = Tokenizer(embedded.tokenizer_path(data_dir, **TINY))
  assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 3)
  ids = tok.encode("a large red circle on the left", length=16)
  assert ids.dtype == np.int32 and ids.shape == (16,)
  assert tok.decode(ids) == "a large red circle on the left"


def test_render_is_deterministic():
  a = embedded.make_example(embedded.BuildArgs(image_size=32), "train", 7)
  b = embedded.make_example(embedded.BuildArgs(image_size=32), "train", 7)
  assert a["image"] == b["image"] and a["caption"] == b["caption"]


def test_text_rich_scenes_keep_the_scene_and_always_carry_small_text():
  """text_rich=1: the same objects as the default build, plus text in every image, inside one half;
  the corpus (hence the tokenizer) is unchanged."""
  from vlm.data import scenes

  assert embedded.BuildArgs(text_rich=1).config_name == "textrich"
  assert embedded.BuildArgs().config_name == "default"
  for i in range(20):
    plain = scenes.sample_scene(np.random.default_rng([0, 0, i]), embedded.combos("train"), video=False)
    rich = scenes.sample_scene(np.random.default_rng([0, 0, i]), embedded.combos("train"), video=False, text_rich=True)
    assert rich.main == plain.main and rich.distractors == plain.distractors
    assert rich.text and rich.text_xy[0] in (0.25, 0.75) and rich.text_scale < plain.text_scale
    ex = embedded.make_example(embedded.BuildArgs(text_rich=1), "test", i)
    assert ex["text"] and "what does the text say?" in ex["questions"]
  assert embedded.corpus(embedded.BuildArgs(num_train=50, text_rich=1)) == embedded.corpus(
    embedded.BuildArgs(num_train=50)
  )
