"""Random-access data sources and the decoding of their records.

A source has `__len__`, `__getitem__(i) -> record dict`, `describe(i) -> str`
(where record i comes from, for error messages) and `metadata` (class names,
templates, ...). Sources:

- `TfdsSource`: any prepared TFDS dataset by name (`tfds.data_source`, no
  TensorFlow needed to *read* ArrayRecord datasets); without a data_dir, TFDS' default
  directories, then $VLM_DATA_DIR or ~/.cache/vlm/data (where `vlm.data.convert` and `vlm.curate`
  write by default). Preparing many catalogue
  datasets (`tfds build NAME`) needs TensorFlow, which this project does not
  install: prepare them on a machine that has it, in ArrayRecord format
  (`--file_format=array_record`), and point `data.data_dir` at the result.
- `ManifestSource`: JSONL (one object per line) or CSV (header row) with an image
  path (`image`, `image_path`, `path` or `file`) and a caption (`data.caption_key`,
  else `caption` or `text`), optional `label`; or, for clips, a video path (`video` or `video_path`: a
  video file, an animated gif or a directory of frames, read by vlm.data.video.read_video into the
  example's `frames`, whose middle frame is the `image` unless one is given). Paths are relative to the image
  root (`data.image_root`, default the manifest's directory) and must stay inside it:
  an absolute path or one whose '..' leaves the root is refused (ValueError naming
  file, line and path) unless `data.allow_absolute_paths=True`. The check is on the
  path as written: symlinks under the root are followed. Malformed lines, including
  bytes that are not UTF-8, raise ValueError "FILE:LINE: ...".
- `DocumentSource`: interleaved image-text documents, JSONL in OBELICS' layout (parallel lists
  `texts` / `images`, null where the position holds the other kind).
- `WebDatasetSource`: webdataset tar shards as img2dataset writes them
  (`KEY.jpg` + `KEY.txt` and/or `KEY.json` with a "caption"), read in place
  through an index of member offsets (stdlib `tarfile`). The shard pattern takes
  brace ranges and lists as webdataset writes them (`{00000..00099}`, `{a,b}`, see
  `expand_braces`) and glob wildcards; a named shard that does not exist is an error
  naming it. A member named with '..' or an absolute path is refused.

`decode_record` turns a record into an example (uint8 image, str texts) or
raises `BadExample(reason)` for a missing/corrupt image, an empty caption, or an
image of more than `max_pixels` pixels (reason 'too_large', read from the image
header before any pixel is decoded: a 117 KB PNG can hold 11000 x 11000 pixels,
363 MB as RGB).
"""

from __future__ import annotations

import csv
import glob as globlib
import io
import json
import os
import re
import tarfile
from typing import Any

import numpy as np
from PIL import Image

from vlm.data import video
from vlm.data.tfds_compat import import_tfds

IMAGE_KEYS = ("image", "image_path", "path", "file")
VIDEO_KEYS = ("video", "video_path")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
BAD_REASONS = ("missing_image", "corrupt_image", "empty_caption", "bad_document", "too_large", "bad_clip")
# Default pixel limit of decode_record (data.max_image_pixels): 64 MP holds every camera image up to
# 8000 x 8000 (a 50 MP 8688 x 5792 photo included) and caps one decode at 192 MB of RGB, and it is
# below PIL's own bomb warning (Image.MAX_IMAGE_PIXELS, ~89 MP), so our check decides first.
MAX_IMAGE_PIXELS = 64_000_000


