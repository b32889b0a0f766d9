"""Multi-host: 2 local processes x 2 CPU devices (gloo on loopback) train exactly as 1 process x 4.

Each process feeds its own rows of every global batch (vlm.data.pipeline); the losses of the
two runs must agree step by step.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("multihost_worker.py")
ROOT = Path(__file__).resolve().parents[1]
BUILDER = dict(num_train=256, num_validation=32, num_test=64, image_size=32, num_frames=0, seed=0, vocab_size=1000)
TIMEOUT_S = 300


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(args: dict, devices: int, log: Path) -> subprocess.Popen:
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  with open(log, "w") as f:
    return subprocess.Popen(
      [sys.executable, str(WORKER), json.dumps(args)], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT
    )


def _run_all(procs: list[tuple[subprocess.Popen, Path]]) -> None:
  """Waits for every process (TIMEOUT_S in all); on a failure or timeout kills the rest."""
  deadline = time.monotonic() + TIMEOUT_S
  try:
    pending = list(procs)
    while pending:
      for proc, log in list(pending):
        rc = proc.poll()
        if rc is None:
          continue
        pending.remove((proc, log))
        if rc:
          pytest.fail(f"{log.name} exited with {rc}:\n{log.read_text()[-4000:]}")
      if pending and time.monotonic() > deadline:
        pytest.fail(f"timed out after {TIMEOUT_S}s:\n" + "\n".join(log.read_text()[-2000:] for _, log in pending))
      time.sleep(0.2)
  finally:
    for proc, _ in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()


def _losses(workdir: Path) -> dict[int, float]:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  from vlm.data import embedded

  data_dir = tmp_path / "data"
  embedded.build(str(data_dir), **BUILDER)  # once, so the processes do not race to build it
  steps = 5
  config = {
    "data.data_dir": str(data_dir),
    "total_steps": steps,
    "log_every": 1,
    "batch_size": 16,
    "checkpoint_every": 1000,
    "tensorboard": False,
    "schedule.warmup_steps": 2,
    "model.image.depth": 1,
    "model.text.depth": 1,  # compilation dominates: keep the towers shallow
    **{f"data.builder.{k}": v for k, v in BUILDER.items()},
  }
  one, two = tmp_path / "one", tmp_path / "two"
  port = _free_port()
  logs = [tmp_path / "two_0.log", tmp_path / "two_1.log", tmp_path / "one.log"]
  procs = [
    _launch(
      dict(workdir=str(two), config=config, coordinator=f"127.0.0.1:{port}", num_processes=2, process_id=i),
      devices=2,
      log=logs[i],
    )
    for i in range(2)
  ]
  procs.append(_launch(dict(workdir=str(one), config=config), devices=4, log=logs[2]))  # the reference, alongside
  _run_all(list(zip(procs, logs)))

  for i in range(2):
    assert f"process {i}/2 with 2 of 4 devices: done" in (tmp_path / f"two_{i}.log").read_text()
  assert "process 0/1 with 4 of 4 devices: done" in (tmp_path / "one.log").read_text()
  want, got = _losses(one), _losses(two)
  assert sorted(want) == sorted(got) == list(range(1, steps + 1))
  for step in want:
    assert got[step] == pytest.approx(want[step], rel=1e-5), (step, got, want)
  assert len({round(v, 4) for v in want.values()}) > 1  # the model trains: the losses move
  assert (two / "checkpoints" / str(steps)).is_dir()


def test_single_process_does_not_initialize(monkeypatch):
  from vlm import parallel

  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  monkeypatch.delenv("VLM_DISTRIBUTED", raising=False)
  assert parallel.maybe_initialize_distributed() is False
  assert parallel.maybe_initialize_distributed("127.0.0.1:1234", 1, 0) is False
