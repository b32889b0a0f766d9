"""PEFT (vlm/peft/): LoRA and adapters on any model through method interception, the optimiser
that trains only them, merging LoRA into the base weights, and a PEFT run of the trainer."""

import functools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vlm import checkpoint, peft, tree
from vlm.models import build_model
from vlm.optim import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
LM = dict(vocab_size=32, width=16, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=32)
TT = dict(
  image=dict(variant="mu/8", width=16, depth=2, mlp_dim=32, num_heads=2, pool_type="map", out_dim=16, scan=True),
  text=dict(variant="mu", width=16, depth=1, mlp_dim=32, num_heads=2, vocab_size=30, out_dim=16),
)
TOKENS = jnp.arange(12).reshape(2, 6) % 32
IMAGES = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
TEXT = jnp.arange(16).reshape(2, 8) % 30


def _init(model, *args, boxed=False):
  """Params of model.init (jitted: one compilation instead of one per eager op)."""
  # rbg keys compile several times faster than threefry ones on CPU (the init's values do not matter here).
  params = jax.jit(model.init)(jax.random.key(0, impl="unsafe_rbg"), *args)["params"]
  return params if boxed else nn.meta.unbox(params)


def _flat(params):
  return tree.flatten(params)


def _base_of(params):
  return tree.unflatten({k: v for k, v in _flat(params).items() if not peft.is_peft_path(k)})


def _randomise(params, regex, scale=0.1, seed=0):
  """Sets every leaf whose path matches `regex` to random values (e.g. lora_b, adapter/up)."""
  rng = np.random.default_rng(seed)
  return tree.unflatten(
    {
      k: (scale * rng.standard_normal(v.shape).astype(v.dtype) if re.fullmatch(regex, k) else v)
      for k, v in _flat(params).items()
    }
  )


def _drop(params, regex):
  return tree.unflatten({k: v for k, v in _flat(params).items() if not re.fullmatch(regex, k)})


def _lm_out(model, params):
  return model.apply({"params": params}, TOKENS)


def _tt_out(model, params):
  zimg, ztxt, _ = model.apply({"params": params}, IMAGES, TEXT)
  return jnp.concatenate([zimg, ztxt], axis=-1)


# LoRA and adapters together, so each model is initialised once for the tests below.
CASES = {
  "decoder_lm": (
    LM,
    (TOKENS,),
    _lm_out,
    dict(
      method="lora+adapter",
      rank=2,
      alpha=4.0,
      adapter_dim=4,
      targets=[r".*attn/(query|value|out)", r".*mlp/wo", "head"],
    ),
  ),
  "two_tower": (
    TT,
    (IMAGES, TEXT),
    _tt_out,
    dict(
      method="lora+adapter",
      rank=2,
      alpha=8.0,
      adapter_dim=4,
      targets=[r".*attn/(query|value|out)", r".*mlp/fc1", r"img/head"],
    ),
  ),
}
EXPECTED = {  # LoRA'd layers and adapted blocks
  "decoder_lm": (
    {f"decoder/block_{i}/{m}" for i in range(2) for m in ("attn/query", "attn/value", "attn/out", "mlp/wo")} | {"head"},
    {"decoder/block_0", "decoder/block_1"},
  ),
  "two_tower": (
    {
      f"{t}/{m}"
      for t in ("img/encoder/layers", "txt/encoder/block_0", "img/MAPHead")
      for m in ("attn/query", "attn/value", "attn/out", "mlp/fc1")
    }
    | {"img/head"},
    {"img/encoder/layers", "txt/encoder/block_0"},
  ),
}