class BadExample(Exception):
  """A record that cannot make an example; `reason` is one of BAD_REASONS."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}")
    self.reason = reason
    self.detail = detail


# ----------------------------------------------------------------- decoding


def to_str(value: Any) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray) and value.ndim == 0:
    return to_str(value.item())
  return "" if value is None else str(value)


def decode_image(data: bytes | np.ndarray, max_pixels: int | None = None) -> np.ndarray:
  """Encoded bytes or an array -> [H, W, 3] uint8.

  max_pixels: encoded images with more pixels raise BadExample('too_large'), checked on the
  header (PIL's `Image.open` reads no pixels) so the image is never decoded; PIL's own
  decompression-bomb error (and its warning, where warnings are errors) gives the same.
  """
  if isinstance(data, np.ndarray) and data.dtype != object:
    img = data
    if img.ndim == 2:
      img = img[..., None]
    if img.shape[-1] == 1:
      img = np.repeat(img, 3, axis=-1)
    return np.asarray(img, np.uint8)
  if isinstance(data, np.ndarray):
    data = data.item()
  try:
    pil = Image.open(io.BytesIO(data))
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise BadExample("too_large", f"{e} (PIL's Image.MAX_IMAGE_PIXELS)") from None
  with pil:
    w, h = pil.size
    if max_pixels is not None and w * h > max_pixels:
      raise BadExample("too_large", f"{w} x {h} = {w * h} pixels > data.max_image_pixels={max_pixels}")
    return np.asarray(pil.convert("RGB"))


def _decode_checked(data: Any, max_pixels: int | None, where: str = "") -> np.ndarray:
  """decode_image, its failures as BadExample: 'too_large' as raised, anything else 'corrupt_image'."""
  prefix = f"{where}: " if where else ""
  try:
    return decode_image(data, max_pixels)
  except BadExample as e:
    raise BadExample(e.reason, prefix + e.detail) from None
  except Exception as e:  # noqa: BLE001  (PIL raises many types on bad data)
    raise BadExample("corrupt_image", f"{prefix}{type(e).__name__}: {e}") from None


def _read_image(data: Any, where: str, max_pixels: int | None = MAX_IMAGE_PIXELS) -> np.ndarray:
  if isinstance(data, str):  # a path (document manifests)
    try:
      with open(data, "rb") as f:
        data = f.read()
    except OSError as e:
      raise BadExample("missing_image", f"{where}: {e}") from None
  return _decode_checked(data, max_pixels, where)


def decode_document(rec: dict, max_pixels: int | None = MAX_IMAGE_PIXELS) -> dict:
  """An interleaved document in OBELICS' layout (parallel lists 'texts' and 'images', each position
  a paragraph or an image: bytes, a path, or '' / None) -> example with 'document' [(kind, value)]
  in order ('text', str) / ('image', uint8 [H, W, 3]), 'caption' (its text), and questions,
  answers, label, seen if given. Raises BadExample for mismatched lists or no image."""
  texts, images = list(rec["texts"]), list(rec["images"])
  if len(texts) != len(images):
    raise BadExample("bad_document", f"{len(texts)} texts but {len(images)} images (parallel lists)")
  items: list[tuple[str, Any]] = []
  for pos, (text, image) in enumerate(zip(texts, images)):
    text = to_str(text).strip()
    has_image = image is not None and not (isinstance(image, (bytes, str)) and len(image) == 0)
    if has_image and text:
      raise BadExample("bad_document", f"position {pos} holds both a text and an image")
    if has_image:
      items.append(("image", _read_image(image, f"image at position {pos}", max_pixels)))
    elif text:
      items.append(("text", text))
  if not any(kind == "image" for kind, _ in items):
    raise BadExample("missing_image", "document has no image")
  ex: dict[str, Any] = {
    "document": items,
    "caption": " ".join(v for k, v in items if k == "text"),
    "label": np.int32(rec.get("label", -1)),
    "seen": bool(rec.get("seen", True)),
  }
  for key in ("questions", "answers"):
    if key in rec:
      ex[key] = [to_str(v) for v in rec[key]]
  return ex


def decode_record(
  rec: dict,
  caption_key: str = "caption",
  max_pixels: int | None = MAX_IMAGE_PIXELS,
  max_frames: int = video.MAX_VIDEO_FRAMES,
) -> dict:
  """Record -> example with 'image' uint8 [H, W, 3] and str texts; raises BadExample.
  A document (a record with 'texts' and 'images') goes through decode_document.
  max_pixels (None: no limit): images (and frames) larger than that are BadExample('too_large').
  A record with a 'video_path' gets 'frames' [T, H, W, 3] from vlm.data.video.read_video (clips of more
  than max_frames frames are BadExample('too_large')) and, without an image of its own, its middle frame."""
  if "texts" in rec and "images" in rec:
    return decode_document(rec, max_pixels)
  ex: dict[str, Any] = {}
  if rec.get("video_path") is not None:
    ex["frames"] = _read_clip(rec["video_path"], max_pixels, max_frames)
  data = rec.get("image")
  if data is None and rec.get("image_path") is None and "frames" in ex:
    data = ex["frames"][len(ex["frames"]) // 2]
  if data is None and rec.get("image_path") is not None:
    path = rec["image_path"]
    try:
      with open(path, "rb") as f:
        data = f.read()
    except OSError as e:
      raise BadExample("missing_image", f"{path}: {e}") from None
  if data is None or (isinstance(data, (bytes, str)) and len(data) == 0):
    raise BadExample("missing_image", "record has no image")
  ex["image"] = _decode_checked(data, max_pixels, rec.get("image_path") or "")
  caption = to_str(rec.get(caption_key, rec.get("caption", ""))).strip()
  if not caption:
    raise BadExample("empty_caption", f"empty {caption_key!r}")
  ex["caption"] = caption
  for key in ("caption_detailed", "text"):
    if key in rec:
      ex[key] = to_str(rec[key])
  for key in ("questions", "answers", "subtitles"):
    if key in rec:
      ex[key] = [to_str(v) for v in rec[key]]
  ex["label"] = np.int32(rec.get("label", -1))
  ex["seen"] = bool(rec.get("seen", True))
  if "boxes" in rec:
    ex["boxes"] = np.asarray(rec["boxes"], np.float32).reshape(-1, 4)
    ex["box_labels"] = np.asarray(rec.get("box_labels", np.zeros(len(ex["boxes"]))), np.int32)
  if "frames" not in ex and "frames" in rec and len(rec["frames"]):
    frames = [_decode_checked(f, max_pixels, "frames") for f in rec["frames"]]
    try:
      ex["frames"] = np.stack(frames)
    except ValueError as e:
      raise BadExample("corrupt_image", f"frames: {e}") from None
  if "motion" in rec:
    ex["motion"] = np.int32(rec["motion"])
  return ex


def _read_clip(path: str, max_pixels: int | None, max_frames: int) -> np.ndarray:
  """A manifest's clip -> uint8 frames [T, H, W, 3]; BadExample for a missing, unreadable or too large one."""
  if not os.path.exists(path):
    raise BadExample("missing_image", f"{path}: no such video")
  try:
    frames = video.read_video(path, max_frames)
  except video.VideoTooLong as e:
    raise BadExample("too_large", str(e)) from None
  except ValueError as e:
    raise BadExample("corrupt_image", str(e)) from None
  if max_pixels is not None and frames.shape[1] * frames.shape[2] > max_pixels:
    raise BadExample("too_large", f"{path}: {frames.shape[2]} x {frames.shape[1]} frames > {max_pixels} pixels")
  return frames


