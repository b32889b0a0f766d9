"""Checkpoints with orbax: async saves every N steps, keep the last K, atomic finalisation,
resume with optimiser/step/RNG/data-iterator state, and loading some or all parameters from a
checkpoint (ours or an imported HF one) with an error that lists the paths that do not fit.
PEFT runs (vlm.peft): their trainable leaves alone (save_peft / load_peft onto a base), and a
workdir with LoRA merged into a plain checkpoint (merge_workdir; the CLI `python -m vlm.peft merge`).

Orbax writes each step into a temporary directory and renames it only once every item is
complete, so an interrupted save is never listed as a checkpoint.

A save that fails on I/O (disk full, permissions, read-only filesystem; synchronous, or an
asynchronous one surfacing at the next save or at close) raises one CheckpointWriteError (an
OSError) with the checkpoint path, the errno message and the free space; the earlier checkpoints
stay as they were. The echoes of that failure in orbax's background threads and asyncio tasks
(hundreds of log lines and tracebacks) are dropped (`quiet_orbax_io_errors`).
"""

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.metadata import array_metadata_store  # what orbax's default handler uses

from vlm.nn.posemb import resample_posemb
from vlm.peft import ADAPTER_TRAINABLE, LORA_PARAMS, is_peft_path, merge_lora, parse_config, peft_params
from vlm.tree import flatten, path_str, unflatten


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
    jax.Array,
    ocp.type_handlers.ArrayHandler(
      min_slice_bytes_for_replica_parallel=min_slice_bytes, array_metadata_store=array_metadata_store.Store()
    ),
    override=True,
  )


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


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (errno set); the message has the path, the cause and the free space."""

  def __init__(self, err: int, message: str):
    super().__init__(err, os.strerror(err))
    self.message = message

  def __str__(self) -> str:
    return self.message


_ERRNO_IN_TEXT = re.compile(r"os_error_code='?(\d+)|\[Errno (\d+)\]")


def io_errno(e: BaseException | None) -> int | None:
  """The errno of an I/O failure in `e` or its causes: an OSError, or a tensorstore ValueError whose
  message carries `[os_error_code='N']`; None for any other error."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno:
      return int(e.errno)
    m = _ERRNO_IN_TEXT.search(str(e))
    if m:
      return int(m.group(1) or m.group(2))
    e = e.__cause__ or e.__context__
  return None


class _DropOrbaxIOErrorEchoes(logging.Filter):
  """Drops log records that repeat an I/O failure of an orbax save (asyncio's 'Task exception was never
  retrieved' per pending write, orbax's per-thread errors): the Checkpointer raises it once."""

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    if exc is not None and io_errno(exc) is not None:
      return False
    if "orbax" in record.pathname or record.name == "asyncio":
      try:
        message = record.getMessage()
      except Exception:  # noqa: BLE001 (a bad format string is not ours to report)
        return True
      if record.levelno >= logging.ERROR and _ERRNO_IN_TEXT.search(message):
        return False
    return True


def _is_loop_closed_noise(exc: BaseException | None, obj: Any) -> bool:
  """'Event loop is closed' from a tensorstore callback into the finished event loop of a failed orbax write."""
  return obj is None and isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _is_orbax_coroutine(obj: Any) -> bool:
  code = getattr(obj, "cr_code", None)
  return code is not None and "orbax" in code.co_filename


_QUIET = False


def quiet_orbax_io_errors() -> None:
  """Installs (once) the log filter above on the 'absl' and 'asyncio' loggers, and hooks that drop the
  tracebacks of orbax writes cut off by an I/O failure: 'Event loop is closed' from tensorstore callbacks
  into a finished event loop, and (once a save failed) orbax coroutines left pending, reported at exit."""
  global _QUIET
  if _QUIET:
    return
  _QUIET = True
  for name in ("absl", "asyncio"):
    logging.getLogger(name).addFilter(_DropOrbaxIOErrorEchoes())
  unraisable, excepthook = sys.unraisablehook, sys.excepthook

  def on_unraisable(u):
    if not (_is_loop_closed_noise(u.exc_value, u.object) or (_FAILED and _is_orbax_coroutine(u.object))):
      unraisable(u)

  def on_exception(kind, value, tb):
    # A callback from C that raised has no Python caller: a traceback of 2-3 asyncio frames.
    frames, t = 0, tb
    while t is not None:
      frames, t = frames + 1, t.tb_next
    if not (_is_loop_closed_noise(value, None) and frames <= 3):
      excepthook(kind, value, tb)

  sys.unraisablehook, sys.excepthook = on_unraisable, on_exception


_FAILED = False  # a save failed on I/O: the pending orbax coroutines will complain at exit


def _steps_on_disk(directory: Path) -> list[int]:
  try:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())
  except OSError:
    return []


