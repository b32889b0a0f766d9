"""experiments/sigmoid_vs_softmax.ipynb runs end to end (quick mode) and produces its figure.

The code cells are taken from the .ipynb with the stdlib json module and run as one script in a
fresh Python process (like a fresh kernel: its own JAX, matplotlib backend and config), with
VLM_NOTEBOOK_QUICK=1: tiny dataset and towers, one batch size, a few steps. No Jupyter needed.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import notebook_script

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "experiments" / "sigmoid_vs_softmax.ipynb"


def test_notebook_is_valid_and_has_no_stale_errors():
  nb = json.loads(NOTEBOOK.read_text())
  assert nb["nbformat"] == 4
  code = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert code and any("BATCH_SIZES" in "".join(c["source"]) for c in code)
  for cell in code:
    assert not any(o.get("output_type") == "error" for o in cell.get("outputs", [])), "saved outputs contain an error"
  compile(notebook_script(NOTEBOOK), str(NOTEBOOK), "exec")


@pytest.mark.slow
def test_notebook_runs_quick(tmp_path):
  script = tmp_path / "notebook.py"
  script.write_text(notebook_script(NOTEBOOK))
  workdir = tmp_path / "work"
  env = dict(
    os.environ,
    VLM_NOTEBOOK_QUICK="1",
    VLM_NOTEBOOK_WORKDIR=str(workdir),
    VLM_DATA_DIR=str(tmp_path / "data"),
    MPLBACKEND="Agg",
    TQDM_DISABLE="1",
    JAX_PLATFORMS="cpu",
    JAX_NUM_CPU_DEVICES=os.environ.get("JAX_NUM_CPU_DEVICES", "8"),
  )
  env.pop("VLM_NOTEBOOK_BATCH_SIZES", None)
  env.pop("VLM_NOTEBOOK_EXAMPLES", None)
  proc = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

  figure = workdir / "sigmoid_vs_softmax.png"
  assert figure.exists() and figure.stat().st_size > 1000
  results = json.loads((workdir / "results.json").read_text())
  runs = {(r["loss"], r["batch_size"]): r for r in results}
  assert set(loss for loss, _ in runs) == {"sigmoid", "softmax"}
  batch_sizes = {b for _, b in runs}
  assert batch_sizes and all(b % 8 == 0 for b in batch_sizes)
  assert set(runs) == {(loss, b) for loss in ("sigmoid", "softmax") for b in batch_sizes}
  for key, r in runs.items():
    for metric in ("zeroshot/top1", "retrieval/i2t_r1", "train/loss"):
      assert math.isfinite(r[metric]), (key, metric, r.get(metric))
    assert 0.0 <= r["zeroshot/top1"] <= 1.0
    assert r["steps"] >= 1 and r["curve"], key
