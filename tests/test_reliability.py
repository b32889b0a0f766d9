"""Runs that never share a workdir, never lose a result and fail early and clearly (issue 24, trainer side).

Every test makes a real fault: a second process holding the workdir's lock, then SIGKILLed; a trainer
SIGKILLed between its last checkpoint and its final evaluations, or between two checkpoints; a resume
with a changed model; a full filesystem (a small tmpfs, as root) or an unwritable checkpoint directory.
The trainers killed or starved of disk run in a subprocess: this file run as a script
(`python tests/test_reliability.py '{"mode": ..., ...}'`, see `_worker`), with the test evaluations below.
"""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `configs` (as a script)
sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers, conftest (as a script)

from configs import siglip_b16  # noqa: E402
from helpers import tiny  # noqa: E402
from vlm.evals import EVALS  # noqa: E402
from vlm.metrics_writer import read_metrics  # noqa: E402
from vlm.objectives import build_objective  # noqa: E402
from vlm.train import train  # noqa: E402
from vlm.workdir import WorkdirLockedError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()


# --------------------------------------------------------------- evaluations used as faults --


@EVALS.register("test_param_norm")
class ParamNorm:
  """A cheap evaluation with a result: the global norm of the parameters."""

  def __init__(self, *, data, rules, predict_fns, mesh, prefix: str):
    self.prefix = prefix

  def __call__(self, params) -> dict[str, float]:
    import optax

    return {f"{self.prefix}/norm": float(jax.jit(optax.global_norm)(params))}


@EVALS.register("test_sigkill")
class SigKill:
  """SIGKILLs its own process at its `at_call`-th call, once checkpoint `wait_for_step` is committed;
  `torn_line` first appends half a metrics row (as a kill inside MetricWriter.write would leave)."""

  def __init__(
    self,
    *,
    data,
    rules,
    predict_fns,
    mesh,
    prefix: str,
    at_call: int = 1,
    wait_for_step: int | None = None,
    workdir: str = "",
    torn_line: bool = False,
  ):
    self.at_call, self.wait_for_step, self.workdir, self.torn_line = at_call, wait_for_step, Path(workdir), torn_line
    self.calls = 0

  def __call__(self, params) -> dict[str, float]:
    self.calls += 1
    if self.calls == self.at_call:
      if self.wait_for_step is not None:
        deadline = time.time() + 60
        while not (self.workdir / "checkpoints" / str(self.wait_for_step)).exists() and time.time() < deadline:
          time.sleep(0.02)
      if self.torn_line:
        with open(self.workdir / "metrics.jsonl", "a") as f:
          f.write('{"step": 3, "train/lo')
      os.kill(os.getpid(), signal.SIGKILL)
    return {}