def _free_space(directory: Path) -> str:
  path = directory
  while not path.exists() and path != path.parent:
    path = path.parent
  try:
    usage = shutil.disk_usage(path)
  except OSError as e:
    return f"free space unknown ({e.strerror})"
  mib = 1 << 20
  return f"{usage.free / mib:,.1f} MiB free of {usage.total / mib:,.1f} MiB on the filesystem of {path}"


class Checkpointer:
  """A CheckpointManager over `<workdir>/checkpoints` holding 'state' (a pytree) and 'data'.

  save_every=0 saves only forced steps (the trainer forces the last one). An I/O failure of a save
  raises CheckpointWriteError (see the module docstring).
  """

  def __init__(self, workdir: str | Path, *, save_every: int, keep: int | None = 3, async_save: bool = True):
    quiet_orbax_io_errors()
    self.directory = Path(workdir).absolute() / "checkpoints"
    self.save_every = int(save_every)
    self.async_save = bool(async_save)
    self._in_flight: int | None = None  # the step of an asynchronous save not yet known to be complete
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        save_interval_steps=max(self.save_every, 1),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
      ),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def _write_error(self, e: BaseException, step: int) -> CheckpointWriteError | None:
    """The CheckpointWriteError for `e` when it is an I/O failure (else None)."""
    global _FAILED
    err = io_errno(e)
    if err is None:
      return None
    _FAILED = True
    m = re.search(rf"{re.escape(str(self.directory))}/(\d+)\.orbax-checkpoint-tmp", str(e))
    failed = int(m.group(1)) if m else step
    kept = [s for s in _steps_on_disk(self.directory) if s != failed]
    cause = " ".join(f"{type(e).__name__}: {e}".split())
    cause = cause if len(cause) <= 400 else cause[:400] + " ..."
    kept_text = (
      f"checkpoints on disk, untouched: {kept} (a rerun resumes from {kept[-1]})" if kept else "no earlier checkpoint"
    )
    return CheckpointWriteError(
      err,
      f"could not write checkpoint {self.directory / str(failed)}: [Errno {err}] {os.strerror(err)}; "
      f"{_free_space(self.directory)}; {kept_text}. Cause: {cause}",
    )

  def save(self, step: int, state: Any, data_state: Any = None, force: bool = False) -> bool:
    if not force and not self.save_every:
      return False
    if self._in_flight is not None and (force or step % self.save_every == 0):
      self.wait()  # orbax waits for the previous save anyway; a failure of it is reported as that step's
    items = {"state": ocp.args.StandardSave(state)}
    if data_state is not None:
      items["data"] = DataStateSave(data_state)
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:
      error = self._write_error(e, step)
      if error is None:
        raise
      raise error from None
    if saved and self.async_save:
      self._in_flight = step
    return saved

  def restore(self, step: int, abstract_state: Any, with_data: bool = True) -> tuple[Any, Any]:
    """Restores into the shardings of `abstract_state` (a tree of jax.ShapeDtypeStruct with sharding)."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if with_data and (self.directory / str(step) / "data").exists():
      items["data"] = DataStateRestore()
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    return out["state"], out.get("data") if with_data else None

  def wait(self) -> None:
    """Blocks until an asynchronous save is complete (CheckpointWriteError if it failed on I/O)."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      error = self._write_error(e, self._in_flight if self._in_flight is not None else -1)
      if error is None:
        raise
      raise error from None
    self._in_flight = None

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()

  def saved_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
    """{'/'-joined path: shape} of the 'state' item saved at `step` (from its metadata, no data read)."""
    meta = _item_metadata(self.directory / str(step) / "state")
    return {
      path_str(p): tuple(m.shape)
      for p, m in jax.tree_util.tree_flatten_with_path(meta)[0]
      if getattr(m, "shape", None) is not None
    }


def _item_metadata(item: Path) -> Any:
  """The tree of ArrayMetadata (shape, dtype) of a saved pytree item."""
  meta = ocp.StandardCheckpointer().metadata(item)
  meta = getattr(meta, "item_metadata", meta)
  return getattr(meta, "tree", meta)


def shape_mismatches(abstract_state: Any, saved: dict[str, tuple[int, ...]]) -> list[str]:
  """Lines naming the leaves of `abstract_state` (arrays or ShapeDtypeStructs) whose shape differs from
  the checkpoint's (`Checkpointer.saved_shapes`), and the parameters ('params/...') present on one side
  only; parameters first. PRNG keys (stored as raw key data) are skipped."""
  live = {}
  for path, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      continue
    live[path_str(path)] = tuple(x.shape)
  lines = [f"{k}: shape {live[k]} != checkpoint {saved[k]}" for k in live if k in saved and live[k] != saved[k]]
  lines += [f"{k}: not in the checkpoint" for k in live if k not in saved and k.startswith("params/")]
  lines += [f"{k}: in the checkpoint, not in the model" for k in saved if k not in live and k.startswith("params/")]
  return sorted(lines, key=lambda line: (not line.startswith("params/"), line))


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
  meta = _item_metadata(item)
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
      while (key := "/".join(parts[:j] + [f"block_{len(blocks)}"] + parts[j + 1 :])) in lflat:
        blocks.append(np.asarray(lflat[key]))
      if blocks:
        return np.stack(blocks)
    elif (m := re.fullmatch(r"block_(\d+)", part)) is not None:
      key = "/".join(parts[:j] + ["layers"] + parts[j + 1 :])
      if key in lflat and np.ndim(lflat[key]) > 0 and np.shape(lflat[key])[0] > int(m.group(1)):
        return np.asarray(lflat[key])[int(m.group(1))]
  return None


