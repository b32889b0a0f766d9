"""configs/ reads no vlm: the values of vlm that the recipes need are copied in configs/defaults.py.

vlm keeps its own definitions (it does not import configs/, which is not an installed package), so
each value lives in two places; these tests keep every copy equal to vlm's, and check that no module
of configs/ imports anything but configs/, ml_collections and the standard library.
"""

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import ml_collections
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from configs import defaults  # noqa: E402
from test_golden_configs import RECIPES  # noqa: E402

DEFAULTS = "configs/defaults.py"


def normalised(value: Any, prefix: str = "") -> dict[str, Any]:
  """{dotted key: (type name, leaf)} of a value, ConfigDict placeholders as ('placeholder <type>', value).

  Types stay part of the comparison (a tuple is not a list: a locked ConfigDict takes overrides of
  the type it holds), key order does not.
  """
  if isinstance(value, ml_collections.ConfigDict):
    out: dict[str, Any] = {prefix: ("ConfigDict", sorted(value.keys()))}
    for k, v in value.items(preserve_field_references=True):
      out.update(normalised(v, f"{prefix}.{k}" if prefix else k))
    return out
  if isinstance(value, ml_collections.FieldReference):
    return {prefix: (f"placeholder {value.get_type().__name__}", value.get())}
  if isinstance(value, dict):
    out = {prefix: ("dict", sorted(value))}
    for k, v in value.items():
      out.update(normalised(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
  if isinstance(value, (tuple, list)):
    out = {prefix: (type(value).__name__, len(value))}
    for i, v in enumerate(value):
      out.update(normalised(v, f"{prefix}[{i}]"))
    return out
  return {prefix: (type(value).__name__, value)}


def assert_same(name: str, ours: Any, theirs: Any, vlm_name: str, vlm_file: str) -> None:
  a, b = normalised(ours), normalised(theirs)
  diff = {k: (a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
  shown = "\n".join(f"  {k or '<top>'}: {DEFAULTS} {x!r} != {vlm_file} {y!r}" for k, (x, y) in list(diff.items())[:20])
  assert not diff, (
    f"configs.defaults.{name} ({DEFAULTS}) differs from {vlm_name} ({vlm_file}); keep the two equal:\n{shown}"
  )


def test_sharding_rules():
  from vlm import parallel

  assert_same("DATA_AXES", defaults.DATA_AXES, parallel.DATA_AXES, "vlm.parallel.DATA_AXES", "vlm/parallel.py")
  assert_same(
    "DEFAULT_RULES", defaults.DEFAULT_RULES, parallel.DEFAULT_RULES, "vlm.parallel.DEFAULT_RULES", "vlm/parallel.py"
  )
  # What base_config stores: lists of each rule, as before.
  from configs.common import base_config

  assert base_config().rules == [list(r) for r in parallel.DEFAULT_RULES]


def test_data_config():
  from vlm.data import get_default_config

  assert_same(
    "data_config()",
    defaults.data_config(),
    get_default_config(),
    "vlm.data.get_default_config()",
    "vlm/data/pipeline.py",
  )


def test_peft_config():
  from vlm import peft

  assert_same("peft_config()", defaults.peft_config(), peft.default_config(), "vlm.peft.default_config()", "vlm/peft")
  assert list(defaults.peft_config().keys()) == list(peft.default_config().keys()), (
    f"configs.defaults.peft_config() ({DEFAULTS}): key order differs from vlm.peft.default_config() (vlm/peft)"
  )


@pytest.mark.parametrize("name,module", [("CLIP_TEMPERATURE_INIT", "two_tower"), ("BLIP2_TEMPERATURE_INIT", "blip2")])
def test_temperatures(name: str, module: str):
  theirs = getattr(importlib.import_module(f"vlm.models.{module}"), name)
  assert_same(name, getattr(defaults, name), theirs, f"vlm.models.{module}.{name}", f"vlm/models/{module}.py")


@pytest.mark.parametrize("name", ["EVA_VIT_G", "BERT_BASE_QFORMER"])
def test_blip2_presets(name: str):
  from vlm.models import blip2

  assert_same(name, getattr(defaults, name), getattr(blip2, name), f"vlm.models.blip2.{name}", "vlm/models/blip2.py")


@pytest.mark.parametrize(
  "name,vlm_attr",
  [
    ("SCENE_COLOUR_NAMES", "COLOUR_NAMES"),
    ("SCENE_SHAPES", "SHAPES"),
    ("SCENE_SIZES", "SIZES"),
    ("SCENE_POSITIONS", "POSITIONS"),
    ("SCENE_MOTIONS", "MOTIONS"),
    ("SCENE_WORDS", "WORDS"),
  ],
)
def test_scene_vocabulary(name: str, vlm_attr: str):
  from vlm.data import scenes

  assert_same(
    name, getattr(defaults, name), getattr(scenes, vlm_attr), f"vlm.data.scenes.{vlm_attr}", "vlm/data/scenes.py"
  )


def test_scene_answer_vocab():
  from vlm.data import scenes

  assert_same(
    "scene_answer_vocab()",
    defaults.scene_answer_vocab(),
    scenes.answer_vocab(),
    "vlm.data.scenes.answer_vocab()",
    "vlm/data/scenes.py",
  )


def test_anyres():
  from vlm.data import anyres

  from configs import llava_next

  assert_same(
    "LLAVA_NEXT_PINPOINTS",
    defaults.LLAVA_NEXT_PINPOINTS,
    anyres.LLAVA_NEXT_PINPOINTS,
    "vlm.data.anyres.LLAVA_NEXT_PINPOINTS",
    "vlm/data/anyres.py",
  )
  cases = [
    (anyres.LLAVA_NEXT_PINPOINTS, 336, 24),
    (llava_next.DEMO_PINPOINTS, llava_next.DEMO_TILE, 4),
    (llava_next.DEMO_BASE_PINPOINTS, llava_next.DEMO_TILE, 4),
    (llava_next.DEMO_PINPOINTS, llava_next.DEMO_TILE, (4, 2)),
    ([[32, 32], [64, 96]], 32, [3, 5]),
  ]
  for points, tile, grid in cases:
    ours, theirs = defaults.anyres_max_image_tokens(points, tile, grid), anyres.max_image_tokens(points, tile, grid)
    assert ours == theirs, (
      f"configs.defaults.anyres_max_image_tokens{(points, tile, grid)} ({DEFAULTS}) = {ours}, "
      f"vlm.data.anyres.max_image_tokens (vlm/data/anyres.py) = {theirs}"
    )
  for bad in [(((33, 64),), 32, 4), (((32, 64),), 32, 0), (((32, 64),), 0, 4), ((), 32, 4)]:
    with pytest.raises(ValueError):
      anyres.max_image_tokens(*bad)
    with pytest.raises(ValueError):
      defaults.anyres_max_image_tokens(*bad)


# ------------------------------------------------------------------------------ no vlm in configs/

CONFIG_FILES = sorted((ROOT / "configs").glob("*.py"))
CONFIG_MODULES = {p.stem for p in CONFIG_FILES}


def imported_modules(path: Path) -> list[tuple[int, str]]:
  """[(line, top-level module)] of every import in the file, those inside functions included."""
  out = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      out += [(node.lineno, alias.name) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: inside configs/
        out.append((node.lineno, "configs"))
      else:
        out += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
  return out


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_config_imports_only_configs_ml_collections_and_stdlib(path: Path):
  bad = []
  for line, name in imported_modules(path):
    top = name.split(".")[0]
    if top == "configs":
      # `from configs import X` / `import configs.X`: X must be a module of configs/.
      parts = name.split(".")
      if len(parts) > 1 and parts[1] not in CONFIG_MODULES:
        bad.append((line, name))
    elif top != "ml_collections" and top not in sys.stdlib_module_names:
      bad.append((line, name))
  assert not bad, (
    f"configs/{path.name} imports outside configs/, ml_collections and the standard library: "
    + ", ".join(f"line {line}: {name}" for line, name in bad)
    + f" (put the value in {DEFAULTS} and add it to tests/test_config_values.py)"
  )


def test_reading_every_config_imports_no_jax_and_no_vlm():
  """Importing every config module and resolving every recipe leaves jax and vlm unimported."""
  recipes = {name: list(variants) for name, variants in RECIPES.items()}
  modules = sorted(CONFIG_MODULES - {"__init__"})
  code = (
    "import importlib, json, sys\n"
    f"for m in {modules!r}:\n"
    "  importlib.import_module('configs.' + m)\n"
    f"for name, variants in json.loads({json.dumps(recipes)!r}).items():\n"
    "  for v in variants:\n"
    "    importlib.import_module('configs.' + name).get_config(v)\n"
    "bad = sorted(m for m in sys.modules if m in ('jax', 'flax', 'vlm') or m.startswith(('jax.', 'flax.', 'vlm.')))\n"
    "assert not bad, bad\n"
  )
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, f"reading the configs imported jax / flax / vlm:\n{r.stderr[-3000:]}"
