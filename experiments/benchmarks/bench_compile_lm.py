"""Compile time of a deep DecoderLM's train step: unrolled blocks vs `scan_layers=True`, with and without remat.

    python experiments/benchmarks/bench_compile_lm.py [--depth 32 --width 256 --seq 128 --batch 2]

The train step is what vlm.train compiles for an LM, reduced to its parts: value_and_grad of the next-token
cross-entropy of a DecoderLM (Llama layout: RMSNorm, GQA, SwiGLU, RoPE) and an optax adamw update. Each variant
is lowered from abstract shapes (jax.jit(step).lower(...)) and compiled (.compile()); the table gives the two
times, the size of the lowered StableHLO text, and the mean of 3 runs of the compiled step on random params
(after one warm-up run). Sizes default to a narrow 32-layer model so that it runs on a 2-core CPU: what scan
saves is compile work per layer, which does not depend on the width.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from vlm.models.decoder import DecoderLM  # noqa: E402

VARIANTS = (
  ("unrolled", False, "none"),
  ("scan_layers", True, "none"),
  ("unrolled + remat 'dots'", False, "dots"),
  ("scan_layers + remat 'dots'", True, "dots"),
  ("unrolled + remat 'full'", False, "full"),
  ("scan_layers + remat 'full'", True, "full"),
)


def measure(args, scan: bool, remat: str) -> dict:
  model = DecoderLM(
    vocab_size=args.vocab,
    width=args.width,
    depth=args.depth,
    num_heads=args.heads,
    num_kv_heads=args.heads // 2,
    mlp_dim=4 * args.width,
    scan_layers=scan,
    remat_policy=remat,
  )
  tokens = jax.ShapeDtypeStruct((args.batch, args.seq + 1), jnp.int32)
  params = nn.meta.unbox(
    jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 8), jnp.int32))["params"]
  )
  tx = optax.adamw(1e-4)
  opt = jax.eval_shape(tx.init, params)

  def step(p, o, toks):
    def loss(p):
      logits = model.apply({"params": p}, toks[:, :-1], train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:]).mean()

    value, grads = jax.value_and_grad(loss)(p)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, value

  jitted = jax.jit(step, donate_argnums=(0, 1))
  t0 = time.perf_counter()
  lowered = jitted.lower(params, opt, tokens)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  hlo_chars = len(lowered.as_text())
  # Run it: random params (no init compile), a few steps.
  rng = np.random.default_rng(0)
  p = jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape), s.dtype), params)
  o = tx.init(p)
  toks = jnp.asarray(rng.integers(0, args.vocab, (args.batch, args.seq + 1)), jnp.int32)
  p, o, v = compiled(p, o, toks)
  v.block_until_ready()
  t3 = time.perf_counter()
  for _ in range(3):
    p, o, v = compiled(p, o, toks)
  v.block_until_ready()
  step_s = (time.perf_counter() - t3) / 3
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  return dict(
    lower_s=round(t1 - t0, 2),
    compile_s=round(t2 - t1, 2),
    hlo_chars=hlo_chars,
    step_s=round(step_s, 3),
    params=n_params,
    loss=round(float(v), 3),
  )


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--depth", type=int, default=32)
  p.add_argument("--width", type=int, default=256)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--vocab", type=int, default=1024)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--only", default="", help="comma-separated variant indices (0-5) to run; default all")
  args = p.parse_args()
  chosen = [VARIANTS[int(i)] for i in args.only.split(",")] if args.only else list(VARIANTS)
  print(
    f"DecoderLM depth {args.depth}, width {args.width}, {args.heads} heads, vocab {args.vocab}; train step on "
    f"[{args.batch}, {args.seq}] tokens; jax {jax.__version__}, {jax.devices()[0].platform}",
    flush=True,
  )
  rows = []
  for name, scan, remat in chosen:
    r = dict(variant=name, **measure(args, scan, remat))
    rows.append(r)
    print(json.dumps(r), flush=True)
  print("\n| variant | lower (s) | compile (s) | StableHLO chars | step (s) |\n|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['variant']} | {r['lower_s']} | {r['compile_s']} | {r['hlo_chars']:,} | {r['step_s']} |")


if __name__ == "__main__":
  main()
