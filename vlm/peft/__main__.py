"""`python -m vlm.peft merge --workdir=DIR --out=DIR2 [--step=N] [--alpha=A]`: a PEFT run's parameters
with LoRA merged into the base weights, written as a plain checkpoint (vlm.checkpoint.merge_workdir)."""

from absl import app, flags

from vlm.checkpoint import merge_workdir

USAGE = "usage: python -m vlm.peft merge --workdir=DIR --out=DIR2 [--step=N] [--alpha=A]"


def main(argv) -> None:
  f = flags.FLAGS
  if len(argv) != 2 or argv[1] != "merge":
    raise SystemExit(USAGE)
  if not f.workdir or not f.out:
    raise SystemExit("merge needs --workdir and --out")
  out = merge_workdir(f.workdir, f.out, f.step, f.alpha)
  print(f"Wrote merged parameters to {out}", flush=True)


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Workdir (or checkpoints directory) of a PEFT training run.")
  flags.DEFINE_string("out", None, "Where to write the merged plain checkpoint.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_float("alpha", None, "LoRA alpha (default: the workdir's config.json peft.alpha).")
  app.run(main)