@functools.lru_cache(maxsize=None)
def _setup(name):
  kw, args, out, cfg = CASES[name]
  plain, model = build_model(name, kw), build_model(name, kw, peft=cfg)
  boxed = _init(model, *args, boxed=True)
  return plain, model, boxed, nn.meta.unbox(boxed)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_peft_leaves_at_the_targets_and_the_base_model_at_init(name):
  kw, args, out, cfg = CASES[name]
  plain, model, boxed, params = _setup(name)
  assert isinstance(model, type(plain)) and type(model).__name__ == type(plain).__name__
  flat = _flat(params)
  lora_layers, blocks = EXPECTED[name]
  assert {k.rsplit("/", 1)[0] for k in flat if k.endswith("lora_a")} == lora_layers
  assert {k.rsplit("/", 1)[0] for k in flat if k.endswith("lora_b")} == lora_layers
  assert {k.split("/adapter/")[0] for k in flat if "/adapter/" in k} == blocks
  for layer in lora_layers:  # A [..., in, r], B [..., r, out] against the kernel [..., *in, *out]
    a, b, kernel = (flat[f"{layer}/{n}"] for n in ("lora_a", "lora_b", "kernel"))
    assert a.shape[-1] == b.shape[-2] == 2 and a.shape[-2] * b.shape[-1] == math.prod(kernel.shape[a.ndim - 2 :])
  n_train, total = peft.count_params(params, peft.trainable_regexes(cfg))
  assert 0 < n_train and n_train / total < 0.25, (n_train, total)
  # The base params are exactly the plain model's (same structure) and give the same outputs.
  base = _base_of(params)
  assert jax.tree.structure(base) == jax.tree.structure(
    jax.eval_shape(lambda: nn.meta.unbox(plain.init(jax.random.key(0), *args)["params"]))
  )
  np.testing.assert_array_equal(out(plain, base), out(model, params))
  if name == "two_tower":  # under nn.scan: a leading 'layers' axis, logical names from the kernel
    q = boxed["img"]["encoder"]["layers"]["attn"]["query"]
    assert q["lora_a"].value.shape == (2, 16, 2) and q["lora_b"].value.shape == (2, 2, 16)
    assert q["lora_a"].names == ("layers", "embed", None) and q["lora_b"].names == ("layers", None, "heads")
    o = boxed["txt"]["encoder"]["block_0"]["attn"]["out"]
    assert o["lora_a"].names == ("heads", None) and o["lora_b"].names == (None, "embed")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_merged_lora_with_the_plain_model_equals_peft(name):
  kw, args, out, cfg = CASES[name]
  plain, model, _, params = _setup(name)
  base = _base_of(params)
  tuned = _randomise(params, r".*lora_b")  # adapters stay at their identity init
  y = out(model, tuned)
  assert float(jnp.abs(y - out(plain, base)).max()) > 1e-3
  merged = _drop(peft.merge_lora(tuned, cfg["alpha"]), peft.ADAPTER_TRAINABLE)
  assert jax.tree.structure(merged) == jax.tree.structure(base)
  np.testing.assert_allclose(out(plain, merged), y, atol=2e-5)
  # jax arrays merge as numpy ones (as loaded from a checkpoint) do.
  merged_jax = _drop(peft.merge_lora(jax.tree.map(jnp.asarray, tuned), cfg["alpha"], rank=2), peft.ADAPTER_TRAINABLE)
  for k, v in _flat(merged).items():
    np.testing.assert_allclose(_flat(merged_jax)[k], v, atol=1e-6)
  with pytest.raises(ValueError, match="rank"):
    peft.merge_lora(tuned, cfg["alpha"], rank=3)


@pytest.mark.parametrize("name", sorted(CASES))
def test_adapters_change_outputs_when_up_is_nonzero(name):
  _, _, out, _ = CASES[name]
  plain, model, _, params = _setup(name)
  tuned = _randomise(params, r".*adapter/up/kernel")
  assert float(jnp.abs(out(model, tuned) - out(plain, _base_of(params))).max()) > 1e-3


def test_dense_general_with_non_trailing_axis():
  class M(nn.Module):
    @nn.compact
    def __call__(self, x):  # [B, C, T] contracting C -> [B, T, 2, 3]
      return nn.DenseGeneral((2, 3), axis=1, name="proj")(x)

  cls = peft.peft_class(M, dict(targets=["proj"], rank=2, alpha=2.0))
  x = jax.random.normal(jax.random.key(2), (2, 5, 4))
  params = _init(cls(), x)
  assert params["proj"]["lora_a"].shape == (5, 2) and params["proj"]["lora_b"].shape == (2, 6)
  tuned = _randomise(params, r".*lora_b", scale=1.0)
  y = cls().apply({"params": tuned}, x)
  np.testing.assert_allclose(M().apply({"params": peft.merge_lora(tuned, 2.0)}, x), y, atol=1e-5)


def test_lora_dropout_only_in_training():
  cfg = dict(targets=[r".*attn/query"], rank=2, dropout=0.5)
  model = build_model("decoder_lm", LM, peft=cfg)
  params = _randomise(_init(model, TOKENS), r".*lora_b", scale=1.0)

  def run(train, seed):
    return model.apply({"params": params}, TOKENS, train, rngs={"dropout": jax.random.key(seed)})

  np.testing.assert_array_equal(run(False, 0), run(False, 1))
  assert float(jnp.abs(run(True, 0) - run(True, 1)).max()) > 1e-4