# ----------------------------------------------------------------- TFDS


class TfdsSource:
  """A prepared TFDS dataset split, random access without TensorFlow."""

  def __init__(self, name: str, split: str, data_dir: str | None = None):
    tfds = import_tfds()
    self.name, self.split = name, split
    try:  # read the prepared files; needs no builder class (nor TensorFlow)
      builder = tfds.core.read_only_builder.builder_from_files(name, data_dir=data_dir)
    except Exception:  # noqa: BLE001  (e.g. not found: let tfds.builder explain)
      builder = None
      if data_dir is None:  # then where vlm.data.convert and vlm.curate write by default
        from vlm.data.embedded import default_data_dir

        try:
          builder = tfds.core.read_only_builder.builder_from_files(name, data_dir=default_data_dir())
        except Exception:  # noqa: BLE001
          builder = None
      if builder is None:
        builder = tfds.builder(name, data_dir=data_dir)
    self._ds = builder.as_data_source(split=split)
    info = builder.info
    self.features = info.features  # the TFDS FeaturesDict (curation writes records back with it)
    self.metadata = dict(info.metadata or {})
    label = info.features.get("label") if hasattr(info.features, "get") else None
    if "class_names" not in self.metadata and getattr(label, "names", None):
      self.metadata["class_names"] = list(label.names)

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, i: int) -> dict:
    return dict(self._ds[i])

  def describe(self, i: int) -> str:
    return f"tfds:{self.name}[{self.split}][{i}]"


