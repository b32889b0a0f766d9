"""Converts image-text files (webdataset shards, JSONL/CSV manifests) to a TFDS ArrayRecord dataset.

    python -m vlm.data.convert --source='wds:/data/shards/{00000..00009}.tar' \\
        --name=my_pairs --data_dir=DIR [--split=train] [--caption_key=caption]

writes `DIR/vlm_image_text/my_pairs/1.0.0/` (image = encoded bytes, caption,
label), readable with `data.source = 'tfds:vlm_image_text/my_pairs'` and
`data.data_dir = DIR`. Shard patterns take brace ranges / lists and wildcards
(sources.expand_shards: a named shard that does not exist is an error). Bad records
(missing/corrupt image, empty caption, an image over --max_image_pixels) are
skipped and counted; `--strict` makes them an error. Manifest image paths must
stay inside the manifest's directory (or --image_root) unless --allow_absolute_paths.
"""

from __future__ import annotations

import argparse
import collections
import io
import os

import numpy as np
from PIL import Image

from vlm.data import sources
from vlm.data.tfds_compat import import_tfds

tfds = import_tfds()


def open_source(
  spec: str, caption_key: str = "caption", image_root: str | None = None, allow_absolute_paths: bool = False
):
  """The source of --source: 'wds:PATTERN' (sources.expand_shards), 'jsonl:PATH' or 'csv:PATH'."""
  kind, _, arg = spec.partition(":")
  if kind == "wds":
    return sources.WebDatasetSource(arg)
  if kind in ("jsonl", "csv"):
    return sources.ManifestSource(arg, caption_key, image_root, allow_absolute_paths)
  raise ValueError(f"--source: expected 'wds:GLOB', 'jsonl:PATH' or 'csv:PATH', got {spec!r}")


def plain_features():
  """Features of a converted image-text set: encoded image bytes, caption, label."""
  return tfds.features.FeaturesDict(
    {
      "image": tfds.features.Tensor(shape=(), dtype=np.object_),
      "caption": tfds.features.Text(),
      "label": tfds.features.Scalar(dtype=np.int32),
    }
  )


def plain_example(rec: dict, caption_key: str = "caption", max_pixels: int | None = sources.MAX_IMAGE_PIXELS) -> dict:
  """A source record -> {'image': encoded bytes, 'caption', 'label'}; raises sources.BadExample."""
  ex = sources.decode_record(rec, caption_key, max_pixels)  # checks image, its size and caption
  data = rec.get("image")
  if data is None:
    with open(rec["image_path"], "rb") as f:
      data = f.read()
  if isinstance(data, np.ndarray) and data.dtype == object:
    data = data.item()
  if not isinstance(data, bytes):  # arrays: store as PNG
    buf = io.BytesIO()
    Image.fromarray(ex["image"]).save(buf, format="PNG")
    data = buf.getvalue()
  return {"image": data, "caption": ex["caption"], "label": np.int32(ex["label"])}


class VlmImageText(tfds.core.GeneratorBasedBuilder, skip_registration=__name__ == "__main__"):
  """Image-text pairs converted from files; one builder config per converted set."""

  VERSION = tfds.core.Version("1.0.0")

  def __init__(
    self,
    *,
    name: str,
    split_sources: dict | None = None,
    caption_key: str = "caption",
    strict: bool = False,
    max_pixels: int | None = sources.MAX_IMAGE_PIXELS,
    **kwargs,
  ):
    self._split_sources = split_sources or {}
    self._caption_key, self._strict, self._max_pixels = caption_key, strict, max_pixels
    self.skipped: collections.Counter = collections.Counter()
    kwargs.setdefault("file_format", "array_record")
    super().__init__(config=tfds.core.BuilderConfig(name=name), **kwargs)

  def _info(self):
    return self.dataset_info_from_configs(features=plain_features(), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(src) for split, src in self._split_sources.items()}

  def _generate_examples(self, src):
    for i in range(len(src)):
      try:
        ex = plain_example(src[i], self._caption_key, self._max_pixels)
      except sources.BadExample as e:
        if self._strict:
          raise ValueError(f"bad example {src.describe(i)}: {e}") from None
        self.skipped[e.reason] += 1
        continue
      yield i, ex


def convert(
  source: str,
  name: str,
  data_dir: str,
  split: str = "train",
  caption_key: str = "caption",
  strict: bool = False,
  image_root: str | None = None,
  allow_absolute_paths: bool = False,
  max_pixels: int | None = sources.MAX_IMAGE_PIXELS,
) -> tuple[str, dict]:
  """Writes the dataset; returns (its TFDS name, skipped counts by reason)."""
  src = open_source(source, caption_key, image_root, allow_absolute_paths)
  builder = VlmImageText(
    name=name,
    split_sources={split: src},
    caption_key=caption_key,
    strict=strict,
    max_pixels=max_pixels,
    data_dir=data_dir,
  )
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return f"vlm_image_text/{name}", dict(builder.skipped)


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--source", required=True)
  p.add_argument("--name", required=True)
  p.add_argument("--data_dir", default=os.environ.get("VLM_DATA_DIR") or os.path.expanduser("~/.cache/vlm/data"))
  p.add_argument("--split", default="train")
  p.add_argument("--caption_key", default="caption")
  p.add_argument("--strict", action="store_true")
  p.add_argument(
    "--image_root", default=None, help="manifest image paths are relative to this (default: the manifest's directory)"
  )
  p.add_argument("--allow_absolute_paths", action="store_true", help="read manifest image paths as written")
  p.add_argument(
    "--max_image_pixels",
    type=int,
    default=sources.MAX_IMAGE_PIXELS,
    help="images with more pixels are skipped as too_large (0: no limit)",
  )
  a = p.parse_args(argv)
  from vlm.data import convert as module  # the registered builder, not __main__'s copy

  name, skipped = module.convert(
    a.source,
    a.name,
    a.data_dir,
    a.split,
    a.caption_key,
    a.strict,
    a.image_root,
    a.allow_absolute_paths,
    a.max_image_pixels or None,
  )
  print(f"wrote tfds:{name} under {a.data_dir}; skipped {skipped or 'none'}")


if __name__ == "__main__":
  main()
