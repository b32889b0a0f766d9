"""Contrastive region guidance (CRG) sweep: region-question accuracy of a trained grounding model
(configs/grounding.py) with plain decoding and with CRG at several (alpha, plausibility) settings.

    python experiments/crg_sweep.py --workdir=/tmp/grounding_demo --split=validation \
        --settings=1:0,1:0.2,10:0.1,20:0.2,50:0.1 [--max_examples=200]

Choose the setting on the validation split and report it on the test split (the grounding demo's
`region_qa` eval: crg_alpha=20, crg_plausibility=0.2, chosen this way; README, "Grounding").
Prints one JSON line per setting: accuracy over all asked objects, the main objects and the corner
distractors.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `configs`

from vlm.load import load_model_and_params, load_workdir_config  # noqa: E402
from vlm.evals.grounding import RegionQA  # noqa: E402
from vlm.models import predict_fns  # noqa: E402


def parse_settings(text: str) -> list[tuple[float, float]]:
  """'a:b,a:b' -> [(alpha, plausibility), ...]."""
  out = []
  for item in text.split(","):
    try:
      a, b = (float(x) for x in item.split(":"))
    except ValueError:
      raise SystemExit(f"--settings: {item!r} is not ALPHA:PLAUSIBILITY (e.g. 20:0.2)") from None
    out.append((a, b))
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--split", default="validation")
  ap.add_argument("--max_examples", type=int, default=200, help="images (each asks about all its named objects)")
  ap.add_argument("--settings", default="1:0,1:0.2,10:0.1,20:0.2,50:0.1", help="ALPHA:PLAUSIBILITY,...")
  args = ap.parse_args()
  settings = parse_settings(args.settings)
  config = load_workdir_config(args.workdir)
  model, mesh, params = load_model_and_params(config, args.workdir)
  ev = RegionQA(
    data=config.data,
    rules=config.rules,
    predict_fns=predict_fns(model),
    mesh=mesh,
    prefix="r",
    split=args.split,
    max_examples=args.max_examples,
    max_new_tokens=4,
    crg_alpha=0.0,
  )

  def short(out: dict[str, float]) -> dict[str, float]:  # r/accuracy_crg_main -> main
    return {(k.split("_")[-1] if k.endswith(("_main", "_distractor")) else "all"): round(v, 4) for k, v in out.items()}

  print(json.dumps(dict(setting="plain", **short(ev(params)))), flush=True)
  for a, b in settings:  # the questions and prompts are built once; only CRG decoding runs again
    print(json.dumps(dict(setting=f"crg a={a:g} plausibility={b:g}", **short(ev.crg_scores(params, a, b)))), flush=True)


if __name__ == "__main__":
  main()