# ----------------------------------------------------------------- manifests


def contained_path(root: str, path: str, where: str, allow_absolute_paths: bool = False) -> str:
  """`path` as a manifest writes it, joined to the directory `root`; ValueError naming `where` and
  the path if it is absolute or its '..' leave `root` (a manifest must not read files elsewhere),
  unless allow_absolute_paths. Checked on the path as written: symlinks under `root` are followed."""
  joined = os.path.normpath(os.path.join(root, path))
  if allow_absolute_paths:
    return joined
  root = os.path.normpath(root)
  if os.path.isabs(path) or os.path.commonpath([root, joined]) != root:
    raise ValueError(
      f"{where}: image path {path!r} is outside the image root {root} (absolute, or '..' "
      "leaves it); set data.image_root to the directory holding the images, or "
      "data.allow_absolute_paths=True to read paths as written"
    )
  return joined


def _manifest_record(obj: Any, base: str, caption_key: str, where: str, allow_absolute_paths: bool = False) -> dict:
  if not isinstance(obj, dict):
    raise ValueError(f"{where}: expected an object with image and caption, got {type(obj).__name__}")
  image = next((obj[k] for k in IMAGE_KEYS if k in obj), None)
  video = next((obj[k] for k in VIDEO_KEYS if k in obj), None)
  if video is not None and not isinstance(video, str):
    raise ValueError(f"{where}: video path ({' or '.join(VIDEO_KEYS)}) is not a string")
  if not isinstance(image, str) and not (image is None and video is not None):
    raise ValueError(f"{where}: missing image path (one of {IMAGE_KEYS}, or a video: {VIDEO_KEYS}) or not a string")
  keys = [caption_key, "caption", "text"]
  caption = next((obj[k] for k in keys if k in obj), None)
  if not isinstance(caption, str):
    raise ValueError(f"{where}: missing caption {caption_key!r} or not a string")
  rec: dict[str, Any] = {"caption": caption, "_where": where}
  if image is not None:
    rec["image_path"] = contained_path(base, image, where, allow_absolute_paths)
  if video is not None:
    rec["video_path"] = contained_path(base, video, where, allow_absolute_paths)
  if obj.get("label") not in (None, ""):
    try:
      rec["label"] = int(obj["label"])
    except (TypeError, ValueError):
      raise ValueError(f"{where}: label {obj['label']!r} is not an integer") from None
  return rec


def _image_root(path: str, image_root: str | None) -> str:
  """The directory manifest image paths are relative to: image_root, else the manifest's directory."""
  return os.path.abspath(image_root) if image_root else os.path.dirname(os.path.abspath(path))


def read_manifest(
  path: str, caption_key: str = "caption", image_root: str | None = None, allow_absolute_paths: bool = False
) -> list[dict]:
  """Parses a .jsonl or .csv manifest; ValueError "path:line: ..." on a malformed line (bad JSON,
  bytes that are not UTF-8, an image path outside the image root: see `contained_path`)."""
  base = _image_root(path, image_root)
  records = []
  if path.endswith(".csv"):
    reader = csv.reader(_text_lines(path))
    header = next(reader, None)
    if not header:
      raise ValueError(f"{path}:1: empty CSV, expected a header row")
    header = [h.strip() for h in header]
    for row in reader:
      where = f"{path}:{reader.line_num}"
      if not row:
        continue
      if len(row) != len(header):
        raise ValueError(f"{where}: expected {len(header)} fields {header}, got {len(row)}")
      records.append(_manifest_record(dict(zip(header, row)), base, caption_key, where, allow_absolute_paths))
  else:
    for where, obj in _jsonl_lines(path):
      records.append(_manifest_record(obj, base, caption_key, where, allow_absolute_paths))
  return records


