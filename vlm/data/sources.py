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
  path (`image`, `image_path`, `path` or `file`; relative to the manifest) and a
  caption (`data.caption_key`, else `caption` or `text`), optional `label`.
  Malformed lines raise ValueError "FILE:LINE: ...".
- `DocumentSource`: interleaved image-text documents, JSONL in OBELICS' layout (parallel lists
  `texts` / `images`, null where the position holds the other kind).
- `WebDatasetSource`: webdataset tar shards as img2dataset writes them
  (`KEY.jpg` + `KEY.txt` and/or `KEY.json` with a "caption"), read in place
  through an index of member offsets (stdlib `tarfile`).

`decode_record` turns a record into an example (uint8 image, str texts) or
raises `BadExample(reason)` for a missing/corrupt image or empty caption.
"""
from __future__ import annotations

import csv
import glob as globlib
import io
import json
import os
import tarfile
from typing import Any

import numpy as np
from PIL import Image

from vlm.data.tfds_compat import import_tfds

IMAGE_KEYS = ("image", "image_path", "path", "file")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
BAD_REASONS = ("missing_image", "corrupt_image", "empty_caption", "bad_document")


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


def decode_image(data: bytes | np.ndarray) -> np.ndarray:
    """Encoded bytes or an array -> [H, W, 3] uint8."""
    if isinstance(data, np.ndarray) and data.dtype != object:
        img = data
        if img.ndim == 2:
            img = img[..., None]
        if img.shape[-1] == 1:
            img = np.repeat(img, 3, axis=-1)
        return np.asarray(img, np.uint8)
    if isinstance(data, np.ndarray):
        data = data.item()
    with Image.open(io.BytesIO(data)) as pil:
        return np.asarray(pil.convert("RGB"))


def _read_image(data: Any, where: str) -> np.ndarray:
    if isinstance(data, str):  # a path (document manifests)
        try:
            with open(data, "rb") as f:
                data = f.read()
        except OSError as e:
            raise BadExample("missing_image", f"{where}: {e}") from None
    try:
        return decode_image(data)
    except Exception as e:  # noqa: BLE001  (PIL raises many types on bad data)
        raise BadExample("corrupt_image", f"{where}: {type(e).__name__}: {e}") from None


def decode_document(rec: dict) -> dict:
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
            items.append(("image", _read_image(image, f"image at position {pos}")))
        elif text:
            items.append(("text", text))
    if not any(kind == "image" for kind, _ in items):
        raise BadExample("missing_image", "document has no image")
    ex: dict[str, Any] = {"document": items, "caption": " ".join(v for k, v in items if k == "text"),
                          "label": np.int32(rec.get("label", -1)), "seen": bool(rec.get("seen", True))}
    for key in ("questions", "answers"):
        if key in rec:
            ex[key] = [to_str(v) for v in rec[key]]
    return ex


def decode_record(rec: dict, caption_key: str = "caption") -> dict:
    """Record -> example with 'image' uint8 [H, W, 3] and str texts; raises BadExample.
    A document (a record with 'texts' and 'images') goes through decode_document."""
    if "texts" in rec and "images" in rec:
        return decode_document(rec)
    ex: dict[str, Any] = {}
    data = rec.get("image")
    if data is None and rec.get("image_path") is not None:
        path = rec["image_path"]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise BadExample("missing_image", f"{path}: {e}") from None
    if data is None or (isinstance(data, (bytes, str)) and len(data) == 0):
        raise BadExample("missing_image", "record has no image")
    try:
        ex["image"] = decode_image(data)
    except Exception as e:  # noqa: BLE001  (PIL raises many types on bad data)
        raise BadExample("corrupt_image", f"{type(e).__name__}: {e}") from None
    caption = to_str(rec.get(caption_key, rec.get("caption", ""))).strip()
    if not caption:
        raise BadExample("empty_caption", f"empty {caption_key!r}")
    ex["caption"] = caption
    for key in ("caption_detailed", "text"):
        if key in rec:
            ex[key] = to_str(rec[key])
    for key in ("questions", "answers"):
        if key in rec:
            ex[key] = [to_str(v) for v in rec[key]]
    ex["label"] = np.int32(rec.get("label", -1))
    ex["seen"] = bool(rec.get("seen", True))
    if "boxes" in rec:
        ex["boxes"] = np.asarray(rec["boxes"], np.float32).reshape(-1, 4)
        ex["box_labels"] = np.asarray(rec.get("box_labels", np.zeros(len(ex["boxes"]))), np.int32)
    if "frames" in rec and len(rec["frames"]):
        try:
            ex["frames"] = np.stack([decode_image(f) for f in rec["frames"]])
        except Exception as e:  # noqa: BLE001
            raise BadExample("corrupt_image", f"frames: {type(e).__name__}: {e}") from None
    if "motion" in rec:
        ex["motion"] = np.int32(rec["motion"])
    return ex


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


def _manifest_record(obj: Any, base: str, caption_key: str, where: str) -> dict:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object with image and caption, got {type(obj).__name__}")
    image = next((obj[k] for k in IMAGE_KEYS if k in obj), None)
    if not isinstance(image, str):
        raise ValueError(f"{where}: missing image path (one of {IMAGE_KEYS}) or not a string")
    keys = [caption_key, "caption", "text"]
    caption = next((obj[k] for k in keys if k in obj), None)
    if not isinstance(caption, str):
        raise ValueError(f"{where}: missing caption {caption_key!r} or not a string")
    rec = {"image_path": os.path.join(base, image), "caption": caption, "_where": where}
    if obj.get("label") not in (None, ""):
        try:
            rec["label"] = int(obj["label"])
        except (TypeError, ValueError):
            raise ValueError(f"{where}: label {obj['label']!r} is not an integer") from None
    return rec


def read_manifest(path: str, caption_key: str = "caption") -> list[dict]:
    """Parses a .jsonl or .csv manifest; ValueError "path:line: ..." on a malformed line."""
    base = os.path.dirname(os.path.abspath(path))
    records = []
    with open(path, newline="", encoding="utf-8") as f:
        if path.endswith(".csv"):
            reader = csv.reader(f)
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
                records.append(_manifest_record(dict(zip(header, row)), base, caption_key, where))
        else:
            for where, obj in _jsonl_lines(f, path):
                records.append(_manifest_record(obj, base, caption_key, where))
    return records


def _jsonl_lines(f, path: str):
    """(where 'FILE:LINE', parsed object) of each non-blank line; ValueError naming the line."""
    for lineno, line in enumerate(f, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON: {e.msg}") from None


class ManifestSource:
    """Image files listed in a JSONL or CSV manifest."""

    def __init__(self, path: str, caption_key: str = "caption"):
        self.path = path
        self.records = read_manifest(path, caption_key)
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
    the file), optional "questions" / "answers" / "label". Malformed lines raise "FILE:LINE: ..."."""

    def __init__(self, path: str):  # ManifestSource's __len__, __getitem__ and describe serve these records
        self.path, self.records, self.metadata = path, [], {}
        base = os.path.dirname(os.path.abspath(path))
        with open(path, encoding="utf-8") as f:
            for where, obj in _jsonl_lines(f, path):
                if not isinstance(obj, dict) or not isinstance(obj.get("texts"), list) \
                        or not isinstance(obj.get("images"), list):
                    raise ValueError(f"{where}: expected an object with lists 'texts' and 'images'")
                if len(obj["texts"]) != len(obj["images"]):
                    raise ValueError(f"{where}: 'texts' has {len(obj['texts'])} entries, 'images' "
                                     f"{len(obj['images'])}; they are parallel lists")
                obj["images"] = [os.path.join(base, im) if isinstance(im, str) and im else None
                                 for im in obj["images"]]
                obj["_where"] = where
                self.records.append(obj)


# ----------------------------------------------------------------- webdataset


def _split_key(name: str) -> tuple[str, str]:
    dirname, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(dirname, stem), ext.lower()


def index_tar(path: str) -> list[dict]:
    """One entry per sample KEY: image (offset, size) if any, and its caption/label."""
    samples: dict[str, dict] = {}
    with tarfile.open(path, "r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
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


class WebDatasetSource:
    """Samples of webdataset tar shards matched by a glob (sorted), read in place."""

    def __init__(self, pattern: str):
        self.shards = sorted(globlib.glob(pattern))
        if not self.shards:
            raise FileNotFoundError(f"no tar shards match {pattern!r}")
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
