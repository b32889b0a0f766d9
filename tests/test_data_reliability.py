"""Data-side reliability (issue 24) on real faults in files the tests write: caps on bad examples (no hang,
with prefetch and grain workers), skip counters in the iterator state, non-UTF-8 manifests, paths that
escape their root (manifests, tar members, safetensors indexes), oversized images, brace-expanded shards."""

import io
import json
import threading
import time
import warnings

import numpy as np
import pytest
from conftest import write_tar
from PIL import Image, ImageFile

from vlm.convert.safetensors_io import load_safetensors_dir
from vlm.data import embedded, get_default_config, load_split_numpy, make_pipeline
from vlm.data import sources
from vlm.data.convert import open_source
from vlm.data.pipeline import STATS_STATE_KEY, TooManyBadExamples, check_config


def _png(value: int, size: int = 8) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
  return embedded.tokenizer_path(
    str(tmp_path_factory.mktemp("tok")), num_train=40, num_validation=4, num_test=4, image_size=16
  )


def _config(source, tok_path, **kw):
  c = get_default_config()
  c.source = source
  c.tokenizer = tok_path
  c.pp_train = c.pp_eval = "resize(16)|value_range(0, 1)"
  c.text_length = 8
  for k, v in kw.items():
    c[k] = v
  return c


def _manifest(tmp_path, n: int, bad: set[int], name: str = "m.jsonl") -> str:
  """n rows of real PNGs in tmp_path/<name>-img; the rows in `bad` name images that do not exist."""
  img = f"{name.split('.')[0]}-img"
  (tmp_path / img).mkdir()
  lines = []
  for i in range(n):
    if i not in bad:
      (tmp_path / img / f"{i}.png").write_bytes(_png(i % 256))
    lines.append(json.dumps({"image": f"{img}/{i}.png", "caption": f"square number {i}"}))
  path = tmp_path / name
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def _next_within(it, seconds: float = 30.0):
  """next(it) on a helper thread: (kind, value), kind 'ok' / 'error', or a failed test if it hangs."""
  out: list = []

  def run():
    try:
      out.append(("ok", next(it)))
    except BaseException as e:  # noqa: BLE001
      out.append(("error", e))

  t = threading.Thread(target=run, daemon=True)
  t.start()
  t.join(seconds)
  assert out, f"next() did not return within {seconds} s (the pipeline hangs)"
  return out[0]


# -- 1. caps on bad examples ---------------------------------------------------------------------------


@pytest.mark.parametrize("prefetch", [0, 2])
def test_all_images_missing_raises_instead_of_hanging(tmp_path, tok_path, prefetch):
  path = _manifest(tmp_path, 12, bad=set(range(12)))  # a wrong image root: every image is missing
  it = make_pipeline(
    _config(f"jsonl:{path}", tok_path, max_consecutive_bad=30, prefetch=prefetch),
    split="train",
    batch_size=4,
    mesh=None,
    seed=0,
  )  # shuffled, repeated forever
  start = time.monotonic()
  kind, err = _next_within(it)
  assert kind == "error" and isinstance(err, TooManyBadExamples), err
  assert time.monotonic() - start < 10
  msg = str(err)
  assert "31 bad examples in a row" in msg and "data.max_consecutive_bad=30" in msg
  assert path in msg and "missing_image: 31" in msg
  assert "m.jsonl:" in msg and "No such file" in msg  # one example: its manifest line and the OS error
  assert isinstance(err, RuntimeError)


def test_bad_cap_reaches_the_consumer_from_grain_workers(tmp_path, tok_path):
  path = _manifest(tmp_path, 8, bad=set(range(8)))
  it = make_pipeline(
    _config(f"jsonl:{path}", tok_path, max_consecutive_bad=10, worker_count=1, prefetch=2),
    split="train",
    batch_size=4,
    mesh=None,
    seed=0,
  )
  kind, err = _next_within(it, 60)
  assert kind == "error" and isinstance(err, TooManyBadExamples), err
  assert "missing_image: 11" in str(err) and path in str(err)
  it.close()


def _drain(it, batches: int) -> None:
  for _ in range(batches):
    kind, value = _next_within(it)
    if kind == "error":
      raise value