def _text_lines(path: str):
  """The lines of a UTF-8 text file (line ends kept), decoded one by one so that bytes that are not
  UTF-8 raise ValueError 'FILE:LINE: ...' instead of a bare UnicodeDecodeError."""
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      try:
        yield raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(
          f"{path}:{lineno}: not UTF-8 text: byte {raw[e.start : e.start + 1]!r} at column "
          f"{e.start + 1} ({e.reason}); manifests must be UTF-8"
        ) from None


def _jsonl_lines(path: str):
  """(where 'FILE:LINE', parsed object) of each non-blank line; ValueError naming the line."""
  for lineno, line in enumerate(_text_lines(path), start=1):
    if not line.strip():
      continue
    where = f"{path}:{lineno}"
    try:
      yield where, json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: invalid JSON: {e.msg}") from None


class ManifestSource:
  """Image files listed in a JSONL or CSV manifest (paths under image_root: see `contained_path`)."""

  def __init__(
    self, path: str, caption_key: str = "caption", image_root: str | None = None, allow_absolute_paths: bool = False
  ):
    self.path = path
    self.records = read_manifest(path, caption_key, image_root, allow_absolute_paths)
    self.metadata: dict = {}

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i: int) -> dict:
    return dict(self.records[i])

  def describe(self, i: int) -> str:
    return self.records[i]["_where"]


class DocumentSource(ManifestSource):
  """Interleaved documents from a JSONL file, one per line in OBELICS' layout:
  {"texts": ["para", null, "para", ...], "images": [null, "a.png", null, ...]} (paths relative to
  image_root, default the file's directory, and inside it: see `contained_path`), optional
  "questions" / "answers" / "label". Malformed lines raise "FILE:LINE: ..."."""

  def __init__(self, path: str, image_root: str | None = None, allow_absolute_paths: bool = False):
    # ManifestSource's __len__, __getitem__ and describe serve these records
    self.path, self.records, self.metadata = path, [], {}
    base = _image_root(path, image_root)
    for where, obj in _jsonl_lines(path):
      if not isinstance(obj, dict) or not isinstance(obj.get("texts"), list) or not isinstance(obj.get("images"), list):
        raise ValueError(f"{where}: expected an object with lists 'texts' and 'images'")
      if len(obj["texts"]) != len(obj["images"]):
        raise ValueError(
          f"{where}: 'texts' has {len(obj['texts'])} entries, 'images' {len(obj['images'])}; they are parallel lists"
        )
      obj["images"] = [
        contained_path(base, im, where, allow_absolute_paths) if isinstance(im, str) and im else None
        for im in obj["images"]
      ]
      obj["_where"] = where
      self.records.append(obj)


# ----------------------------------------------------------------- webdataset


def _split_key(name: str) -> tuple[str, str]:
  dirname, base = os.path.split(name)
  stem, _, ext = base.partition(".")
  return os.path.join(dirname, stem), ext.lower()


def _check_member(path: str, name: str) -> None:
  """ValueError naming shard and member if a tar member's name is absolute or climbs out with '..'
  (webdataset keys are relative names; such a member is a broken or hostile shard)."""
  parts = name.replace("\\", "/").split("/")
  if name.startswith(("/", "\\")) or os.path.isabs(name) or ".." in parts:
    raise ValueError(f"{path}: tar member {name!r} has an absolute path or '..'; refusing the shard")