@pytest.mark.slow
def test_optimizer_trains_only_peft_params():
  _, model, _, params = _setup("decoder_lm")
  cfg = dict(CASES["decoder_lm"][3], train_also=[r"norm/scale"])
  config = ml_collections.ConfigDict(dict(lr=0.01, wd=0.1, optimizer="adamw", schedule=dict(name="constant"), peft=cfg))
  tx, _ = build_optimizer(config, total_steps=10)
  state = tx.init(params)

  def loss(p):
    return jnp.mean(model.apply({"params": p}, TOKENS) ** 2)

  grad = jax.jit(jax.grad(loss))
  p = params
  for _ in range(3):
    updates, state = tx.update(grad(p), state, p)
    p = optax.apply_updates(p, updates)
  regexes = [re.compile(r) for r in peft.trainable_regexes(cfg)]
  before, after = _flat(params), _flat(p)
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  trainable = {k for k in before if any(r.fullmatch(k) for r in regexes)}
  assert changed and changed <= trainable
  assert "norm/scale" in changed and any(k.endswith("lora_a") for k in changed)
  assert any(k.endswith("lora_b") for k in changed) and any("/adapter/up/" in k for k in changed)
  # Frozen params hold no optimiser state: the state is as small as the trainable params.
  n_state = sum(x.size for x in jax.tree.leaves(state) if hasattr(x, "size") and x.ndim > 0)
  assert n_state == 2 * peft.count_params(params, peft.trainable_regexes(cfg))[0]
  # `trainable` on its own (no PEFT): only matching params move.
  tx, _ = build_optimizer(
    ml_collections.ConfigDict(dict(lr=0.1, optimizer="sgd", schedule=dict(name="constant"), trainable=["head/kernel"])),
    10,
  )
  upd, _ = tx.update(grad(params), tx.init(params), params)
  moved = {k for k, v in _flat(upd).items() if np.any(v != 0)}
  assert moved == {"head/kernel"}


def test_placeholder_config_is_off_and_cli_style_overrides_turn_it_on():
  placeholder = peft.default_config()
  assert type(build_model("decoder_lm", LM, peft=placeholder)) is type(build_model("decoder_lm", LM))
  config = ml_collections.ConfigDict(dict(lr=0.1, optimizer="sgd", peft=placeholder))
  from vlm.optim import trainable_patterns

  assert trainable_patterns(config) is None
  config.peft.method, config.peft.targets = "lora", (".*attn/query",)  # as --config.peft.method=lora ...
  assert [p for p, _ in trainable_patterns(config)] == [peft.LORA_TRAINABLE]
  assert build_model("decoder_lm", LM, peft=config.peft).peft_config.targets == (".*attn/query",)
  wrapped = peft.with_peft(build_model("decoder_lm", LM), config.peft)  # an existing instance
  assert type(wrapped) is type(build_model("decoder_lm", LM, peft=config.peft)) and wrapped.width == LM["width"]


def test_clear_errors():
  with pytest.raises(ValueError, match=r"config\.peft\.targets: bad regex"):
    build_model("decoder_lm", LM, peft=dict(targets=["attn/(query"]))
  model = build_model("decoder_lm", LM, peft=dict(targets=[r".*attn/query", r".*attn/qkv"]))
  with pytest.raises(ValueError, match=r"config\.peft\.targets: '\.\*attn/qkv' matches no linear layer.*attn/query"):
    jax.eval_shape(model.init, jax.random.key(0), TOKENS)
  model = build_model("decoder_lm", LM, peft=dict(method="adapter", adapter_targets=["blocks"]))
  with pytest.raises(ValueError, match=r"config\.peft\.adapter_targets: 'blocks' matches no module.*decoder/block_0"):
    jax.eval_shape(model.init, jax.random.key(0), TOKENS)
  with pytest.raises(ValueError, match=r"config\.peft\.method"):
    build_model("decoder_lm", LM, peft=dict(method="prefix"))
  with pytest.raises(ValueError, match=r"config\.peft: unknown keys \['rnak'\]"):
    build_model("decoder_lm", LM, peft=dict(rnak=4))
  # The optimiser with config.peft but a model built without it.
  config = ml_collections.ConfigDict(dict(lr=0.1, optimizer="sgd", peft=dict(rank=2, train_also=["nothing"])))
  tx, _ = build_optimizer(config, 10)
  plain, _, _, params = _setup("decoder_lm")
  with pytest.raises(ValueError, match=r"config\.peft: .*matches no parameter.*peft=config\.peft"):
    tx.init(_base_of(params))
  with pytest.raises(ValueError, match=r"config\.peft\.train_also: 'nothing' matches no parameter"):
    tx.init(params)
  # A frozen regex with a typo would silently train what it meant to freeze.
  tx, _ = build_optimizer(ml_collections.ConfigDict(dict(lr=0.1, optimizer="sgd", frozen=["decodr/.*"])), 10)
  with pytest.raises(ValueError, match=r"config\.frozen\[0\]: 'decodr/\.\*' matches no parameter"):
    tx.init(params)