def test_bad_fraction_cap_trips_at_80_percent_not_at_10(tmp_path, tok_path):
  rng = np.random.default_rng(0)
  mostly_bad = _manifest(tmp_path, 50, bad=set(rng.choice(50, 40, replace=False).tolist()), name="bad.jsonl")
  mostly_good = _manifest(tmp_path, 50, bad=set(range(0, 50, 10)), name="good.jsonl")
  caps = dict(max_consecutive_bad=None, max_bad_fraction=0.5, bad_window=20, prefetch=0)
  it = make_pipeline(_config(f"jsonl:{mostly_bad}", tok_path, **caps), split="train", batch_size=4, mesh=None, seed=0)
  with pytest.raises(TooManyBadExamples, match=r"of the last 20 examples were bad.*data.max_bad_fraction=0.5"):
    _drain(it, 20)
  it = make_pipeline(
    _config(f"jsonl:{mostly_good}", tok_path, **caps), split="train", batch_size=4, mesh=None, seed=0, num_epochs=3
  )
  n = sum(len(b["label"]) for b in it)
  assert n == 4 * (3 * 45 // 4) and it.stats()["skipped/missing_image"] == 15


def test_check_config_validates_the_new_keys():
  c = get_default_config()
  assert (c.max_consecutive_bad, c.max_bad_fraction, c.bad_window) == (1000, 0.5, 10000)
  assert c.max_image_pixels == 64_000_000 and c.allow_absolute_paths is False and c.image_root is None
  check_config(c)
  for key, value in [
    ("max_consecutive_bad", 0),
    ("bad_window", -3),
    ("max_image_pixels", -5),
    ("max_bad_fraction", 0.0),
    ("max_bad_fraction", 2),
  ]:
    bad = get_default_config()
    bad[key] = value
    with pytest.raises(ValueError, match=f"data.{key}"):
      check_config(bad)
  off = get_default_config()
  off.max_consecutive_bad = off.max_bad_fraction = off.max_image_pixels = None
  check_config(off)


# -- 2. skip counters in the checkpointed state --------------------------------------------------------


@pytest.mark.parametrize("prefetch", [0, 2])
def test_state_carries_the_skip_counters(tmp_path, tok_path, prefetch):
  path = _manifest(tmp_path, 20, bad={1, 5, 6, 13})
  c = _config(f"jsonl:{path}", tok_path, prefetch=prefetch)
  it = make_pipeline(c, split="train", batch_size=4, mesh=None, seed=1)
  for _ in range(6):
    next(it)
  before = it.stats()
  assert before["batches"] == 6 and before["examples"] == 24 and before["skipped/missing_image"] > 0
  state = json.loads(json.dumps(it.get_state()))  # as the checkpoint writes it
  resumed = make_pipeline(c, split="train", batch_size=4, mesh=None, seed=1)
  resumed.set_state(state)
  assert resumed.stats() == before
  assert state[STATS_STATE_KEY]["batches"] == 6
  for _ in range(3):
    want, got = next(it), next(resumed)
    np.testing.assert_array_equal(got["label"], want["label"])
  assert resumed.stats() == it.stats() and resumed.stats()["batches"] == 9
  # A state written before the counters were saved: grain's part alone still resumes the stream.
  old = make_pipeline(c, split="train", batch_size=4, mesh=None, seed=1)
  old.set_state({k: v for k, v in state.items() if k != STATS_STATE_KEY})
  assert old.stats().get("batches", 0) == 0
  resumed.set_state(state)
  np.testing.assert_array_equal(next(old)["label"], next(resumed)["label"])
  for x in (it, resumed, old):
    x.close()


# -- 3. non-UTF-8 manifests ----------------------------------------------------------------------------


def test_non_utf8_manifest_line_names_file_and_line(tmp_path):
  good = json.dumps({"image": "a.png", "caption": "fine"}).encode()
  (tmp_path / "m.jsonl").write_bytes(good + b"\n" + good + b"\n" + b'{"image": "b.png", "caption": "\xff\xfe"}\n')
  with pytest.raises(ValueError, match=r"m\.jsonl:3: not UTF-8"):
    sources.read_manifest(str(tmp_path / "m.jsonl"))
  (tmp_path / "m.csv").write_bytes(b"image,caption\na.png,fine\nb.png,\xff\xfe\n")
  with pytest.raises(ValueError, match=r"m\.csv:3: not UTF-8"):
    sources.read_manifest(str(tmp_path / "m.csv"))
  (tmp_path / "d.jsonl").write_bytes(b'{"texts": ["\xff\xfe"], "images": [null]}\n')
  with pytest.raises(ValueError, match=r"d\.jsonl:1: not UTF-8"):
    sources.DocumentSource(str(tmp_path / "d.jsonl"))


# -- 4. paths that escape their root -------------------------------------------------------------------


def test_manifest_paths_outside_the_root_are_refused(tmp_path, tok_path):
  data = tmp_path / "data"
  data.mkdir()
  (data / "in.png").write_bytes(_png(10))
  (tmp_path / "secret.png").write_bytes(_png(200))  # outside the manifest's directory
  m = data / "m.jsonl"
  rows = [{"image": "in.png", "caption": "inside"}, {"image": "../secret.png", "caption": "escapes"}]
  m.write_text("".join(json.dumps(r) + "\n" for r in rows))
  with pytest.raises(ValueError, match=r"m\.jsonl:2: image path '\.\./secret\.png' is outside the image root"):
    sources.ManifestSource(str(m))
  rows[1]["image"] = str(tmp_path / "secret.png")  # absolute
  m.write_text("".join(json.dumps(r) + "\n" for r in rows))
  with pytest.raises(ValueError, match=r"m\.jsonl:2: image path '/.*secret\.png' is outside"):
    make_pipeline(_config(f"jsonl:{m}", tok_path), split="train", batch_size=2, mesh=None, seed=0)
  (data / "m.csv").write_text("image,caption\nin.png,inside\nsub/../../secret.png,escapes\n")
  with pytest.raises(ValueError, match=r"m\.csv:3: image path 'sub/\.\./\.\./secret\.png'"):
    sources.ManifestSource(str(data / "m.csv"))
  (data / "d.jsonl").write_text(json.dumps({"texts": ["a", None], "images": [None, "../secret.png"]}) + "\n")
  with pytest.raises(ValueError, match=r"d\.jsonl:1: image path '\.\./secret\.png'"):
    sources.DocumentSource(str(data / "d.jsonl"))
  # data.allow_absolute_paths reads them as written; data.image_root moves the root.
  arrays, _ = load_split_numpy(_config(f"jsonl:{m}", tok_path, allow_absolute_paths=True), "train")
  assert len(arrays["label"]) == 2
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "in.png").write_bytes(_png(30))
  (data / "n.jsonl").write_text(json.dumps({"image": "in.png", "caption": "root moved"}) + "\n")
  src = sources.ManifestSource(str(data / "n.jsonl"), image_root=str(tmp_path / "other"))
  assert src[0]["image_path"] == str(tmp_path / "other" / "in.png")
  with pytest.raises(ValueError, match="data.image_root"):
    make_pipeline(
      _config(f"jsonl:{data}/n.jsonl", tok_path, image_root=str(tmp_path / "nope")),
      split="train",
      batch_size=2,
      mesh=None,
      seed=0,
    )