def index_tar(path: str) -> list[dict]:
  """One entry per sample KEY: image (offset, size) if any, and its caption/label."""
  samples: dict[str, dict] = {}
  with tarfile.open(path, "r:") as tar:
    for m in tar:
      if not m.isfile():
        continue
      _check_member(path, m.name)
      key, ext = _split_key(m.name)
      s = samples.setdefault(key, {"key": key, "caption": "", "_where": f"{path}:{key}"})
      if ext in IMAGE_EXTS:
        s["image_ref"] = (path, m.offset_data, m.size)
      elif ext == "txt":
        s["caption"] = tar.extractfile(m).read().decode("utf-8", "replace")
      elif ext == "json":
        try:
          meta = json.loads(tar.extractfile(m).read())
        except (json.JSONDecodeError, UnicodeDecodeError):
          meta = {}
        if isinstance(meta, dict):
          if not s["caption"] and isinstance(meta.get("caption"), str):
            s["caption"] = meta["caption"]
          if isinstance(meta.get("label"), int):
            s["label"] = meta["label"]
  return list(samples.values())


_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$")


def expand_braces(pattern: str) -> list[str]:
  """Bash / webdataset brace expansion: '{00000..00009}' (numeric ranges, optional step '{0..10..2}',
  descending too; zero-padded to the longer bound when a bound is written with a leading zero) and
  '{x,y,z}' (lists, nested allowed), every group of a pattern combined in order. A brace without a
  range or a top-level comma (e.g. '{split}') is kept as written."""
  depth, start = 0, -1
  for i, ch in enumerate(pattern):
    if ch == "{":
      if depth == 0:
        start = i
      depth += 1
    elif ch == "}" and depth:
      depth -= 1
      if depth == 0:
        body, head, tail = pattern[start + 1 : i], pattern[:start], pattern[i + 1 :]
        options = _brace_options(body)
        if options is None:  # literal: keep it, expand what follows
          return [head + "{" + body + "}" + t for t in expand_braces(tail)]
        return [head + o + t for o in options for t in expand_braces(tail)]
  return [pattern]


def _brace_options(body: str) -> list[str] | None:
  """The alternatives of one brace group's body, or None if it is not a range or a list."""
  m = _RANGE.match(body)
  if m:
    a, b, step = int(m.group(1)), int(m.group(2)), abs(int(m.group(3) or 1)) or 1
    padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-").startswith("0") for x in (m.group(1), m.group(2)))
    width = max(len(m.group(1)), len(m.group(2))) if padded else 0
    values = range(a, b + 1, step) if a <= b else range(a, b - 1, -step)
    return [f"{v:0{width}d}" for v in values]
  parts, depth, last = [], 0, 0
  for i, ch in enumerate(body):
    if ch == "{":
      depth += 1
    elif ch == "}":
      depth -= 1
    elif ch == "," and depth == 0:
      parts.append(body[last:i])
      last = i + 1
  if not parts:
    return None
  parts.append(body[last:])
  return [o for part in parts for o in expand_braces(part)]


def expand_shards(pattern: str) -> list[str]:
  """The shard files of a pattern: brace expansion (`expand_braces`), then glob wildcards. Files in
  the pattern's order (each wildcard's matches sorted), once each; FileNotFoundError naming the
  first shard named without wildcards that does not exist, or the pattern if nothing matches."""
  out: dict[str, None] = {}
  for p in expand_braces(pattern):
    if globlib.has_magic(p):
      out.update(dict.fromkeys(sorted(globlib.glob(p))))
    elif os.path.isfile(p):
      out[p] = None
    else:
      raise FileNotFoundError(f"shard {p!r} (from the pattern {pattern!r}) does not exist")
  if not out:
    raise FileNotFoundError(f"no tar shards match {pattern!r}")
  return list(out)


class WebDatasetSource:
  """Samples of webdataset tar shards named by a pattern (`expand_shards`), read in place."""

  def __init__(self, pattern: str):
    self.pattern = pattern
    self.shards = expand_shards(pattern)
    self.samples = [s for shard in self.shards for s in index_tar(shard)]
    self.metadata: dict = {}

  def __len__(self) -> int:
    return len(self.samples)

  def __getitem__(self, i: int) -> dict:
    s = dict(self.samples[i])
    ref = s.pop("image_ref", None)
    if ref is not None:
      path, offset, size = ref
      with open(path, "rb") as f:
        f.seek(offset)
        s["image"] = f.read(size)
    return s

  def describe(self, i: int) -> str:
    return self.samples[i]["_where"]
