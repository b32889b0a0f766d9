"""Per-example arrays computed in chunks and saved as each chunk finishes, for resumable stages."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np


def fingerprint(obj) -> str:
  """A short stable hash of a JSON-able description of a stage's inputs."""
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


class ChunkStore:
  """Arrays [n, ...] for one stage, saved as `.npz` chunks of `chunk_size` rows (never pickled).

  The directory is named by the stage and a fingerprint of its inputs, so a changed model, source
  or setting starts afresh instead of mixing results; a chunk is written to a temporary file and
  renamed, so an interrupted write leaves no partial chunk.
  """

  def __init__(self, root: str | os.PathLike, stage: str, key, n: int, chunk_size: int):
    self.n, self.chunk_size = int(n), int(chunk_size)
    self.dir = Path(root) / f"{stage}-{fingerprint([key, self.n, self.chunk_size])}"
    self.dir.mkdir(parents=True, exist_ok=True)
    (self.dir / "key.json").write_text(json.dumps(key, sort_keys=True, default=str, indent=1))

  @property
  def num_chunks(self) -> int:
    return -(-self.n // self.chunk_size)

  def _path(self, c: int) -> Path:
    return self.dir / f"chunk-{c:06d}.npz"

  def missing(self) -> list[int]:
    return [c for c in range(self.num_chunks) if not self._path(c).exists()]

  def save(self, c: int, arrays: dict[str, np.ndarray]) -> None:
    tmp = self.dir / f".chunk-{c:06d}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, self._path(c))

  def load(self) -> dict[str, np.ndarray]:
    if self.missing():
      raise RuntimeError(f"{self.dir}: chunks {self.missing()[:5]}... are missing")
    parts = []
    for c in range(self.num_chunks):
      with np.load(self._path(c), allow_pickle=False) as z:
        parts.append({k: z[k] for k in z.files})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}

  def compute(self, fn: Callable[[int, int], dict[str, np.ndarray]], desc: str) -> dict[str, np.ndarray]:
    """Runs fn(start, stop) for each missing chunk (with a progress bar), then loads all rows."""
    from tqdm import tqdm

    todo = self.missing()
    with tqdm(
      total=self.n,
      initial=self.n - sum(self._rows(c) for c in todo),
      desc=desc,
      unit="ex",
      dynamic_ncols=True,
      mininterval=2.0,
    ) as bar:
      for c in todo:
        start = c * self.chunk_size
        stop = min(start + self.chunk_size, self.n)
        out = fn(start, stop)
        for k, v in out.items():
          if len(v) != stop - start:
            raise ValueError(f"{desc}: {k!r} has {len(v)} rows for chunk [{start}, {stop})")
        self.save(c, out)
        bar.update(stop - start)
    return self.load()

  def _rows(self, c: int) -> int:
    return min(self.chunk_size, self.n - c * self.chunk_size)