@pytest.mark.parametrize("member", ["../evil.png", "/abs/evil.png", "ok/../../evil.png"])
def test_tar_members_outside_the_shard_are_refused(tmp_path, member):
  write_tar(tmp_path / "00000.tar", [("good.png", _png(5)), ("good.txt", b"fine"), (member, _png(9))])
  with pytest.raises(ValueError, match=rf"00000\.tar: tar member '{member}' has an absolute path or '\.\.'"):
    sources.WebDatasetSource(str(tmp_path / "*.tar"))


def test_safetensors_index_shards_outside_the_directory_are_refused(tmp_path):
  from safetensors.numpy import save_file

  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  save_file({"a": np.ones(2, np.float32)}, str(ckpt / "model-00001.safetensors"))
  save_file({"b": np.zeros(3, np.float32)}, str(tmp_path / "outside.safetensors"))
  index = ckpt / "model.safetensors.index.json"
  index.write_text(json.dumps({"weight_map": {"a": "model-00001.safetensors"}}))
  assert load_safetensors_dir(ckpt)["a"].tolist() == [1, 1]
  for shard in ["../outside.safetensors", str(tmp_path / "outside.safetensors"), "../../etc/x.safetensors"]:
    index.write_text(json.dumps({"weight_map": {"a": "model-00001.safetensors", "b": shard}}))
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: weight_map shard '.*' is outside"):
      load_safetensors_dir(ckpt)