@EVALS.register("test_break_disk")
class BreakDisk:
  """At its first call (checkpoint 1 committed) makes the checkpoint directory unwritable: mode 'fill'
  fills its filesystem (a small tmpfs) up to `leave` bytes, 'chmod' makes it read-only (0o500),
  'patch' (fallback only) makes orbax's save raise OSError(ENOSPC)."""

  def __init__(self, *, data, rules, predict_fns, mesh, prefix: str, mode: str, workdir: str, leave: int = 200_000):
    self.mode, self.directory, self.leave, self.done = mode, Path(workdir) / "checkpoints", leave, False

  def __call__(self, params) -> dict[str, float]:
    if self.done:
      return {}
    self.done = True
    while not (self.directory / "1").exists():
      time.sleep(0.02)
    if self.mode == "chmod":
      os.chmod(self.directory, 0o500)
    elif self.mode == "fill":
      # Unbuffered: a buffered file keeps the bytes of the write that hit ENOSPC and retries them on
      # truncate(), which then fails as well (seen once in a full-suite run).
      with open(self.directory / "filler", "wb", buffering=0) as f:
        try:
          while True:
            f.write(b"\0" * 65536)
        except OSError:
          pass
        f.truncate(max(0, f.tell() - self.leave))
    else:
      import orbax.checkpoint as ocp

      def save(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

      ocp.CheckpointManager.save = save
    return {}


# ------------------------------------------------------------------------------- helpers --


def _config(data_dir, steps: int, evals: dict | None = None, **over):
  c = tiny(siglip_b16, data_dir, steps=steps, **over)
  c.evals = evals or {}
  return c


def _worker(args: dict) -> None:
  """A trainer in this process (the subprocess side of the tests)."""
  c = _config(args["data_dir"], args["steps"], args.get("evals"), **args.get("over", {}))
  if args.get("mode") != "disk":
    train(c, args["workdir"])
    return
  from vlm import checkpoint

  try:
    train(c, args["workdir"])
  except checkpoint.CheckpointWriteError as e:
    import traceback

    traceback.print_exc()  # what the user sees
    directory = Path(args["workdir"]) / "checkpoints"
    os.chmod(directory, 0o755)
    (directory / "filler").unlink(missing_ok=True)
    params = checkpoint.load_params(args["workdir"], step=1)  # the earlier checkpoint is intact
    print(
      "RESULT "
      + json.dumps(
        {
          "message": str(e),
          "errno": e.errno,
          "listing": sorted(os.listdir(directory)),
          "leaves": len(jax.tree.leaves(params)),
        }
      ),
      flush=True,
    )
    sys.exit(3)


def _env() -> dict:
  return dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")


def _run_worker(args: dict, prefix: tuple = (), timeout: int = 300) -> subprocess.CompletedProcess:
  return subprocess.run(
    [*prefix, sys.executable, str(THIS), json.dumps(args)],
    cwd=ROOT,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _steps_per_key(rows: list[dict]) -> dict[str, list[int]]:
  out: dict[str, list[int]] = {}
  for r in rows:
    for k in r:
      if k != "step":
        out.setdefault(k, []).append(r["step"])
  return out


# ---------------------------------------------------------------------------- 2. the lock --

_HOLD = """
import sys, time
from vlm.workdir import WorkdirLock
WorkdirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_second_trainer_fails_fast_and_a_killed_holders_lock_is_taken_over(data_dir, tmp_path, capsys):
  """A real second process holds <workdir>/LOCK: train() fails at once, naming its host, pid, start time
  and the lock file, and writes nothing; once that process is SIGKILLed, train() takes the stale lock over."""
  wd = tmp_path / "wd"
  wd.mkdir()
  holder = subprocess.Popen(
    [sys.executable, "-c", _HOLD, str(wd)], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    c = _config(data_dir, steps=1)
    t0 = time.time()
    with pytest.raises(WorkdirLockedError) as e:
      train(c, wd)
    assert time.time() - t0 < 15, "the second trainer did not fail fast"
    message = str(e.value)
    for part in (f"pid {holder.pid}", f"host {socket.gethostname()}", "started 20", str(wd / "LOCK")):
      assert part in message, message
    assert sorted(os.listdir(wd)) == ["LOCK"], "the second trainer wrote into a workdir in use"
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  assert json.loads((wd / "LOCK").read_text())["pid"] == holder.pid  # left behind by the killed holder
  capsys.readouterr()
  train(c, wd)
  out = capsys.readouterr().out
  assert "taking over the stale lock" in out and f"pid {holder.pid}" in out, out
  assert [r["step"] for r in read_metrics(wd) if "train/loss" in r] == [1]
  assert not (wd / "LOCK").exists(), "the lock was not released at the end of the run"


# -------------------------------------------------------------- 3. final evaluations on resume --


@pytest.mark.slow
def test_final_evaluations_run_on_resume_after_a_kill_before_them(data_dir, tmp_path, capsys):
  """The trainer is SIGKILLed after its last checkpoint is committed, in its final evaluations: the rerun
  evaluates what metrics.jsonl lacks at the last step (once: a third run evaluates nothing)."""
  wd = tmp_path / "wd"
  kill = {"type": "test_sigkill", "every": 0, "wait_for_step": 2, "workdir": str(wd)}
  norm = {"type": "test_param_norm", "every": 0}
  killed = _run_worker(dict(workdir=str(wd), data_dir=str(data_dir), steps=2, evals={"kill": kill, "norm": norm}))
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert (wd / "checkpoints" / "2").exists()
  assert not any("norm/norm" in r for r in read_metrics(wd))
  original = (wd / "config.json").read_text()

  c = _config(data_dir, steps=2, evals={"norm": norm})
  capsys.readouterr()
  out = train(c, wd)
  printed = capsys.readouterr()
  assert "Resumed from" in printed.out
  rows = read_metrics(wd)
  finals = [r for r in rows if "norm/norm" in r]
  assert [r["step"] for r in finals] == [2], rows
  assert out["norm/norm"] == finals[0]["norm/norm"] and "train/loss" in out  # the run's result is returned
  assert (wd / "config.json").read_text() == original and (wd / "config.2.json").exists()

  before = (wd / "metrics.jsonl").read_text()
  train(c, wd)
  assert (wd / "metrics.jsonl").read_text() == before, "a finished run evaluated again"


# --------------------------------------------------------------- 5. metrics.jsonl after resume --


@pytest.mark.slow
def test_metrics_rows_are_unique_after_a_kill_between_checkpoints(data_dir, tmp_path):
  """Logged every step, checkpointed every 2 steps (asynchronously), SIGKILLed at step 3 (after checkpoint
  2 committed) while writing a row (half a line is appended first, as a kill in MetricWriter.write leaves):
  the resumed run logs steps 3 and 4 once, and every key's steps increase strictly."""
  wd = tmp_path / "wd"
  kill = {"type": "test_sigkill", "every": 1, "at_call": 3, "wait_for_step": 2, "workdir": str(wd), "torn_line": True}
  over = {"checkpoint_every": 2, "log_every": 1}
  killed = _run_worker(dict(workdir=str(wd), data_dir=str(data_dir), steps=4, evals={"kill": kill}, over=over))
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert (wd / "checkpoints" / "2").exists() and not (wd / "checkpoints" / "4").exists()
  assert [r["step"] for r in read_metrics(wd) if "train/loss" in r] == [1, 2, 3]

  train(_config(data_dir, steps=4, **over), wd)
  rows = read_metrics(wd)
  for key, steps in _steps_per_key(rows).items():
    assert steps == sorted(set(steps)), f"{key}: steps {steps}"
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
  assert (wd / "metrics.jsonl").read_text().endswith("}\n")


# ------------------------------------------------------------------------ 4. resume validation --


def test_resume_with_a_changed_model_names_the_keys_and_parameters(siglip_workdir, data_dir, tmp_path):
  """A resume whose model no longer fits the checkpoint fails before writing anything, listing the changed
  config key and the parameter paths whose shapes differ; a resume with a longer run is accepted and its
  config recorded as config.<step>.json beside the untouched config.json."""
  wd = tmp_path / "wd"
  shutil.copytree(siglip_workdir, wd)
  original, metrics = (wd / "config.json").read_text(), (wd / "metrics.jsonl").read_text()
  c = tiny(siglip_b16, data_dir, steps=6)
  c.model["image"]["width"] = 48
  with pytest.raises(ValueError) as e:
    train(c, wd)
  message = str(e.value)
  assert "model.image.width: 32 -> 48" in message, message
  assert "params/img/embedding/conv/kernel: shape (8, 8, 3, 48) != checkpoint (8, 8, 3, 32)" in message, message
  assert (wd / "config.json").read_text() == original and (wd / "metrics.jsonl").read_text() == metrics
  assert sorted(os.listdir(wd)) == sorted(os.listdir(siglip_workdir)), "the failed resume wrote into the workdir"

  c = tiny(siglip_b16, data_dir, steps=7)
  c.evals = {}
  train(c, wd)
  assert (wd / "config.json").read_text() == original
  recorded = json.loads((wd / "config.6.json").read_text())
  assert recorded["total_steps"] == 7 and recorded["evals"] == {}
  assert [r["step"] for r in read_metrics(wd) if "train/loss" in r] == list(range(1, 8))
  from vlm.load import load_workdir_config

  assert load_workdir_config(wd).total_steps == 7 and load_workdir_config(wd, step=5).total_steps == 6


# ---------------------------------------------------------------------- 6. early validation --


BAD_KEYS = [
  ("total_steps", 0, r"config\.total_steps: must be an int >= 1, got 0"),
  ("total_steps", -3, r"config\.total_steps: .*got -3"),
  ("batch_size", 0, r"config\.batch_size: must be an int >= 1, got 0"),
  ("checkpoint_every", -1, r"config\.checkpoint_every: must be an int >= 0, got -1"),
  ("log_every", -1, r"config\.log_every: must be an int >= 0, got -1"),
  ("accum_steps", 0, r"config\.accum_steps: must be an int >= 1, got 0"),
  ("accum_steps", 3, r"config\.batch_size=16 is not divisible by config\.accum_steps=3"),
  ("batch_size", 12, r"config\.batch_size=12 is not divisible by the 8 data-parallel devices"),
  ("keep_checkpoints", 0, r"config\.keep_checkpoints: must be an int >= 1 or None, got 0"),
  ("lr", -1.0, r"config\.lr: must be a finite number >= 0, got -1\.0"),
  ("objective.loss", "sigmoidd", r"config\.objective\.loss: unknown value 'sigmoidd'; valid: 'sigmoid', 'softmax'"),
  ("objective.impl", "rign", r"config\.objective\.impl: unknown value 'rign'; valid: 'all_gather', 'ring', 'local'"),
  ("objective.temperature", 1.0, r"config\.objective: 'contrastive' has no option temperature; its options: loss"),
  ("evals.zeroshot.every", -1, r"config\.evals\.zeroshot\.every: must be an int >= 0 or None, got -1"),
  ("evals.zeroshot.type", "zeroshott", r"config\.evals\.zeroshot\.type: unknown evaluation 'zeroshott'"),
  ("objective_name", "contrastiv", r"config\.objective_name: unknown objective 'contrastiv'"),
]


@pytest.mark.parametrize("key,value,match", BAD_KEYS, ids=[f"{k}={v}" for k, v, _ in BAD_KEYS])
def test_bad_trainer_keys_fail_before_anything_runs(data_dir, tmp_path, key, value, match):
  """Each bad value is a ValueError naming the key, raised before the workdir is even created."""
  c = tiny(siglip_b16, data_dir, steps=2)
  *path, last = key.split(".")
  node = c
  for p in path:
    node = node[p]
  with node.ignore_type():
    node[last] = value
  wd = tmp_path / "wd"
  with pytest.raises(ValueError, match=match):
    train(c, wd)
  assert not wd.exists()


@pytest.mark.parametrize(
  "name,options,match",
  [
    ("coca", dict(loss="hinge"), r"config\.objective\.loss: unknown value 'hinge'; valid: 'sigmoid', 'softmax'"),
    ("vlmo", dict(impl="gather"), r"config\.objective\.impl: unknown value 'gather'"),
    ("vlmo", dict(mim_masking="grid"), r"config\.objective\.mim_masking: unknown value 'grid'; valid: 'blockwise'"),
    ("flava", dict(impl="gather"), r"config\.objective\.impl: unknown value 'gather'"),
    ("flava", dict(mim_masking="grid"), r"config\.objective\.mim_masking: unknown value 'grid'"),
    (
      "lm",
      dict(label_smothing=0.1),
      r"config\.objective: 'lm' has no option label_smothing; its options: .*label_smoothing",
    ),
  ],
)
def test_objective_options_are_checked_when_built(name, options, match):
  with pytest.raises(ValueError, match=match):
    build_objective(name, options)


# ---------------------------------------------------------------------- 9. I/O errors on save --


def _disk_fault(scratch: Path) -> tuple[str, tuple]:
  """('chmod', ()) when permissions bind this user; as root (who ignores them) ('fill', a command prefix that
  runs the worker in a private mount namespace with a 4 MiB tmpfs on <workdir>/checkpoints) when one can be
  made; else ('patch', ()): the fallback, a monkeypatched ENOSPC."""
  if os.geteuid() != 0:
    return "chmod", ()
  scratch.mkdir()
  if shutil.which("unshare") and shutil.which("mount"):
    probe = subprocess.run(
      ["unshare", "-m", "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(scratch)], capture_output=True
    )
    if probe.returncode == 0:  # $0: the workdir, "$@": the worker's command line
      return "fill", ("unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=4m tmpfs "$0/checkpoints" && exec "$@"')
  return "patch", ()


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_a_failed_save_is_one_clear_error_and_keeps_the_earlier_checkpoint(data_dir, tmp_path, async_save):
  """The checkpoint directory becomes unwritable after checkpoint 1: a full filesystem (a 4 MiB tmpfs in a
  private mount namespace, filled by another writer; when running as root) or a directory made read-only
  (chmod 0o500; when not root). Only where neither can be made (root without mount rights) the fallback
  is a monkeypatched OSError(ENOSPC) from orbax's save. The run fails with one CheckpointWriteError naming
  the checkpoint path, the errno message and the free space; orbax's echoes of it are not printed; checkpoint
  1 is intact."""
  mode, prefix = _disk_fault(tmp_path / "probe")
  wd = tmp_path / "wd"
  (wd / "checkpoints").mkdir(parents=True)
  if prefix:
    prefix = (*prefix, str(wd))
  args = dict(
    mode="disk",
    workdir=str(wd),
    data_dir=str(data_dir),
    steps=3,
    evals={"break": {"type": "test_break_disk", "every": 1, "mode": mode, "workdir": str(wd)}},
    over={"checkpoint_every": 1, "async_checkpoint": async_save},
  )
  run = _run_worker(args, prefix=prefix)
  output = run.stdout + run.stderr
  assert run.returncode == 3, output[-5000:]
  result = json.loads(output[output.index("RESULT ") + len("RESULT ") :].splitlines()[0])
  expected = {"fill": errno.ENOSPC, "patch": errno.ENOSPC, "chmod": errno.EACCES}[mode]
  assert result["errno"] == expected, result
  message = result["message"]
  assert f"could not write checkpoint {wd / 'checkpoints' / '2'}: [Errno {expected}] {os.strerror(expected)}" in message
  assert "MiB free of" in message and "checkpoints on disk, untouched: [1]" in message, message
  assert "1" in result["listing"] and result["leaves"] > 0
  echoes = [line for line in output.splitlines() if os.strerror(expected) in line or "os_error_code" in line]
  assert len(echoes) <= 3, f"{len(echoes)} lines repeat the error:\n" + "\n".join(echoes[:20])
  assert len(output.splitlines()) < 60, output[-5000:]


if __name__ == "__main__":
  _worker(json.loads(sys.argv[1]))
