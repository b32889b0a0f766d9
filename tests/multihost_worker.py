"""One process of a (multi-process) training run for tests/test_multihost.py.

    JAX_NUM_CPU_DEVICES=2 JAX_PLATFORMS=cpu python tests/multihost_worker.py '{"workdir": ..., \
        "coordinator": "127.0.0.1:PORT", "num_processes": 2, "process_id": 0, "config": {...}}'

Trains configs/siglip_b16.py:demo with the "config" overrides (dotted keys) and no evaluations,
going through the same `parallel.maybe_initialize_distributed` call as `vlm.train`'s main().
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `configs`

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", int(os.environ.get("JAX_NUM_CPU_DEVICES", "1")))

from vlm import parallel  # noqa: E402


def main(args: dict) -> None:
  parallel.maybe_initialize_distributed(args.get("coordinator"), args.get("num_processes"), args.get("process_id"))
  from configs.siglip_b16 import get_config
  from vlm.train import train

  c = get_config("demo")
  c.evals = {}
  for key, value in args.get("config", {}).items():
    *path, last = key.split(".")
    node = c
    for p in path:
      node = node[p]
    node[last] = value
  train(c, args["workdir"])
  print(
    f"process {jax.process_index()}/{jax.process_count()} with {jax.local_device_count()} of "
    f"{jax.device_count()} devices: done",
    flush=True,
  )


if __name__ == "__main__":
  main(json.loads(sys.argv[1]))