# -- 5. images too large to decode ---------------------------------------------------------------------


def test_huge_png_is_too_large_before_any_decode(monkeypatch):
  buf = io.BytesIO()
  Image.new("1", (11000, 11000)).save(buf, format="PNG")  # 121 MP, a few KB; 363 MB as RGB
  data = buf.getvalue()
  assert len(data) < 200_000

  def no_decode(self, *a, **k):
    raise AssertionError("the image was decoded")

  monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
  rec = {"image": data, "caption": "a bomb"}
  with pytest.raises(sources.BadExample, match=r"11000 x 11000 = 121000000 pixels > data.max_image_pixels") as e:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      sources.decode_record(rec)  # the default limit, 64 MP
  assert e.value.reason == "too_large"
  # PIL's own bomb warning (as an error) and error are the same bad example, not a crash.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    with pytest.raises(sources.BadExample) as e:
      sources.decode_record(rec, max_pixels=None)
  assert e.value.reason == "too_large"
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
  with pytest.raises(sources.BadExample) as e:
    sources.decode_record(rec, max_pixels=None)
  assert e.value.reason == "too_large" and "DecompressionBomb" not in type(e.value).__name__


def test_oversized_images_are_skipped_and_counted(tmp_path, tok_path):
  for i in range(6):
    (tmp_path / f"{i}.png").write_bytes(_png(40 * i, size=100 if i in (1, 4) else 20))
  (tmp_path / "m.jsonl").write_text(
    "".join(json.dumps({"image": f"{i}.png", "caption": f"image {i}"}) + "\n" for i in range(6))
  )
  arrays, meta = load_split_numpy(_config(f"jsonl:{tmp_path}/m.jsonl", tok_path, max_image_pixels=5000), "train")
  assert len(arrays["label"]) == 4
  assert meta["stats"]["skipped/too_large"] == 2 and meta["stats"]["skipped"] == 2
  arrays, meta = load_split_numpy(_config(f"jsonl:{tmp_path}/m.jsonl", tok_path, max_image_pixels=None), "train")
  assert len(arrays["label"]) == 6


# -- 6. brace expansion in shard patterns --------------------------------------------------------------


def test_expand_braces():
  e = sources.expand_braces
  assert e("/d/{00000..00003}.tar") == [f"/d/0000{i}.tar" for i in range(4)]
  assert e("{8..11}") == ["8", "9", "10", "11"] and e("{08..11}") == ["08", "09", "10", "11"]
  assert e("{3..1}") == ["3", "2", "1"] and e("{0..6..3}") == ["0", "3", "6"]
  assert e("{a,b{1..2}}-{x,y}") == ["a-x", "a-y", "b1-x", "b1-y", "b2-x", "b2-y"]
  assert e("shards/{split}.tar") == ["shards/{split}.tar"] and e("a{b") == ["a{b"] and e("plain") == ["plain"]


def test_brace_expanded_shard_patterns(tmp_path, tok_path):
  for s in range(3):
    write_tar(
      tmp_path / f"{s:05d}.tar",
      [(f"{s}{k}.png", _png(s * 50 + k)) for k in range(2)]
      + [(f"{s}{k}.txt", f"shard {s} sample {k}".encode()) for k in range(2)],
    )
  src = sources.WebDatasetSource(f"{tmp_path}/{{00000..00002}}.tar")
  assert src.shards == [str(tmp_path / f"{s:05d}.tar") for s in range(3)] and len(src) == 6
  assert open_source(f"wds:{tmp_path}/{{00002,00000}}.tar").shards == [
    str(tmp_path / "00002.tar"),
    str(tmp_path / "00000.tar"),
  ]
  arrays, _ = load_split_numpy(_config(f"wds:{tmp_path}/{{00000..00001}}.tar", tok_path), "train")
  assert len(arrays["label"]) == 4
  with pytest.raises(FileNotFoundError, match=r"shard '.*00003\.tar' \(from the pattern"):
    sources.WebDatasetSource(f"{tmp_path}/{{00000..00003}}.tar")
  with pytest.raises(FileNotFoundError, match="no tar shards match"):
    sources.WebDatasetSource(f"{tmp_path}/nothing-*.tar")
