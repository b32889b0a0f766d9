"""The contract between models and their users: evaluators, vlm.predict and vlm.curation see a model
only through its predict functions (vlm.models.registry.PREDICT_FNS), and every decoder family
generates through vlm.models.generation."""

import ast
import inspect
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from test_golden_configs import CASES, golden_path
from vlm import parallel
from vlm.evals import EVALS
from vlm.evals.base import build_evals
from vlm.models import MODELS, PREDICT_FNS, build_model, predict_fns
from vlm.models.generation import generate

VLM = Path(__file__).resolve().parent.parent / "vlm"
# The users of models: no family knowledge in them.
USERS = sorted(VLM.glob("evals/*.py")) + [VLM / "predict.py", VLM / "curation" / "models.py"]
USERS += [VLM / "objectives" / "contrastive.py"]
# vlm.models modules a user may import: the registry, and the probe's trained head (not the evaluated model).
ALLOWED = {"vlm.models.registry", "vlm.models.video.AttentionalProbe"}


def test_users_of_models_name_no_family_and_probe_no_model():
  bad = []
  for path in USERS:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      where = f"{path.relative_to(VLM.parent)}:{getattr(node, 'lineno', 0)}"
      if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hasattr":
        bad.append(f"{where}: hasattr")
      if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
        if "model" in ast.unparse(node.args[0]):
          bad.append(f"{where}: isinstance on {ast.unparse(node.args[0])}")
      if isinstance(node, ast.Compare) and "model_name" in ast.unparse(node):
        bad.append(f"{where}: compares {ast.unparse(node)}")
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vlm.models"):
        for a in node.names:
          if node.module not in ALLOWED and f"{node.module}.{a.name}" not in ALLOWED and node.module != "vlm.models":
            bad.append(f"{where}: imports {node.module}.{a.name}")
  assert not bad, "\n".join(bad)


def test_the_self_check_catches_a_family_name(tmp_path, monkeypatch):
  """The check above fails on the constructs it bans (a check that cannot fail proves nothing)."""
  src = tmp_path / "evals" / "x.py"
  src.parent.mkdir()
  src.write_text(
    "from vlm.models.flamingo import Flamingo\n"
    "def f(model, config):\n"
    "  return hasattr(model, 'x') or isinstance(model, Flamingo) or config.model_name == 'flamingo'\n"
  )
  monkeypatch.setattr(__import__(__name__), "USERS", [src])
  monkeypatch.setattr(__import__(__name__), "VLM", tmp_path)
  with pytest.raises(AssertionError) as e:
    test_users_of_models_name_no_family_and_probe_no_model()
  assert all(w in str(e.value) for w in ("hasattr", "isinstance on model", "compares", "imports vlm.models.flamingo"))


def _mesh():
  return parallel.make_mesh({"data": len(jax.devices())})


def _config(name: str, variant: str | None) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(json.loads(golden_path(name, variant).read_text()))


# The training recipes (configs/curate.py has no model).
MODEL_CASES = [c for c in CASES if "model_name" in _config(*c)]


@pytest.mark.parametrize("name,variant", MODEL_CASES)
def test_every_recipe_evaluation_finds_the_predict_functions_it_needs(name, variant):
  """Every recipe's evaluators build on its model's predict functions (no data is read: the
  evaluators load their splits on first call); a text_to_image judge that is not trained here is
  the one expected failure."""
  config = _config(name, variant)
  model = build_model(config.model_name, config.model)
  evals = config.get("evals") or {}
  judges = {k for k, v in evals.items() if v.get("type", k) == "text_to_image"}
  for k in judges:
    with pytest.raises(FileNotFoundError, match="judge"):
      build_evals(ml_collections.ConfigDict(dict(config.to_dict(), evals={k: evals[k].to_dict()})), model, _mesh())
  config.evals = {k: v.to_dict() for k, v in evals.items() if k not in judges}
  assert set(build_evals(config, model, _mesh())) == set(config.evals)


def test_evaluators_see_the_data_options_and_rules_not_the_whole_config():
  """Every registered evaluator's constructor (with its bases') takes data= and rules=, never config=."""
  for name in EVALS.names():
    params = set()
    for cls in inspect.getmro(EVALS.get(name)):
      if "__init__" in vars(cls):
        params |= set(inspect.signature(cls.__init__).parameters)
    assert {"data", "rules", "predict_fns", "mesh", "prefix"} <= params, (name, sorted(params))
    assert "config" not in params, name


def test_a_missing_predict_function_is_named():
  config = _config("lm_pretrain", "demo")
  model = build_model(config.model_name, config.model)
  config.evals = {"zs": {"type": "zeroshot"}}
  with pytest.raises(ValueError, match=r"evals.zs needs the predict function\(s\) embed_image, embed_text; .*generate"):
    build_evals(config, model, _mesh())


def test_every_predict_fns_entry_is_a_registered_model_and_subclasses_inherit():
  assert set(PREDICT_FNS.names()) <= set(MODELS.names())
  two_tower = MODELS.get("two_tower")
  sub = type("Sub", (two_tower,), {})  # as vlm.peft's same-named subclass
  assert set(predict_fns(sub(image={}, text={}))) == set(predict_fns(two_tower(image={}, text={})))


@pytest.fixture(scope="module")
def lm():
  from helpers import TINY_LM

  model = build_model("decoder_lm", dict(TINY_LM, vocab_size=50))
  prompt = jnp.asarray(np.random.default_rng(0).integers(3, 50, (2, 5)), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), prompt)["params"]
  return model, params, prompt


def test_guided_decoding_against_the_same_input_is_plain_decoding_and_checks_its_inputs(lm):
  """contrast_inputs that equal the inputs mix l + g (l - l) = l: the tokens of plain decoding; an
  input name the call does not have, or beam search, is an error naming it."""
  model, params, prompt = lm
  kw = dict(max_new_tokens=4, eos_id=-1)
  plain = generate(model, params, prompt, **kw).tokens
  embeds = model.apply({"params": params}, prompt, method=lambda m, t: m.embed(t))
  via_embeds = generate(model, params, prompt, prefill_inputs={"inputs_embeds": embeds}, **kw).tokens
  np.testing.assert_array_equal(via_embeds, plain)
  guided = generate(
    model,
    params,
    prompt,
    prefill_inputs={"inputs_embeds": embeds},
    contrast_inputs={"inputs_embeds": embeds},
    guidance=3.0,
    **kw,
  ).tokens
  np.testing.assert_array_equal(guided, plain)
  with pytest.raises(ValueError, match=r"contrast_inputs \['images'\] replace no input"):
    generate(model, params, prompt, contrast_inputs={"images": embeds}, **kw)
  with pytest.raises(ValueError, match="'greedy' or 'sample', not 'beam'"):
    generate(model, params, prompt, prefill_inputs={"inputs_embeds": embeds}, contrast_inputs={}, method="beam", **kw)
