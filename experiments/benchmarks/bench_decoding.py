"""Caption decoding speed: KV-cached vs uncached greedy decoding, and beam search, on a CoCa.

    python experiments/benchmarks/bench_decoding.py [--batch 64 --max_len 64 --repeats 3]

The model is the CoCa demo's (configs/coca_b16.py:demo) with random weights and the text length
raised to --max_len; every decode is forced to run all max_len - 1 steps (EOS is never chosen),
so the numbers are the cost of full-length captions. Uncached decoding recomputes the whole
decoder over the token buffer at every step (vlm.decoding.uncached_step_fn), as a model without
a cache must. Prints one JSON line per method: compile and per-run seconds, tokens/s.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `configs`

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import coca_b16  # noqa: E402
from vlm import decoding  # noqa: E402
from vlm.models import build_model, predict_fns  # noqa: E402

BOS, EOS, PAD = 3, 1, 0


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--max_len", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  cfg = coca_b16.get_config("demo")
  cfg.model["text"]["max_len"] = args.max_len
  model = build_model("coca", cfg.model)
  images = jax.random.normal(jax.random.key(0), (args.batch, 32, 32, 3))
  tokens = jnp.full((args.batch, args.max_len), BOS, jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.key(1), images[:1], tokens[:1])["params"])
  params["txt"]["head"]["bias"] = params["txt"]["head"]["bias"].at[EOS].set(-1e9)  # full-length captions
  n_new = args.max_len - 1

  def cached(p, x, method, **kw):
    return predict_fns(model)["caption"](
      p, x, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len=args.max_len, method=method, **kw
    ).tokens

  def uncached(p, x):
    def logits_fn(buf):
      return model.apply({"params": p}, x, buf)[2]["logits"]

    prompt = jnp.full((x.shape[0], 1), BOS, jnp.int32)
    return decoding.greedy(
      decoding.uncached_step_fn(logits_fn),
      decoding.init_token_cache(x.shape[0], args.max_len),
      prompt,
      max_new_tokens=n_new,
      eos_id=EOS,
      pad_id=PAD,
    ).tokens

  runs = {
    "greedy_cached": jax.jit(lambda p, x: cached(p, x, "greedy")),
    "greedy_uncached": jax.jit(uncached),
    "beam4_cached": jax.jit(lambda p, x: cached(p, x, "beam", num_beams=4)),
  }
  for name, fn in runs.items():
    t0 = time.perf_counter()
    jax.block_until_ready(fn(params, images))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(params, images))
      times.append(time.perf_counter() - t0)
    best = min(times)
    print(
      json.dumps(
        dict(
          method=name,
          batch=args.batch,
          new_tokens=n_new,
          first_call_s=round(compile_s, 2),
          run_s=round(best, 3),
          tokens_per_s=round(args.batch * n_new / best, 1),
          device=jax.devices()[0].device_kind,
        )
      ),
      flush=True,
    )


if __name__ == "__main__":
  main()