def merge_params(
  target: dict, loaded: dict, mapping: dict[str, str] | None = None, resample_posemb: bool = False
) -> dict:
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
  tflat, lflat = flatten(target, unbox=False), flatten(loaded, unbox=False)
  mapping = mapping or {"": ""}
  problems, out, used = [], dict(tflat), 0
  for tpath, tval in tflat.items():
    for tprefix, lprefix in mapping.items():
      if tpath.startswith(tprefix):
        src = lprefix + tpath[len(tprefix) :]
        value = lflat[src] if src in lflat else _other_layout(lflat, src)
        if value is None:
          if mapping != {"": ""} and not is_peft_path(tpath):  # PEFT params keep their init
            problems.append(f"{tpath}: no parameter {src!r} in the checkpoint")
          break
        if (
          resample_posemb
          and tpath.endswith("pos_embedding")
          and tuple(value.shape) != tuple(tval.shape)
          and value.ndim == 3
          and value.shape[::2] == tval.shape[::2]
        ):
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
  return unflatten(out)


# ------------------------------------------------------------------------------------------- PEFT


def save_params(directory: str | Path, params: Any, step: int = 0) -> Path:
  """Writes `params` as a checkpoint that `load_params(directory)` reads back."""
  ckpt = Checkpointer(directory, save_every=1, keep=1, async_save=False)
  ckpt.save(int(step), {"params": params}, force=True)
  ckpt.close()
  return Path(directory)


def save_peft(directory: str | Path, params: Any, regexes: Sequence[str] | None = None, step: int = 0) -> Path:
  """Writes only the PEFT (trainable) leaves of `params` to `directory` (vlm.peft.peft_params)."""
  sub = peft_params(params, regexes)
  if not sub:
    raise ValueError("save_peft: no parameter matches the PEFT regexes")
  return save_params(directory, sub, step)


def load_peft(base_params: Any, peft_dir: str | Path, step: int | None = None) -> dict:
  """Base parameters (e.g. the plain pretrained checkpoint) + the leaves saved by save_peft.

  LoRA / adapter leaves are added; other saved leaves (train_also) replace base leaves of the same
  path and shape. Raises ValueError for a leaf that does not fit the base.
  """
  base = flatten(base_params)
  problems = []
  for path, v in flatten(load_params(peft_dir, step)).items():
    if path in base:
      if tuple(np.shape(base[path])) != tuple(np.shape(v)):
        problems.append(f"{path}: shape {tuple(np.shape(v))} != base {tuple(np.shape(base[path]))}")
    elif not is_peft_path(path):
      problems.append(f"{path}: not in the base parameters")
    elif path.endswith(LORA_PARAMS) and path.rsplit("/", 1)[0] + "/kernel" not in base:
      problems.append(f"{path}: the base has no {path.rsplit('/', 1)[0]}/kernel")
    base[path] = v
  if problems:
    raise ValueError(f"{peft_dir}: PEFT parameters do not fit the base:\n  " + "\n  ".join(problems))
  return unflatten(base)


def merge_workdir(workdir: str | Path, out: str | Path, step: int | None = None, alpha: float | None = None) -> Path:
  """Loads a PEFT run's parameters (latest or `step`), merges LoRA and writes a plain checkpoint
  (and config.json without `peft`) to `out`; adapters cannot be merged and raise."""
  workdir, out = Path(workdir), Path(out)
  config = None
  if (workdir / "config.json").exists():
    config = json.loads((workdir / "config.json").read_text())
  cfg = parse_config((config or {}).get("peft"))
  if alpha is None:
    if cfg is None:
      raise ValueError(f"{workdir}: no config.json with a `peft` block; pass --alpha")
    alpha = cfg.alpha
  params = load_params(workdir, step)
  adapters = [p for p in flatten(params) if re.fullmatch(ADAPTER_TRAINABLE, p)]
  if adapters:
    raise ValueError(
      f"{workdir}: adapters cannot be merged into the base weights (e.g. {adapters[0]}); "
      "serve this checkpoint with the PEFT model config"
    )
  if step is None:
    step = latest_step(workdir) or 0
  save_params(out, merge_lora(params, alpha), step)
  if config is not None:
    config.pop("peft", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
  return out
