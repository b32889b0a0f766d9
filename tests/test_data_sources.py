"""Sources on small files the tests write: JSONL, CSV, webdataset tars, conversion, bad input."""

import io
import json

import numpy as np
import pytest
from conftest import write_tar
from PIL import Image

from vlm.data import embedded, get_default_config, load_split_numpy, make_pipeline
from vlm.data.convert import convert
from vlm.data.sources import read_manifest


def _jpeg(value: int, size: int = 40) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.full((size, size + 8, 3), value, np.uint8)).save(buf, format="JPEG")
  return buf.getvalue()


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
  return embedded.tokenizer_path(
    str(tmp_path_factory.mktemp("tok")), num_train=40, num_validation=4, num_test=4, image_size=16
  )


@pytest.fixture
def files(tmp_path):
  """6 JPEGs; #4 is corrupt, #5 is missing on disk."""
  for i in range(5):
    (tmp_path / f"img{i}.jpg").write_bytes(_jpeg(40 * i))
  (tmp_path / "img4.jpg").write_bytes(b"not a jpeg at all")
  return tmp_path


def _config(source, tok_path, **kw):
  c = get_default_config()
  c.source = source
  c.tokenizer = tok_path
  c.pp_eval = "resize(32)|value_range(0, 1)"
  for k, v in kw.items():
    c[k] = v
  return c


ROWS = [
  ("img0.jpg", "a dark square"),
  ("img1.jpg", "a grey square"),
  ("img2.jpg", ""),
  ("img3.jpg", "a light square"),
  ("img4.jpg", "corrupt"),
  ("img5.jpg", "missing"),
]


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps({"image": im, "caption": cap}) + "\n" for im, cap in rows))


def test_jsonl_source_skips_and_counts_bad(files, tok_path):
  _write_jsonl(files / "m.jsonl", ROWS)
  arrays, meta = load_split_numpy(_config(f"jsonl:{files}/m.jsonl", tok_path), "train")
  assert arrays["image"].shape == (3, 32, 32, 3)
  assert meta["stats"]["skipped/empty_caption"] == 1
  assert meta["stats"]["skipped/corrupt_image"] == 1
  assert meta["stats"]["skipped/missing_image"] == 1
  assert meta["stats"]["skipped"] == 3 and meta["stats"]["examples"] == 3


def test_strict_mode_raises_with_location(files, tok_path):
  _write_jsonl(files / "m.jsonl", ROWS)
  it = make_pipeline(
    _config(f"jsonl:{files}/m.jsonl", tok_path, strict=True),
    split="train",
    batch_size=2,
    mesh=None,
    seed=0,
    shuffle=False,
    num_epochs=1,
  )
  with pytest.raises(ValueError, match=r"m.jsonl:3.*empty_caption"):
    list(it)


def test_csv_source_with_split_placeholder(files, tok_path):
  (files / "train.csv").write_text(
    "image,caption,label\n" + "".join(f"{im},{cap},{i}\n" for i, (im, cap) in enumerate(ROWS[:2] + ROWS[3:4]))
  )
  arrays, _ = load_split_numpy(_config(f"csv:{files}/{{split}}.csv", tok_path), "train")
  assert arrays["label"].tolist() == [0, 1, 2]


@pytest.mark.parametrize(
  "text,match",
  [
    ('{"image": "a.jpg", "caption": "ok"}\n{"image": "b.jpg", "caption": \n', r"m.jsonl:2: invalid JSON"),
    ('{"image": "a.jpg", "caption": "ok"}\n\n["a.jpg", "x"]\n', r"m.jsonl:3: expected an object"),
    ('{"caption": "no image"}\n', r"m.jsonl:1: missing image path"),
    ('{"image": "a.jpg", "caption": 5}\n', r"m.jsonl:1: missing caption"),
  ],
)
def test_malformed_jsonl_lines(tmp_path, text, match):
  (tmp_path / "m.jsonl").write_text(text)
  with pytest.raises(ValueError, match=match):
    read_manifest(str(tmp_path / "m.jsonl"))


def test_malformed_csv_line(tmp_path):
  (tmp_path / "m.csv").write_text("image,caption\na.jpg,ok\nb.jpg,too,many\n")
  with pytest.raises(ValueError, match=r"m.csv:3: expected 2 fields"):
    read_manifest(str(tmp_path / "m.csv"))


@pytest.fixture
def shards(tmp_path):
  """img2dataset layout: KEY.jpg, KEY.txt, KEY.json; one bad of each kind."""
  write_tar(
    tmp_path / "00000.tar",
    [
      ("00000/000000000.jpg", _jpeg(10)),
      ("00000/000000000.txt", b"a dark square"),
      ("00000/000000000.json", b'{"caption": "a dark square", "status": "success"}'),
      ("00000/000000001.jpg", _jpeg(100)),
      ("00000/000000001.json", b'{"caption": "a grey square"}'),
      ("00000/000000002.jpg", b"\xff\xd8garbage"),
      ("00000/000000002.txt", b"corrupt"),
    ],
  )
  write_tar(
    tmp_path / "00001.tar",
    [
      ("000000003.jpg", _jpeg(200)),
      ("000000003.txt", b"a light square"),
      ("000000004.txt", b"caption without image"),
      ("000000005.jpg", _jpeg(250)),
      ("000000005.txt", b"   "),
    ],
  )
  return tmp_path


def test_webdataset_source(shards, tok_path):
  arrays, meta = load_split_numpy(_config(f"wds:{shards}/*.tar", tok_path), "train")
  assert arrays["image"].shape == (3, 32, 32, 3)
  s = meta["stats"]
  assert (s["skipped/corrupt_image"], s["skipped/missing_image"], s["skipped/empty_caption"]) == (1, 1, 1)


def test_convert_webdataset_to_array_record_and_read_by_tfds_name(shards, tok_path, tmp_path):
  name, skipped = convert(f"wds:{shards}/*.tar", "toy_pairs", str(tmp_path / "tfds"))
  assert name == "vlm_image_text/toy_pairs"
  assert skipped == {"corrupt_image": 1, "missing_image": 1, "empty_caption": 1}
  assert list((tmp_path / "tfds" / "vlm_image_text" / "toy_pairs" / "1.0.0").glob("*.array_record*"))
  c = _config(f"tfds:{name}", tok_path, data_dir=str(tmp_path / "tfds"))
  arrays, _ = load_split_numpy(c, "train")
  assert arrays["image"].shape == (3, 32, 32, 3)


def test_tfds_source_by_name(tmp_path, tok_path):
  kw = dict(num_train=16, num_validation=4, num_test=8, image_size=16)
  embedded.build(str(tmp_path), **kw)
  c = _config(f"tfds:{embedded.tfds_name(**kw)}", tok_path, data_dir=str(tmp_path))
  arrays, meta = load_split_numpy(c, "test")
  assert arrays["image"].shape == (8, 32, 32, 3) and len(meta["class_names"]) == 56
