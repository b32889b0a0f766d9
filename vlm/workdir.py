"""What a training run keeps in its workdir besides checkpoints and metrics: the lock that lets one
trainer at a time use it, and the record of the configs it ran with.

- `<workdir>/LOCK`: held with fcntl.flock by the run's process 0 (the kernel drops the lock when
  that process dies, so a reused pid never looks alive) and holding JSON {host, pid, start} for the
  message to whoever finds it taken. A second trainer on a live run's workdir fails at once; a lock
  left by a killed run is taken over. Filesystems without flock fall back to O_CREAT|O_EXCL with a
  liveness check of the recorded pid (same host only).
- `config.json` is the config of the run's first start and is never overwritten once a checkpoint
  exists; a resume whose config differs in keys that keep the state's shapes (evals, logging,
  total_steps, ...) records it as `config.<step>.json` (`record_config`).
"""

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

LOCK_NAME = "LOCK"


class WorkdirLockedError(RuntimeError):
  """Another live process holds the workdir's lock."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _describe(holder: dict[str, Any]) -> str:
  start = holder.get("start_time")
  when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(start)) if isinstance(start, (int, float)) else "?"
  return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (started {when})"


def _read_holder(fd: int) -> dict[str, Any]:
  """The JSON a lock file holds ({} when empty or torn)."""
  os.lseek(fd, 0, os.SEEK_SET)
  data = b""
  while chunk := os.read(fd, 65536):
    data += chunk
  try:
    holder = json.loads(data.decode() or "{}")
  except (ValueError, UnicodeDecodeError):
    return {}
  return holder if isinstance(holder, dict) else {}


def _write_holder(fd: int) -> None:
  me = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "start_time": time.time()})
  os.ftruncate(fd, 0)
  os.lseek(fd, 0, os.SEEK_SET)
  os.write(fd, me.encode())
  os.fsync(fd)


class WorkdirLock:
  """An exclusive, process-wide lock on a workdir (see the module docstring); `with` or acquire/release."""

  def __init__(self, workdir: str | Path):
    self.path = Path(workdir).absolute() / LOCK_NAME
    self._fd: int | None = None
    self._flock = True

  def _held(self, holder: dict[str, Any]) -> WorkdirLockedError:
    who = _describe(holder) if holder else "another process (it has not written its details yet)"
    hint = ""
    if (
      holder.get("host") == socket.gethostname()
      and isinstance(holder.get("pid"), int)
      and not _pid_alive(holder["pid"])
    ):
      hint = (
        f" pid {holder['pid']} is not running, but a process it started (a data worker?) still has the "
        "lock file open; end that process."
      )
    return WorkdirLockedError(
      f"workdir {self.path.parent} is in use: its lock {self.path} is held by {who}. Two trainers on one "
      f"workdir interleave metrics.jsonl and delete each other's checkpoints; stop that run or pick another "
      f"--workdir.{hint}"
    )

  def acquire(self) -> "WorkdirLock":
    """Takes the lock or raises WorkdirLockedError naming the holder's host, pid, start time and the lock file."""
    for _ in range(100):
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise self._held(holder) from None
      except OSError as e:  # no flock on this filesystem (ENOLCK, EOPNOTSUPP, ...)
        os.close(fd)
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS):
          raise
        return self._acquire_exclusive()
      try:  # a releasing holder unlinks the file: ours must still be the one at the path
        same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same = False
      if not same:
        os.close(fd)
        continue
      previous = _read_holder(fd)
      if previous:  # a clean release removes the file: whoever wrote this is gone
        print(f"{self.path}: taking over the stale lock of {_describe(previous)}; that process is gone", flush=True)
      _write_holder(fd)
      self._fd = fd
      return self
    raise WorkdirLockedError(f"{self.path}: could not take the lock (the file keeps being replaced)")

  def _acquire_exclusive(self) -> "WorkdirLock":
    """Without flock: create the file exclusively; a file left by a dead pid of this host is stale."""
    self._flock = False
    for _ in range(100):
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        try:
          fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
          continue
        holder = _read_holder(fd)
        os.close(fd)
        stale = (
          holder.get("host") == socket.gethostname()
          and isinstance(holder.get("pid"), int)
          and not _pid_alive(holder["pid"])
        )
        if not stale:
          raise self._held(holder) from None
        print(f"{self.path}: taking over the stale lock of {_describe(holder)}; that process is gone", flush=True)
        self.path.unlink(missing_ok=True)
        continue
      _write_holder(fd)
      self._fd = fd
      return self
    raise WorkdirLockedError(f"{self.path}: could not take the lock (the file keeps being replaced)")

  def release(self) -> None:
    """Removes the lock file (still holding the lock, so no one takes a file about to vanish), then unlocks."""
    if self._fd is None:
      return
    try:
      if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
        self.path.unlink()
    except FileNotFoundError:
      pass
    finally:
      os.close(self._fd)  # closing the last descriptor drops the flock
      self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


# ------------------------------------------------------------------------------------- configs --


def config_dict(config: Any) -> dict[str, Any]:
  """A ConfigDict (or dict) as the JSON that config.json holds (tuples become lists)."""
  text = config.to_json_best_effort() if hasattr(config, "to_json_best_effort") else json.dumps(config, default=str)
  return json.loads(text)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """Nested dicts -> {dotted.key: leaf}; an empty dict is a leaf."""
  if not isinstance(tree, dict) or not tree:
    return {prefix: tree}
  out: dict[str, Any] = {}
  for k, v in tree.items():
    out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  """{dotted key: (old value, new value)} of the keys whose values differ (a missing key is '<absent>')."""
  a, b = flatten(old), flatten(new)
  missing = "<absent>"
  return {
    k: (a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)
  }


def recorded_configs(workdir: str | Path) -> list[tuple[int, Path]]:
  """[(step, path)] of the configs a run recorded: config.json as step 0, then config.<step>.json, by step."""
  workdir = Path(workdir)
  out = [(0, workdir / "config.json")] if (workdir / "config.json").exists() else []
  for p in workdir.glob("config.*.json"):
    step = p.name[len("config.") : -len(".json")]
    if step.isdigit():
      out.append((int(step), p))
  return sorted(out)


def latest_config(workdir: str | Path, step: int | None = None) -> tuple[Path, dict[str, Any]] | None:
  """(path, JSON) of the config in force at `step` (default: the newest one), or None if none was recorded."""
  found = [(s, p) for s, p in recorded_configs(workdir) if step is None or s <= step]
  if not found:
    return None
  path = found[-1][1]
  return path, json.loads(path.read_text())


def write_atomic(path: Path, text: str) -> None:
  """Writes `text` to a temporary file beside `path`, then renames it over `path` (a kill leaves the old or the new)."""
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def record_config(workdir: str | Path, config: Any, step: int | None) -> Path | None:
  """Records the config a run (re)starts with: config.json on a fresh start (step None), else
  config.<step>.json when it differs from the config in force (None when it does not)."""
  workdir = Path(workdir)
  text = (
    config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort") else json.dumps(config, indent=2)
  )
  if step is None:  # a fresh start: the configs of resumes of checkpoints that no longer exist go
    path = workdir / "config.json"
    for _, stale in recorded_configs(workdir):
      if stale != path:
        stale.unlink()
  else:
    current = latest_config(workdir)
    if current is not None and not config_diff(current[1], json.loads(text)):
      return None
    path = workdir / f"config.{step}.json"
  write_atomic(path, text)
  return path
