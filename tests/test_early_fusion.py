"""Early fusion (Chameleon-style): mixed-modal rows, cached decoding both ways, the objective, training."""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import chameleon, vq_tokenizer
from vlm import checkpoint, parallel
from vlm.models import predict_fns
from vlm.metrics_writer import read_metrics
from vlm.models.early_fusion import EarlyFusionLM, concat_ragged, generate_images
from vlm.objectives import build_objective
from vlm.train import train

from conftest import TINY_DATA

OFFSET, BOI, EOI = 1008, 1000, 1001


def _model(**kw) -> EarlyFusionLM:
  return EarlyFusionLM(
    lm=dict(vocab_size=OFFSET + 64, width=32, depth=2, num_heads=2, mlp_dim=64, qk_norm="layer_per_head"),
    tokenizer=dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8, codebook_size=64),
    image_token_offset=OFFSET,
    boi_id=BOI,
    eoi_id=EOI,
    **kw,
  )


@pytest.fixture(scope="module")
def setup():
  model = _model()
  images = jax.random.uniform(jax.random.key(0), (3, 16, 16, 3), minval=-1, maxval=1)
  text = jnp.array([[3, 10, 11, 12, 1, 0], [3, 20, 1, 0, 0, 0], [3, 30, 31, 32, 33, 1]])
  params = jax.jit(model.init)(jax.random.key(1), images, text)["params"]
  return model, params, images, text


def test_concat_ragged():
  a = jnp.array([[1, 2, 3], [4, 5, 6]])
  b = jnp.array([[7, 8], [9, 10]])
  tokens, mask = concat_ragged([(a, jnp.array([1, 3])), (b, jnp.array([2, 0]))], 6)
  np.testing.assert_array_equal(tokens, [[1, 7, 8, 0, 0, 0], [4, 5, 6, 0, 0, 0]])
  np.testing.assert_array_equal(mask.sum(1), [3, 3])


def test_mixed_modal_rows(setup):
  model, params, images, text = setup
  codes = model.apply({"params": params}, images, method=model.image_tokens)  # [3, 4]
  assert codes.shape == (3, 4) and bool(((codes >= OFFSET) & (codes < OFFSET + 64)).all())
  tokens, mask = model.apply({"params": params}, images, text, jnp.array([True, False, True]), method=model.sequences)
  c = np.asarray(codes)
  np.testing.assert_array_equal(tokens[0, :11], [3, BOI, *c[0], EOI, 10, 11, 12, 1])
  np.testing.assert_array_equal(tokens[1, :9], [3, 20, BOI, *c[1], EOI, 1])
  np.testing.assert_array_equal(tokens[2, :12], [3, BOI, *c[2], EOI, 30, 31, 32, 33, 1])
  np.testing.assert_array_equal(mask.sum(1), [11, 9, 12])
  assert not np.asarray(tokens)[~np.asarray(mask)].any()  # padding after EOS


BUFFER = 16  # uncached decoding runs the causal decoder on a fixed-size buffer: one compilation


def _greedy_uncached(model, params, prompt, steps, allowed):
  """Argmax over `allowed` ids, re-running the full decoder on the growing rows each step (no cache;
  rows sit at the start of a zero buffer, which a causal decoder ignores)."""
  logits_fn = jax.jit(lambda p, t: model.apply({"params": p}, t, method=lambda m, x: m.lm_model(x)))
  n = prompt.shape[1]
  rows = jnp.zeros((prompt.shape[0], BUFFER), jnp.int32).at[:, :n].set(prompt)
  for i in range(steps):
    last = logits_fn(params, rows)[:, n + i - 1]
    rows = rows.at[:, n + i].set(jnp.argmax(jnp.where(allowed, last, -jnp.inf), axis=-1).astype(jnp.int32))
  return rows[:, n : n + steps]


