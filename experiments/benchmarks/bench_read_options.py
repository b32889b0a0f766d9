"""CPU cost per batch of the SigLIP demo's input pipeline under grain read options (data.read_threads).

    python experiments/benchmarks/bench_read_options.py [--data_dir=/tmp/vlmdata] [--batches=8]

Builds `configs/siglip_b16.py:demo`'s train pipeline with data.prefetch = 0 (batches made on this
thread) for each read_threads setting and prints wall and process-CPU milliseconds per batch of 128.
read_threads > 0 buffers 2 batches of examples (grain's own default is 16 threads, 500 examples).
"""

import argparse
import time

from configs import siglip_b16
from vlm.data import pipeline


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--data_dir", default=None)
  p.add_argument("--batches", type=int, default=8)
  p.add_argument("--threads", default="0,1,2,16")
  args = p.parse_args()
  for threads in [int(t) for t in args.threads.split(",")]:
    c = siglip_b16.get_config("demo")
    if args.data_dir:
      c.data.data_dir = args.data_dir
    c.data.prefetch, c.data.read_threads = 0, threads
    it = pipeline.make_pipeline(c.data, split="train", batch_size=128, mesh=None, seed=0)
    next(it)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.batches):
      next(it)
    wall, cpu = (time.perf_counter() - wall) / args.batches, (time.process_time() - cpu) / args.batches
    print(
      f"read_threads={threads}: {wall * 1e3:.0f} ms/batch wall, {cpu * 1e3:.0f} ms/batch CPU "
      f"({128 / cpu:.0f} examples per CPU-second)",
      flush=True,
    )


if __name__ == "__main__":
  main()
