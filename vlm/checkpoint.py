"""Checkpoints with orbax: async saves every N steps, keep the last K, atomic finalisation,
resume with optimiser/step/RNG/data-iterator state, and loading some or all parameters from a
checkpoint (ours or an imported HF one) with an error that lists the paths that do not fit.

Orbax writes each step into a temporary directory and renames it only once every item is
complete, so an interrupted save is never listed as a checkpoint.
"""

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util
from orbax.checkpoint._src.metadata import array_metadata_store  # what orbax's default handler uses

from vlm.nn.posemb import resample_posemb
from vlm.peft import is_peft_path


# Replica-parallel saving splits every replicated array into one slice per replica, each an op
# dispatched on its own; for the many small arrays of a model (norms, biases) that costs more than
# it saves. Only arrays with at least 1 MiB per replica are split (a 300-array tree on 8 devices:
# 2.0 s -> 0.8 s per save); the large ones still write in parallel. Otherwise the handler is orbax's
# default one (type_handler_registry._DEFAULT_TYPE_HANDLERS), array metadata store included.
# experiments/benchmarks/bench_checkpoint.py measures it.
MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 1 << 20


def register_array_handler(min_slice_bytes: int = MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL) -> None:
  """Makes orbax save jax.Arrays with `min_slice_bytes_for_replica_parallel=min_slice_bytes` (0: orbax's split
  of every array); done once at import with vlm's default."""
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=min_slice_bytes,
                                                array_metadata_store=array_metadata_store.Store()),
      override=True)


register_array_handler()


class DataStateHandler(ocp.CheckpointHandler):
  """Saves `iterator.get_state()` (JSON) once per process: process_{i}-of-{n}.json.

  The state is read synchronously in save(), so a later step of the iterator never leaks into
  an asynchronous checkpoint.
  """

  def save(self, directory: epath.Path, args: "DataStateSave"):
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    (directory / name).write_text(json.dumps(args.state))

  def restore(self, directory: epath.Path, args: "DataStateRestore | None" = None) -> Any:
    name = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if not name.exists():
      raise FileNotFoundError(f"{name}: no data iterator state for this process (was the process count changed?)")
    return json.loads(name.read_text())

  def metadata(self, directory: epath.Path) -> Any:
    return None

  def structure(self, directory: epath.Path) -> Any:
    return None


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


