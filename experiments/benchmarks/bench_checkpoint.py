"""Checkpoint save time of a replicated many-array tree: orbax's replica-parallel split of every array vs
vlm's default (only arrays of at least `vlm.checkpoint.MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL` per replica).

    python experiments/benchmarks/bench_checkpoint.py [--devices 8 --arrays 300 --repeats 3]

The tree is what a small model's state looks like to orbax: `--arrays` small float32 arrays (64-70 x 32, the
size of norms, biases and narrow kernels) plus one 4 MiB array, all replicated over a 1-D mesh of simulated
CPU devices. Both settings run in this process, alternating, through `vlm.checkpoint.Checkpointer` with
synchronous saves; the table gives the median seconds per save after one warm-up save of each.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--devices", type=int, default=8)
  ap.add_argument("--arrays", type=int, default=300)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax

  jax.config.update("jax_num_cpu_devices", args.devices)
  import numpy as np

  from vlm import checkpoint, parallel

  mesh = parallel.make_mesh([("data", -1)])
  rng = np.random.default_rng(0)
  tree = {
    f"p{i}": jax.device_put(rng.normal(size=(64 + i % 7, 32)).astype(np.float32), parallel.replicated(mesh))
    for i in range(args.arrays)
  }
  tree["big"] = jax.device_put(np.zeros((1024, 1024), np.float32), parallel.replicated(mesh))
  min_bytes = checkpoint.MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL
  settings = {
    "replica-parallel, every array (orbax)": 0,
    f"replica-parallel >= {min_bytes} B (vlm)": min_bytes,
  }
  times = {name: [] for name in settings}
  for r in range(args.repeats + 1):
    for name, min_bytes in settings.items():
      checkpoint.register_array_handler(min_bytes)  # the one option that differs
      ckpt = checkpoint.Checkpointer(tempfile.mkdtemp(), save_every=1, async_save=False)
      t = time.perf_counter()
      ckpt.save(1, {"params": tree}, force=True)
      ckpt.close()
      if r:  # the first round compiles the slicing ops
        times[name].append(time.perf_counter() - t)
  print(f"| setting | s per save ({args.arrays + 1} arrays, {args.devices} devices) |\n|---|---|")
  for name, ts in times.items():
    print(f"| {name} | {statistics.median(ts):.2f} |")


if __name__ == "__main__":
  main()