@pytest.mark.slow
def test_trainer_peft_run_keeps_base_and_merges(data_dir, tmp_path):
  """SigLIP demo (tiny) from a plain checkpoint with LoRA: base params bit-identical after training,
  peft_params/ + the base rebuild the trained params, and the merged checkpoint (function and CLI)
  gives the PEFT model's outputs with the plain model."""
  from configs import siglip_b16
  from vlm.data import make_pipeline
  from vlm.train import setup, train
  from helpers import tiny

  c = tiny(siglip_b16, data_dir, steps=3)
  c.lr = 0.01
  del c.evals["retrieval"]
  mesh, _, plain, objective, _, _, _ = setup(c)
  batch = next(make_pipeline(c.data, split="train", batch_size=c.batch_size, mesh=mesh, seed=c.seed))
  args = objective.init_args(batch)
  shapes = jax.eval_shape(lambda: nn.meta.unbox(plain.init(jax.random.key(0), *args)["params"]))
  rng = np.random.default_rng(0)  # any values will do for the base (and cost no compilation)
  base = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
  checkpoint.save_params(tmp_path / "base", base)

  c.init = ml_collections.ConfigDict(dict(path=str(tmp_path / "base")))
  c.peft = ml_collections.ConfigDict(
    dict(method="lora", rank=4, alpha=8.0, targets=[r".*attn/(query|value)"], save_only_peft=True)
  )
  wd = tmp_path / "run"
  out = train(c, wd)
  assert np.isfinite(out["train/loss"]) and "zeroshot/top1" in out  # evaluations ran on the PEFT model
  final = checkpoint.load_params(wd)
  flat, flat_base = _flat(final), _flat(base)
  assert {k for k in flat if not peft.is_peft_path(k)} == set(flat_base)
  for k, v in flat_base.items():
    np.testing.assert_array_equal(flat[k], v, err_msg=k)
  assert any(np.abs(v).max() > 0 for k, v in flat.items() if k.endswith("lora_b"))
  # peft_params/ holds only the LoRA leaves; with the base they are the trained params.
  saved = _flat(checkpoint.load_params(wd / "peft_params"))
  assert saved and all(k.endswith(("lora_a", "lora_b")) for k in saved)
  rebuilt = _flat(checkpoint.load_peft(base, wd / "peft_params"))
  assert set(rebuilt) == set(flat) and all(np.array_equal(rebuilt[k], flat[k]) for k in flat)
  # Merge (function) -> a plain checkpoint + config.json without peft; plain outputs == PEFT outputs.
  merged_dir = checkpoint.merge_workdir(wd, tmp_path / "merged")
  merged = checkpoint.load_params(merged_dir)
  assert "peft" not in json.loads((merged_dir / "config.json").read_text())
  x = (batch["image"][:4], batch["text"][:4])
  model = build_model(c.model_name, c.model, peft=c.peft)
  want = model.apply({"params": final}, *x)[:2]
  got = plain.apply({"params": merged}, *x)[:2]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  # The CLI writes the same parameters.
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="1", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  res = subprocess.run(
    [sys.executable, "-m", "vlm.peft", "merge", f"--workdir={wd}", f"--out={tmp_path / 'cli'}"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert res.returncode == 0, res.stderr[-3000:]
  cli = _flat(checkpoint.load_params(tmp_path / "cli"))
  assert set(cli) == set(_flat(merged)) and all(np.allclose(cli[k], v) for k, v in _flat(merged).items())