@pytest.mark.slow
def test_cached_generation_matches_uncached_both_ways(setup):
  model, params, images, text = setup
  vocab = jnp.arange(OFFSET + 64)
  # Text from image: [BOS, BOI, codes, EOI] then text ids only.
  out = predict_fns(model)["caption"](params, images, bos_id=3, eos_id=-1, pad_id=0, max_len=6).tokens
  prompt = model.apply({"params": params}, images, method=model.caption_prompt)
  text_ids = (vocab < OFFSET) & (vocab != BOI) & (vocab != EOI)
  np.testing.assert_array_equal(out, _greedy_uncached(model, params, prompt, 5, text_ids))
  # Image from text, one row at a time (no left padding in the uncached reference).
  ids, pixels = generate_images(model, params, text, (2, 2))
  assert ids.shape == (3, 4) and pixels.shape == (3, 16, 16, 3)
  for i, row in enumerate(np.asarray(text)):
    content = [t for t in row if t not in (0, 1, 3)]
    prompt = jnp.array([[3, *content, BOI]], jnp.int32)
    want = _greedy_uncached(model, params, prompt, 4, vocab >= OFFSET)
    np.testing.assert_array_equal(ids[i : i + 1], want)


@pytest.mark.slow
def test_one_dimensional_tokenizer():
  """With a 1-D (latent-token) tokenizer, rows hold K codes and generation renders K codes."""
  model = EarlyFusionLM(
    lm=dict(vocab_size=OFFSET + 64, width=32, depth=1, num_heads=2, mlp_dim=64),
    tokenizer=dict(
      width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8, codebook_size=64, latent_tokens=3, image_size=16
    ),
    image_token_offset=OFFSET,
    boi_id=BOI,
    eoi_id=EOI,
  )
  images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
  text = jnp.array([[3, 10, 11, 1], [3, 20, 1, 0]])
  params = jax.jit(model.init)(jax.random.key(1), images, text)["params"]
  assert model.code_grid((16, 16)) == (1, 3)
  tokens, _ = model.apply({"params": params}, images, text, method=model.sequences)
  np.testing.assert_array_equal(tokens[1, :6], [3, BOI, *np.asarray(tokens[1, 2:5]), EOI])
  assert bool(model.is_image_token(tokens[1, 2:5]).all())
  ids, pixels = generate_images(model, params, text, model.code_grid((16, 16)))
  assert ids.shape == (2, 3) and pixels.shape == (2, 16, 16, 3)


@pytest.mark.slow
def test_objective_trains_the_decoder_not_the_tokenizer(setup):
  model, params, images, text = setup
  objective = build_objective("early_fusion", dict(image_first_prob=0.5))
  batch = {"image": images, "text": text}
  (loss, metrics), grads = jax.jit(
    jax.value_and_grad(lambda p: objective(model, p, batch, rng=jax.random.key(3), train=True), has_aux=True)
  )(params)
  assert np.isfinite(loss) and metrics["image_loss"] > 0 and metrics["text_loss"] > 0
  tok_norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads["tokenizer"]))
  lm_norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads["lm"]))
  assert tok_norm == 0.0 and lm_norm > 0.0
  # z-loss is part of the loss: switching it off lowers it.
  plain = build_objective("early_fusion", dict(z_loss=0.0))
  loss0, _ = jax.jit(lambda p: plain(model, p, batch, rng=jax.random.key(3), train=True))(params)
  assert float(loss0) < float(loss)


def test_config_errors():
  images, text = jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 4), jnp.int32)
  small = EarlyFusionLM(
    lm=dict(vocab_size=1050, width=32, depth=1, num_heads=2, mlp_dim=64),
    tokenizer=dict(width=32, depth=1, mlp_dim=64, num_heads=2, codebook_size=64),
    image_token_offset=OFFSET,
    boi_id=BOI,
    eoi_id=EOI,
  )
  with pytest.raises(ValueError, match="model.lm.vocab_size=1050"):
    small.init(jax.random.key(0), images, text)
  with pytest.raises(ValueError, match="model.boi_id=1010"):
    _model().clone(boi_id=1010).init(jax.random.key(0), images, text)


