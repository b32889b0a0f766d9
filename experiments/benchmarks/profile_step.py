r"""Where a train step's time goes: the step of any config under `jax.profiler`, its XLA ops summed.

    python experiments/benchmarks/profile_step.py --config=configs/siglip_b16.py \
        --config.model.image.variant=S/16 --config.batch_size=16 [--steps=2 --top=25 --trace_dir=DIR]

Builds the step as bench_train.py does (vlm's own trainer pieces, one batch of the config's shapes),
runs it `--steps` times under `jax.profiler.trace`, and prints the XLA ops' time per step grouped two
ways: by the kind of op (the HLO instruction name without its number: `ynn_fusion` = XLA:CPU's
matmul fusions, `copy_bitcast_fusion` = layout copies, ...) and by the model code that made it (the
op's `op_name` metadata with the layer index dropped, e.g. `img/encoder/block/mlp/fc1/dot_general`).
On XLA:CPU independent ops may run at once on different cores, so the per-op sums can exceed the
step's wall time; compare shares, not totals, with a peer's profile.
"""

import collections
import glob
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `configs`

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vlm.data import make_pipeline  # noqa: E402
from vlm.nn.attention import attention_implementation  # noqa: E402
from vlm.train import setup  # noqa: E402
from vlm.train_step import create_train_state, make_train_step  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/siglip_b16.py.", lock_config=False)
flags.DEFINE_integer("steps", 2, "Profiled steps (after a compile and a warm-up step).")
flags.DEFINE_integer("top", 25, "Rows printed per grouping.")
flags.DEFINE_string("trace_dir", None, "Keep the trace here (default: a temporary directory).")
FLAGS = flags.FLAGS

_SKIP = ("$", "Thunk", "Slinky", "end:", "PjitFunction", "Common", "ParseArguments")


def op_sources(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> the model code that made it (op_name metadata, layer index dropped)."""
  out = {}
  for m in re.finditer(r"%(\S+) = .*?op_name=\"(.*?)\"", hlo_text):
    where = re.sub(r"^jit\([^)]*\)/", "", m.group(2))
    where = re.sub(r"^.*?/((?:img|txt|lm|vision|text|encoder|decoder)/)", r"\1", where)
    out[m.group(1)] = re.sub(r"(block|layers?)_\d+", r"\1", where)
  return out


def op_times(trace_dir: str) -> dict[str, float]:
  """Microseconds per XLA op name, summed over the trace."""
  path = sorted(glob.glob(f"{trace_dir}/plugins/profile/*/*.trace.json.gz"))[-1]
  times: dict[str, float] = collections.defaultdict(float)
  for e in json.load(gzip.open(path))["traceEvents"]:
    if e.get("ph") == "X" and not e["name"].startswith(_SKIP):
      times[e["name"]] += e["dur"]
  return times


def main(argv) -> None:
  del argv
  config = FLAGS.config
  config.evals = {}
  with attention_implementation(config.get("attention_impl")):
    mesh, rules, model, objective, tx, _, _ = setup(config)
    batch = next(make_pipeline(config.data, split="train", batch_size=config.batch_size, mesh=mesh, seed=config.seed))
    state, shardings = create_train_state(model, tx, mesh, rules, objective.init_args(batch), seed=config.seed)
    step = make_train_step(model, objective, tx, mesh, rules, shardings, accum_steps=config.get("accum_steps", 1))
    sources = op_sources(step.compiled(state, batch).as_text())
    state, _ = step(state, batch)
    jax.block_until_ready(state)
    trace_dir = FLAGS.trace_dir or tempfile.mkdtemp(prefix="vlm-profile-")
    t0 = time.perf_counter()
    with jax.profiler.trace(trace_dir):
      for _ in range(FLAGS.steps):
        state, _ = step(state, batch)
      jax.block_until_ready(state)
    wall = (time.perf_counter() - t0) / FLAGS.steps
  times = op_times(trace_dir)
  total = sum(times.values())
  print(
    f"wall {wall:.3f} s/step (profiled); XLA ops {total / 1e6 / FLAGS.steps:.3f} s/step summed; trace in {trace_dir}"
  )
  for title, key in (
    ("by kind of op", lambda n: re.sub(r"[.\d]+$", "", n)),
    ("by model code", lambda n: sources.get(n, "?")),
  ):
    groups: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for name, us in times.items():
      g = groups[key(name)]
      g[0] += us
      g[1] += 1
    print(f"\n{title}: ms/step, share, ops per step")
    for name, (us, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[: FLAGS.top]:
      print(f"{us / 1e3 / FLAGS.steps:9.1f} {100 * us / total:5.1f}% {n:5d}  {name[:110]}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
