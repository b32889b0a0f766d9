"""Metric sinks: <workdir>/metrics.jsonl (one JSON object per logged step), TensorBoard, wandb."""

import json
import math
from pathlib import Path
from typing import Any

import jax


class MetricWriter:
  """Writes from process 0 only. Non-finite values are written as null in JSON."""

  def __init__(self, workdir: str | Path, tensorboard: bool = True, wandb: dict | None = None):
    self.active = jax.process_index() == 0
    self.path = Path(workdir) / "metrics.jsonl"
    self.tb = self.wandb = None
    if not self.active:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if tensorboard:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(str(Path(workdir) / "tensorboard"))
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


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
  """All rows of <workdir>/metrics.jsonl."""
  path = Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