@pytest.mark.slow
def test_demo_learns_and_evaluates(data_dir, tmp_path, siglip_workdir, monkeypatch, capsys):
  """A lighter demo: the tokenizer from its own short run, the decoder from scratch; both loss terms
  fall and the captioning and text-to-image evaluations run from the trainer (caption quality and
  judged images need the full demo's 5000 steps: README)."""
  vq = tmp_path / "vq"
  c = vq_tokenizer.get_config("demo")
  c.data.data_dir = str(data_dir)
  c.data.builder.update(TINY_DATA)
  c.total_steps, c.batch_size, c.log_every, c.tensorboard, c.eval_at_start = 40, 32, 10, False, False
  c.evals = {}
  train(c, vq)
  c = chameleon.get_config("demo")
  c.data.data_dir = str(data_dir)
  c.data.builder.update(TINY_DATA)
  c.init.path = str(vq)
  c.model["lm"].update(width=64, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=128)
  c.total_steps, c.batch_size, c.log_every, c.tensorboard, c.eval_at_start = 100, 32, 10, False, False
  c.schedule.warmup_steps = 10
  for name in c.evals:  # the evaluations must run from the trainer; their quality needs the full demo
    c.evals[name].every = 100
    c.evals[name].max_examples = 16
  c.evals.text_to_image.judge = str(siglip_workdir)
  train(c, tmp_path / "ef")
  rows = read_metrics(tmp_path / "ef")
  losses = [r for r in rows if "train/text_loss" in r]
  assert losses[-1]["train/text_loss"] < 0.6 * losses[0]["train/text_loss"], losses[-1]
  assert losses[-1]["train/image_loss"] < 0.9 * losses[0]["train/image_loss"], losses[-1]
  end = [r for r in rows if "captioning/cider" in r][-1]
  assert end["step"] == 100 and 0.0 <= end["captioning/exact_match"] <= 1.0
  for key in ("text_to_image/match", "text_to_image/colour", "text_to_image/judge_real", "text_to_image/judge_recon"):
    assert 0.0 <= end[key] <= 1.0
  # The tokenizer is the loaded one and stayed frozen.
  np.testing.assert_array_equal(
    checkpoint.load_params(tmp_path / "ef")["tokenizer"]["codebook"], checkpoint.load_params(vq)["codebook"]
  )
  # experiments/t2i_probe.py on the run: one JSON line per image set.
  import importlib.util

  script = Path(__file__).resolve().parents[1] / "experiments" / "t2i_probe.py"
  spec = importlib.util.spec_from_file_location("t2i_probe", script)
  probe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(probe)
  monkeypatch.setattr(
    sys, "argv", ["t2i_probe", f"--workdir={tmp_path / 'ef'}", "--train_examples=64", "--steps=2", "--test_examples=16"]
  )
  probe.main()
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"images"')]
  assert [r["images"] for r in rows] == ["real", "reconstructed", "generated"]
  assert all(0.0 <= r["both"] <= min(r["colour"], r["shape"]) for r in rows)


def test_text_to_image_names_a_missing_judge(setup):
  from vlm.evals.text_to_image import TextToImage

  model = setup[0]
  with pytest.raises(FileNotFoundError, match="evals.t2i.judge='/nonexistent'"):
    TextToImage(
      data=chameleon.get_config("demo").data,
      rules=parallel.DEFAULT_RULES,
      predict_fns=predict_fns(model),
      mesh=None,
      prefix="t2i",
      judge="/nonexistent",
    )


@pytest.mark.slow
def test_classifier_free_guidance_matches_uncached(setup):
  """guidance g: argmax of l_u + g (l_c - l_u), l_u continuing [BOS, BOI], row by row without a cache."""
  model, params, _, text = setup
  ids, _ = generate_images(model, params, text, (2, 2), guidance=3.0)
  image_ids = jnp.arange(OFFSET + 64) >= OFFSET
  logits_fn = jax.jit(lambda p, t: model.apply({"params": p}, t, method=lambda m, x: m.lm_model(x)))
  for i, row in enumerate(np.asarray(text)):
    cond = [3, *[t for t in row if t not in (0, 1, 3)], BOI]
    free = [3, BOI]
    for _ in range(4):
      buf = (
        jnp.zeros((2, BUFFER), jnp.int32)
        .at[0, : len(cond)]
        .set(jnp.array(cond))
        .at[1, : len(free)]
        .set(jnp.array(free))
      )
      logits = logits_fn(params, buf)
      lc, lu = logits[0, len(cond) - 1], logits[1, len(free) - 1]
      nxt = int(jnp.argmax(jnp.where(image_ids, lu + 3.0 * (lc - lu), -jnp.inf)))
      cond, free = cond + [nxt], free + [nxt]
    np.testing.assert_array_equal(ids[i], cond[-4:])
  assert not np.array_equal(ids, generate_images(model, params, text, (2, 2))[0])  # guidance changed something
