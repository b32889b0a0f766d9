"""Every recipe's resolved config is what its golden file says (the net under refactors of configs/).

`RECIPES` lists each config file in configs/ that has a `get_config` and the variants it accepts
(`None` is the full recipe). The golden files in tests/golden/configs/ hold `vlm.workdir.config_dict`
of each, i.e. the JSON a run writes as config.json, with sorted keys. A change that means to alter a
recipe rewrites them:

  python tests/test_golden_configs.py --write

and the diff of tests/golden/ shows, key by key, what the change did to each recipe.
"""

import importlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden" / "configs"

# config module -> the variants its get_config accepts (None: the full recipe; the modules without a
# full recipe list only their demos).
RECIPES: dict[str, tuple[str | None, ...]] = {
  "blip2_stage1": (None, "demo"),
  "blip2_stage2": (None, "demo", "minigpt4", "minigpt4_demo"),
  "chameleon": (None, "demo"),
  "clip_b16": (None, "demo"),
  "coca_b16": (None, "demo", "video_demo"),
  "curate": ("demo", "full"),
  "flamingo": (None, "demo", "demo_docs"),
  "flava_base": (None, "demo"),
  "frozen": (None, "demo"),
  "fuyu": (None, "demo"),
  "grounding": (None, "demo"),
  "lit_b16": (None, "demo"),
  "llava_next": (None, "demo", "demo_base"),
  "llava_stage1": (None, "demo"),
  "llava_stage2": (None, "demo"),
  "llip_b16": (None, "demo"),
  "lm_pretrain": ("demo", "demo_cm3"),
  "monkey": (None, "demo", "demo_global"),
  "qwen_vl": (None, "demo"),
  "siglip_b16": (None, "demo"),
  "video_lm": ("demo", "demo_middle", "demo_pool", "demo_pool_middle"),
  "vlmo_base": (None, "demo"),
  "vlmo_stage1_mim": (None, "demo"),
  "vlmo_stage2_mlm": (None, "demo"),
  "vlmo_vqa": (None, "demo"),
  "vq_tokenizer": (None, "demo", "demo_long", "demo_1d"),
}

CASES = [(name, variant) for name, variants in RECIPES.items() for variant in variants]


def golden_path(name: str, variant: str | None) -> Path:
  return GOLDEN / f"{name}{'' if variant is None else '.' + variant}.json"


def resolved(name: str, variant: str | None) -> dict:
  """The config as config.json records it (tuples as lists), through a JSON round trip."""
  from vlm.workdir import config_dict

  if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
  return config_dict(importlib.import_module(f"configs.{name}").get_config(variant))


def test_every_config_file_is_listed():
  files = {p.stem for p in (ROOT / "configs").glob("*.py") if "def get_config" in p.read_text()}
  assert files == set(RECIPES), (
    f"configs with get_config not in RECIPES: {sorted(files - set(RECIPES))}; "
    f"listed but gone: {sorted(set(RECIPES) - files)}"
  )
  stale = {p.name for p in GOLDEN.glob("*.json")} - {golden_path(*case).name for case in CASES}
  assert not stale, f"golden files of no listed recipe: {sorted(stale)}"


@pytest.mark.parametrize("name,variant", CASES, ids=[f"{n}:{v}" if v else n for n, v in CASES])
def test_resolved_config_matches_golden(name: str, variant: str | None):
  from vlm.workdir import config_diff

  path = golden_path(name, variant)
  assert path.exists(), f"{path} is missing: run `python tests/test_golden_configs.py --write`"
  diff = config_diff(json.loads(path.read_text()), resolved(name, variant))
  shown = "\n".join(f"  {k}: golden {a!r} -> now {b!r}" for k, (a, b) in list(diff.items())[:40])
  assert not diff, (
    f"configs/{name}.py{':' + variant if variant else ''} resolves to a different config than "
    f"{path.relative_to(ROOT)} ({len(diff)} keys):\n{shown}\n"
    "If the change is meant, rewrite with `python tests/test_golden_configs.py --write`."
  )


def write_all() -> None:
  GOLDEN.mkdir(parents=True, exist_ok=True)
  for case in CASES:
    golden_path(*case).write_text(json.dumps(resolved(*case), indent=1, sort_keys=True) + "\n")
  print(f"wrote {len(CASES)} files under {GOLDEN}")


if __name__ == "__main__":
  if sys.argv[1:] != ["--write"]:
    sys.exit("usage: python tests/test_golden_configs.py --write")
  write_all()