class Checkpointer:
  """A CheckpointManager over `<workdir>/checkpoints` holding 'state' (a pytree) and 'data'."""

  def __init__(self, workdir: str | Path, *, save_every: int, keep: int = 3, async_save: bool = True):
    self.directory = Path(workdir).absolute() / "checkpoints"
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=save_every, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: Any = None, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_state is not None:
      items["data"] = DataStateSave(data_state)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state: Any, with_data: bool = True) -> tuple[Any, Any]:
    """Restores into the shardings of `abstract_state` (a tree of jax.ShapeDtypeStruct with sharding)."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if with_data and (self.directory / str(step) / "data").exists():
      items["data"] = DataStateRestore()
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    return out["state"], out.get("data") if with_data else None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a tree of jax.Arrays."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _checkpoint_dir(path: Path) -> Path:
  return (path / "checkpoints" if (path / "checkpoints").exists() else path).absolute()


def latest_step(path: str | Path) -> int | None:
  """The newest checkpoint step of a workdir (or of its checkpoints/ dir); None if there is none."""
  mngr = ocp.CheckpointManager(_checkpoint_dir(Path(path)), options=ocp.CheckpointManagerOptions(read_only=True))
  step = mngr.latest_step()
  mngr.close()
  return step


def load_params(path: str | Path, step: int | None = None) -> dict:
  """Parameters (numpy) from one of our workdirs/checkpoint dirs, an HF directory (config.json), or a
  big_vision two-tower .npz (vlm.convert.big_vision). Imports are in the unrolled layout (block_{i});
  merge_params restacks them for a scanned model."""
  path = Path(path)
  if path.suffix == ".npz" and path.is_file():
    from vlm.convert.big_vision import import_big_vision
    return import_big_vision(path)[2]
  if (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists():
    from vlm.convert import import_hf
    return import_hf(path)[2]
  step = latest_step(path) if step is None else step
  if step is None:
    raise FileNotFoundError(f"{path}: no checkpoint found")
  # Restore onto this process's first device, whatever topology the checkpoint was saved with.
  item = _checkpoint_dir(path) / str(step) / "state"
  ckptr = ocp.StandardCheckpointer()
  meta = ckptr.metadata(item)
  meta = getattr(meta, "item_metadata", meta)
  meta = getattr(meta, "tree", meta)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
  restored = ckptr.restore(item, target)
  params = restored["params"] if isinstance(restored, dict) and "params" in restored else restored
  return jax.tree.map(np.asarray, params)


def resample_grid_posemb(posemb: np.ndarray, length: int) -> np.ndarray:
  """A ViT's learned position embedding [1, N, D] (a square grid, after a class token's row when
  N - 1 is the square) resampled bicubically to [1, length, D] for another image resolution (the
  class token's row kept): what big_vision and timm do when fine-tuning at a new resolution."""
  n = posemb.shape[1]
  def split(count: int) -> tuple[int, int]:
    for extra in (0, 1):
      g = int(round(math.sqrt(count - extra)))
      if g * g == count - extra and g > 0:
        return extra, g
    raise ValueError(f"position embedding of length {count} is neither a square grid nor one plus a class token")
  extra, g = split(n)
  new_extra, new_g = split(length)
  if extra != new_extra:
    raise ValueError(f"position embedding: {n} -> {length} changes whether a class token leads it")
  grid = resample_posemb(jnp.asarray(posemb[:, extra:], jnp.float32), (new_g, new_g), method="cubic")
  return np.concatenate([np.asarray(posemb[:, :extra], np.float32), np.asarray(grid)], axis=1)


def _other_layout(lflat: dict[str, Any], src: str) -> np.ndarray | None:
  """`src` read from the other layer layout of the checkpoint, or None: a scanned path
  ('.../layers/...') as the unrolled blocks '.../block_{i}/...' (i = 0, 1, ... as far as present) stacked
  on axis 0, an unrolled one ('.../block_{i}/...') as layer i of a scanned '.../layers/...'."""
  parts = src.split("/")
  for j, part in enumerate(parts):
    if part == "layers":
      blocks = []
      while (key := "/".join(parts[:j] + [f"block_{len(blocks)}"] + parts[j + 1:])) in lflat:
        blocks.append(np.asarray(lflat[key]))
      if blocks:
        return np.stack(blocks)
    elif (m := re.fullmatch(r"block_(\d+)", part)) is not None:
      key = "/".join(parts[:j] + ["layers"] + parts[j + 1:])
      if key in lflat and np.ndim(lflat[key]) > 0 and np.shape(lflat[key])[0] > int(m.group(1)):
        return np.asarray(lflat[key])[int(m.group(1))]
  return None


def merge_params(target: dict, loaded: dict, mapping: dict[str, str] | None = None,
                 resample_posemb: bool = False) -> dict:
  """Copies `loaded` parameters into `target` (a tree of arrays with the model's shapes).

  mapping: {target_prefix_regex: loaded_prefix}, e.g. {'img/': 'img/'} initialises the image
  tower only; None copies every path present in both. resample_posemb: a learned ViT position
  embedding (`.../pos_embedding`, [1, N, D]) of another grid is resampled to the model's
  (`resample_grid_posemb`; a tower trained at 32 px used at 64 px). Raises ValueError listing each
  target path that has no source (except PEFT parameters, vlm.peft.is_peft_path) or whose shape
  differs.

  Layer layouts: a scanned target (`.../layers/...` stacked on a leading depth axis: Encoder(scan=True),
  DecoderLM(scan_layers=True)) loads from an unrolled checkpoint (`.../block_{i}/...`, stacked here) and
  an unrolled target from a scanned checkpoint (layer i sliced out), so an HF directory (imported unrolled
  by load_params) or a checkpoint of the other layout initialises either model.
  """
  tflat = {"/".join(k): v for k, v in traverse_util.flatten_dict(target).items()}
  lflat = {"/".join(k): v for k, v in traverse_util.flatten_dict(loaded).items()}
  mapping = mapping or {"": ""}
  problems, out, used = [], dict(tflat), 0
  for tpath, tval in tflat.items():
    for tprefix, lprefix in mapping.items():
      if tpath.startswith(tprefix):
        src = lprefix + tpath[len(tprefix):]
        value = lflat[src] if src in lflat else _other_layout(lflat, src)
        if value is None:
          if mapping != {"": ""} and not is_peft_path(tpath):  # PEFT params keep their init
            problems.append(f"{tpath}: no parameter {src!r} in the checkpoint")
          break
        if (resample_posemb and tpath.endswith("pos_embedding") and tuple(value.shape) != tuple(tval.shape)
            and value.ndim == 3 and value.shape[::2] == tval.shape[::2]):
          try:
            value = resample_grid_posemb(np.asarray(value), tval.shape[1])
          except ValueError as e:
            problems.append(f"{tpath}: {e}")
            break
        if tuple(value.shape) != tuple(tval.shape):
          how = "" if src in lflat else " (restacked from the other layer layout)"
          problems.append(f"{tpath}: shape {tuple(tval.shape)} != checkpoint {src!r}{how} {tuple(value.shape)}")
          break
        out[tpath] = jax.device_put(np.asarray(value, tval.dtype), getattr(tval, "sharding", None))
        used += 1
        break
  if not used:
    problems.append("no parameter of the checkpoint matched the model")
  if problems:
    raise ValueError("checkpoint does not fit the model:\n  " + "\n  ".join(problems))
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})
