"""Input-pipeline throughput: examples/s per CPU core at 224 px (embedded scenes and JPEG files).

    python experiments/benchmarks/bench_data.py [--batches 30 --batch_size 64]

Runs the pipeline in the main process (data.worker_count=0), i.e. on one core, so
examples/s is examples/s per core. Pipeline: decode -> random_resized_crop(224) ->
flip_lr -> normalize('clip') -> tokenize -> batch (numpy; no device transfer).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image

from vlm.data import embedded, get_default_config, make_pipeline

PP = "decode|random_resized_crop(224, scale=(0.5, 1))|flip_lr|normalize('clip')"


def _rate(config, batches: int, batch_size: int) -> float:
  it = make_pipeline(config, split="train", batch_size=batch_size, mesh=None, seed=0, pp=PP)
  next(it)  # warm up (opens files, first decode)
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * batch_size / (time.perf_counter() - t0)


def _write_jpegs(root: str, n: int) -> str:
  rng = np.random.default_rng(0)
  with open(os.path.join(root, "m.jsonl"), "w") as f:
    for i in range(n):
      base = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)  # smooth-ish photo-like content
      img = Image.fromarray(base).resize((500, 375), Image.Resampling.BICUBIC)
      img.save(os.path.join(root, f"{i}.jpg"), quality=90)
      f.write(json.dumps({"image": f"{i}.jpg", "caption": f"photo number {i}"}) + "\n")
  return os.path.join(root, "m.jsonl")


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--batches", type=int, default=30)
  p.add_argument("--batch_size", type=int, default=64)
  a = p.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    c = get_default_config()
    c.data_dir = tmp
    c.builder.update(dict(num_train=4000, num_validation=10, num_test=10))
    t0 = time.perf_counter()
    embedded.build(tmp, **dict(c.builder))
    print(f"embedded build (4000/10/10 at 64 px): {time.perf_counter() - t0:.1f}s")
    r = _rate(c, a.batches, a.batch_size)
    print(f"embedded scenes (64 px PNG -> 224): {r:.0f} examples/s per core")
    c.source = "jsonl:" + _write_jpegs(tmp, 512)
    c.tokenizer = embedded.tokenizer_path(tmp, **dict(c.builder))
    r = _rate(c, a.batches, a.batch_size)
    print(f"JPEG files (500x375 -> 224): {r:.0f} examples/s per core")


if __name__ == "__main__":
  main()
