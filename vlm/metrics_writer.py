"""Metric sinks: <workdir>/metrics.jsonl (one JSON object per logged step), TensorBoard, wandb.

metrics.jsonl holds rows {"step": N, key: value, ...}; a step may have several rows (training
metrics, then each round of evaluations). A resumed run first cuts the file back to the rows of
its checkpoint's step and before (`truncate_metrics`), so steps replayed after a kill are not
logged twice: for every key, the steps of its rows increase strictly.
"""

import json
import math
from pathlib import Path
from typing import Any

import jax

from vlm.workdir import write_atomic


class MetricWriter:
  """Writes from process 0 only. Non-finite values are written as null in JSON."""

  def __init__(
    self, workdir: str | Path, tensorboard: bool = True, wandb: dict | None = None, purge_step: int | None = None
  ):
    """purge_step: a resumed run's first new step; TensorBoard then hides the events of steps >= it that
    the killed run had written (tensorboardX's SessionLog.START)."""
    self.active = jax.process_index() == 0
    self.path = Path(workdir) / "metrics.jsonl"
    self.tb = self.wandb = None
    if not self.active:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if tensorboard:
      from tensorboardX import SummaryWriter

      self.tb = SummaryWriter(str(Path(workdir) / "tensorboard"), purge_step=purge_step)
    if wandb:
      import wandb as wandb_lib  # optional: installed by the user who asks for it

      self.wandb = wandb_lib.init(**wandb)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.active:
      return
    clean = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}
    with self.path.open("a") as f:
      f.write(json.dumps({"step": int(step), **clean}) + "\n")
    if self.tb is not None:
      for k, v in clean.items():
        if v is not None:
          self.tb.add_scalar(k, v, step)
      self.tb.flush()
    if self.wandb is not None:
      self.wandb.log(clean, step=step)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()
    if self.wandb is not None:
      self.wandb.finish()


def _parse(text: str, path: Path) -> list[dict[str, Any]]:
  """The rows of a metrics.jsonl text; a last line cut short by a kill (no newline, no JSON) is dropped."""
  lines = text.split("\n")
  rows = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except ValueError:
      if i == len(lines) - 1:  # torn by a kill mid-write
        break
      raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:200]!r}") from None
  return rows


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
  """All rows of <workdir>/metrics.jsonl (without a torn last line)."""
  path = Path(workdir) / "metrics.jsonl"
  return _parse(path.read_text(), path) if path.exists() else []


def truncate_metrics(workdir: str | Path, last_step: int) -> int:
  """Keeps the rows of <workdir>/metrics.jsonl with step <= last_step (and drops a torn last line):
  written to a temporary file, then renamed over the old one, so a kill leaves one or the other.
  Returns the number of rows dropped."""
  path = Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return 0
  text = path.read_text()
  rows = _parse(text, path)
  kept = [r for r in rows if int(r.get("step", 0)) <= last_step]
  if len(kept) == len(rows) and (not text or text.endswith("\n")):
    return 0
  write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
  return len(rows) - len(kept)
