"""Reading and writing safetensors checkpoints (single file or sharded with an index). Never pickles."""

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file


def load_safetensors_dir(path: str | Path) -> dict[str, np.ndarray]:
  """All tensors of an HF-format directory: model.safetensors or model.safetensors.index.json shards."""
  path = Path(path)
  single = path / "model.safetensors"
  index = path / "model.safetensors.index.json"
  if single.exists():
    return dict(load_file(str(single)))
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
    tensors: dict[str, np.ndarray] = {}
    shards = {_shard_path(index, shard) for shard in weight_map.values()}  # every name checked before any read
    for shard in sorted(shards):
      tensors.update(load_file(str(shard)))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
      raise ValueError(f"{index}: tensors listed in the index but absent from the shards: {missing[:10]}")
    return tensors
  raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")


def _shard_path(index: Path, shard: str) -> Path:
  """A weight_map shard name -> its file beside the index; ValueError naming both if the name is not a
  plain relative path inside that directory (absolute, or '..' out of it): an index must not read elsewhere."""
  if not isinstance(shard, str) or not shard:
    raise ValueError(f"{index}: weight_map shard name {shard!r} is not a file name")
  if Path(shard).is_absolute() or shard.startswith(("/", "\\")) or ".." in shard.replace("\\", "/").split("/"):
    raise ValueError(
      f"{index}: weight_map shard {shard!r} is outside the checkpoint directory "
      f"{index.parent} (absolute, or '..'); shards must sit beside the index"
    )
  return index.parent / shard


def save_safetensors_dir(tensors: dict[str, np.ndarray], path: str | Path, config: dict) -> None:
  """Writes config.json and model.safetensors (float32, contiguous) into `path`."""
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  save_file(
    {k: np.require(v, requirements="C") for k, v in tensors.items()},
    str(path / "model.safetensors"),
    metadata={"format": "pt"},
  )
  (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
