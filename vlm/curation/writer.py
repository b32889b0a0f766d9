"""Writes a curated selection of a source as a TFDS ArrayRecord dataset `vlm_curated/<name>`.

A TFDS source keeps its features and metadata (so the embedded scenes keep boxes, questions,
class names and templates); other sources (manifests, webdataset shards) become image bytes,
caption and label, as `vlm.data.convert` writes them. Fields named in `overrides` (e.g. synthetic
captions) replace or are added as text features (empty in the copied, uncurated splits). Read it back with
`data.source = 'tfds:vlm_curated/<name>'` (and `data.data_dir` where it was written).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from vlm.data import convert, sources
from vlm.data.tfds_compat import import_tfds

tfds = import_tfds()

NAME = "vlm_curated"


class VlmCurated(tfds.core.GeneratorBasedBuilder, skip_registration=__name__ == "__main__"):
  """A curated selection of another dataset's records; one builder config per curated set."""

  VERSION = tfds.core.Version("1.0.0")

  def __init__(
    self,
    *,
    name: str,
    features=None,
    metadata: Mapping | None = None,
    splits: Mapping[str, tuple] | None = None,
    caption_key: str = "caption",
    extra_text_fields: Sequence[str] = (),
    **kwargs,
  ):
    self._features, self._metadata, self._extra = features, dict(metadata or {}), tuple(extra_text_fields)
    self._splits, self._caption_key = dict(splits or {}), caption_key
    kwargs.setdefault("file_format", "array_record")
    super().__init__(config=tfds.core.BuilderConfig(name=name), **kwargs)

  def _info(self):
    return self.dataset_info_from_configs(
      features=self._features,
      disable_shuffling=True,
      metadata=tfds.core.MetadataDict(self._metadata),
      description="A curated selection (vlm.curate).",
    )

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(*args) for split, args in self._splits.items()}

  def _generate_examples(self, source, indices: Sequence[int], overrides: Mapping[str, Sequence[str]]):
    plain = not isinstance(source, sources.TfdsSource)
    for row, i in enumerate(indices):
      rec = convert.plain_example(source[int(i)], self._caption_key) if plain else source[int(i)]
      for key, values in overrides.items():
        rec[key] = values[row]
      for key in self._extra:
        rec.setdefault(key, "")  # an added field in a copied (not curated) split
      yield row, rec


def write_dataset(
  name: str,
  data_dir: str,
  splits: Mapping[str, tuple],
  *,
  source,
  extra_text_fields: Sequence[str] = (),
  metadata: Mapping | None = None,
  caption_key: str = "caption",
) -> Path:
  """Writes `vlm_curated/<name>` under data_dir; splits: {split: (source, indices, overrides)}.

  Raises FileExistsError (naming the directory) instead of replacing a dataset already written.
  """
  if isinstance(source, sources.TfdsSource):
    features = dict(source.features)
    meta = dict(source.metadata)
  else:
    features = dict(convert.plain_features())
    meta = {}
  for key in extra_text_fields:
    if key not in features:
      features[key] = tfds.features.Text()
  meta.update(metadata or {})
  builder = VlmCurated(
    name=name,
    features=tfds.features.FeaturesDict(features),
    metadata=meta,
    splits=splits,
    caption_key=caption_key,
    extra_text_fields=extra_text_fields,
    data_dir=data_dir,
  )
  if builder.is_prepared():
    raise FileExistsError(
      f"output.name: {NAME}/{name} already exists at {builder.data_dir}; choose another name or delete that directory"
    )
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return Path(builder.data_dir)
