"""Grounding: boxes as text (Qwen-VL 0-1000, Kosmos-2 patch indices with transformers' processor
as the oracle), grounding questions through the pipeline, contrastive region guidance, and the
grounding / region_qa evaluations of a (tiny) trained model."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_DATA, shared_run
from helpers import TINY_LM as LM, TINY_VISION as VISION, image_prompt, tiny_vision_lm

from vlm import decoding
from vlm.data import grounding
from vlm.models import predict_fns


def test_qwen_boxes_round_trip_and_iou():
  box = grounding.to_1000((16.0, 8.0, 48.0, 64.0), 64, 64)
  assert box == (250, 125, 750, 999)
  text = "the cat " + grounding.ref_text("a cat", box) + " and " + grounding.box_text((1, 2, 3, 4))
  assert grounding.parse_boxes(text) == [box, (1, 2, 3, 4)]
  assert grounding.parse_boxes("<box>(1,2),(3</box>") == []  # malformed: no box
  assert grounding.iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
  assert grounding.iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
  assert grounding.iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0


def test_kosmos2_location_tokens_match_transformers_processor():
  from transformers import Kosmos2Processor
  from transformers.models.kosmos2 import processing_kosmos2 as hf

  rng = np.random.default_rng(0)
  for _ in range(200):
    x1, y1 = rng.uniform(0, 0.9, 2)
    box = (float(x1), float(y1), float(rng.uniform(x1 + 0.01, 1)), float(rng.uniform(y1 + 0.01, 1)))
    ul, lr = grounding.kosmos2_patch_indices(box)
    assert (ul, lr) == hf.coordinate_to_patch_index(box, 32)
    np.testing.assert_allclose(grounding.kosmos2_box(ul, lr), hf.patch_index_to_coordinate(ul, lr, 32))
  # The processor's text with boxes (its _insert_patch_index_tokens, no tokenizer file needed).
  proc = Kosmos2Processor.__new__(Kosmos2Processor)
  proc.num_patch_index_tokens = 1024
  boxes = [(0.1, 0.2, 0.5, 0.6), [(0.0, 0.0, 0.25, 0.25), (0.5, 0.5, 1.0, 1.0)]]
  text = "<grounding> An image of<phrase> a snowman</phrase> warming himself by<phrase> a fire</phrase>."
  ours = (
    "<grounding> An image of"
    + grounding.kosmos2_text(" a snowman", [boxes[0]])
    + " warming himself by"
    + grounding.kosmos2_text(" a fire", boxes[1])
    + "."
  )
  assert ours == proc._insert_patch_index_tokens(text, boxes)
  # Parsing generated text: the same phrases and boxes as the processor's post-processing.
  generated = ours.replace("> <", "><").replace("<object> ", "<object>").replace(" </object>", "</object>")
  _, entities = hf.clean_text_and_extract_entities_with_bboxes(generated)
  parsed = grounding.kosmos2_entities(generated)
  assert [p for p, _ in parsed] == [name for name, _, _ in entities]
  for (_, ours_boxes), (_, _, theirs) in zip(parsed, entities):
    np.testing.assert_allclose(ours_boxes, theirs)


def _scene_example(labels, boxes, size=64):
  return {
    "image": np.zeros((size, size, 3), np.uint8),
    "boxes": np.asarray(boxes, np.float32),
    "box_labels": np.asarray(labels, np.int32),
  }


def test_grounding_pairs_name_each_object_once_and_skip_ambiguous_ones():
  from vlm.data import scenes

  red_circle = scenes.class_index("red", "circle")
  blue_star = scenes.class_index("blue", "star")
  ex = _scene_example([red_circle, blue_star, blue_star], [[8, 8, 48, 48], [0, 0, 10, 10], [54, 54, 64, 64]])
  assert grounding.object_phrases(ex) == ["large red circle", None, None]  # two small blue stars
  qs, ans = grounding.grounding_pairs(ex)
  assert qs[0] == "where is the large red circle?" and ans[0] == "<box>(125,125),(750,750)</box>"
  assert ans[1:3] == ["red", "circle"] and qs[1] == "what colour is the object in <box>(125,125),(750,750)</box>?"
  assert qs[-1] == "describe the image with boxes."
  assert ans[-1] == "<ref>a large red circle</ref><box>(125,125),(750,750)</box>"
  with pytest.raises(ValueError, match="data.grounding.tasks"):
    grounding.grounding_pairs(ex, ("boxes",))


def test_pipeline_adds_grounding_questions_that_follow_the_flip(data_dir):
  from configs import grounding as cfg
  from vlm.data import make_pipeline
  from vlm.data.pipeline import check_config

  c = cfg.get_config("demo")
  c.data.data_dir = str(data_dir)
  c.data.builder.update(TINY_DATA)
  c.data.grounding.only = True
  c.data.grounding.tasks = ("refer",)
  c.data.extra_text_keys = ("question", "answer")
  c.data.with_boxes = True
  c.data.text_length = 48  # 'answer' holds the whole box text
  c.data.pp_train = "decode|resize(32)|flip_lr(1.0)|value_range(-1, 1)"  # always mirrored
  batch = next(iter(make_pipeline(c.data, split="train", batch_size=8, mesh=None, seed=0)))
  from vlm.data import get_tokenizer

  tok = get_tokenizer(c.data)
  for q, a, boxes, labels in zip(
    tok.decode_batch(batch["question"]), tok.decode_batch(batch["answer"]), batch["boxes"], batch["box_labels"]
  ):
    assert q.startswith("where is the ")
    got = grounding.parse_boxes(a)[0]
    truths = [grounding.to_1000(b, 32, 32) for b, lab in zip(boxes, labels) if lab >= 0]
    assert got in truths  # the mirrored image's box, in 0-1000 of the 32 px input
  c.data.grounding.tasks = ("where",)
  with pytest.raises(ValueError, match="data.grounding.tasks"):
    check_config(c.data)


def test_chat_decode_writes_special_markers_back():
  from configs import grounding as cfg
  from vlm.data import get_tokenizer
  from vlm.data.conversation import chat_tokenizer_from_config

  c = cfg.get_config("demo")
  chat = chat_tokenizer_from_config(c.data.conversation, get_tokenizer(c.data))
  text = "<box>(12,345),(678,999)</box>"
  ids = chat.encode_text(text)
  assert ids[0] == 1005 and ids[-1] == 1006 and len(ids) < 25
  assert chat.decode(ids + [1, 7, 8]) == text  # stops at EOS


def test_guided_step_fn_mixes_the_two_streams():
  def run(cache, tokens, index):  # logits depend on the row's cache value
    return jnp.broadcast_to(cache[:, None, None], (tokens.shape[0], tokens.shape[1], 3)) * jnp.arange(3.0), cache

  cache = jnp.asarray([1.0, 2.0, 5.0, 7.0])  # rows 0-1 primary, 2-3 contrast
  paired, step = decoding.guided_step_fn(run, cache, 2, 3.0)
  assert paired.shape == (2, 2)
  logits, _ = step(paired, jnp.zeros((2, 1), jnp.int32), 0)
  np.testing.assert_allclose(
    logits[:, 0], [[0, 5 + 3 * (1 - 5), 2 * (5 + 3 * (1 - 5))], [0, 7 + 3 * (2 - 7), 2 * (7 + 3 * (2 - 7))]]
  )
  # The plausibility cut: row 0's primary logits [0, 1, 2] give token 0 e^-2 = 0.14 of the top
  # probability and token 1 e^-1 = 0.37; at 0.2 token 0 (the guided argmax above) is ruled out.
  paired, step = decoding.guided_step_fn(run, cache, 2, 3.0, plausibility=0.2)
  logits, _ = step(paired, jnp.zeros((2, 1), jnp.int32), 0)
  assert logits[0, 0, 0] < -1e30 and logits[0, 0, 1] == 5 + 3 * (1 - 5)
  assert int(jnp.argmax(logits[0, 0])) == 1
  assert logits[1, 0, 0] < -1e30  # row 1 ([0, 2, 4]): e^-4 and e^-2 of the top, both below 0.2
  assert logits[1, 0, 1] < -1e30 and int(jnp.argmax(logits[1, 0])) == 2


@pytest.mark.slow
def test_crg_is_plain_decoding_against_the_same_image_and_the_formula_otherwise():
  m = tiny_vision_lm()
  rng = np.random.default_rng(0)
  imgs = jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  other = jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  prompt = image_prompt(2)
  params = jax.jit(m.init)(jax.random.key(0), imgs, prompt)["params"]
  kw = dict(mask=jnp.ones_like(prompt), max_new_tokens=3, eos_id=-1)
  plain = predict_fns(m)["generate"](params, imgs, prompt, **kw).tokens
  np.testing.assert_array_equal(
    predict_fns(m)["generate_guided"](params, imgs, prompt, contrast_images=imgs, crg_alpha=2.0, **kw).tokens, plain
  )
  out = predict_fns(m)["generate_guided"](params, imgs, prompt, contrast_images=other, crg_alpha=1.5, **kw).tokens
  first = (
    2.5 * m.apply({"params": params}, imgs, prompt)[:, -1] - 1.5 * m.apply({"params": params}, other, prompt)[:, -1]
  )
  np.testing.assert_array_equal(out[:, 0], jnp.argmax(first, -1))
  with pytest.raises(ValueError, match="contrastive region guidance"):
    predict_fns(m)["generate_guided"](params, imgs, prompt, contrast_images=other, method="beam", **kw)


@pytest.fixture(scope="session")
def grounding_workdir(data_dir, tmp_path_factory):
  """(workdir, metrics) of a 3-step grounding run with every evaluation; once per session."""
  return shared_run(tmp_path_factory, "grounding", lambda wd: _grounding_run(data_dir, wd))


def _grounding_run(data_dir, wd):
  import ml_collections

  from configs import grounding as cfg
  from vlm.train import train

  c = cfg.get_config("demo")
  c.data.data_dir = str(data_dir)
  c.data.builder.update(TINY_DATA)
  c.model.lm_config.update(LM)
  c.model.vision_config.update(VISION)
  c.init = ml_collections.ConfigDict(dict(path=None, mapping=None, step=None))
  c.batch_size, c.total_steps, c.log_every, c.checkpoint_every = 16, 3, 1, 1000
  c.schedule.warmup_steps = 1
  c.tensorboard = False
  for e in c.evals.values():
    e.max_examples, e.every = 16, 3
  return train(c, wd)


def test_grounding_and_region_qa_evaluations_report_with_and_without_crg(grounding_workdir):
  _, out = grounding_workdir
  for key in (
    "grounding/iou50",
    "grounding/miou",
    "grounding/parsed",
    "region_qa/accuracy",
    "region_qa/accuracy_crg",
    "region_qa/accuracy_main",
    "region_qa/accuracy_crg_main",
  ):
    assert 0.0 <= out[key] <= 1.0, key


def test_region_qa_masks_the_asked_box_in_the_contrast_image(grounding_workdir, monkeypatch):
  from vlm.evals.grounding import RegionQA
  from vlm.load import load_model_and_params, load_workdir_config

  wd, _ = grounding_workdir
  config = load_workdir_config(wd)
  model, mesh, params = load_model_and_params(config, wd)
  ev = RegionQA(
    data=config.data,
    rules=config.rules,
    predict_fns=predict_fns(model),
    mesh=mesh,
    prefix="r",
    max_examples=8,
    max_new_tokens=2,
  )
  seen, calls = {}, []
  real = ev.answers

  def spy(params, images, prompt, mask, contrast_images=None, **kw):
    calls.append(contrast_images is not None)
    if contrast_images is not None:
      seen["images"], seen["masked"] = images, contrast_images
    return real(params, images, prompt, mask, contrast_images=contrast_images, **kw)

  monkeypatch.setattr(ev, "answers", spy)
  ev(params)
  objs = ev.objects()
  changed = np.any(seen["images"] != seen["masked"], axis=-1)  # [Q, H, W]
  x1, y1, x2, y2 = objs[0][4]
  inside = changed[0, int(np.floor(y1)) : int(np.ceil(y2)), int(np.floor(x1)) : int(np.ceil(x2))]
  assert changed[0].sum() == inside.sum() and inside.mean() > 0.5  # only (and most of) the box
  np.testing.assert_allclose(seen["masked"][0][changed[0]], -1.0)  # black after value_range(-1, 1)
  # Another CRG setting decodes the CRG stream only (what experiments/crg_sweep.py relies on).
  out = ev.crg_scores(params, 2.0, 0.1)
  assert calls == [False, True, True] and set(out) >= {"r/accuracy_crg", "r/accuracy_crg_main"}


def test_crg_sweep_script_prints_plain_and_each_setting(grounding_workdir):
  root = Path(__file__).resolve().parents[1]
  wd, _ = grounding_workdir
  run = subprocess.run(
    [
      sys.executable,
      "experiments/crg_sweep.py",
      f"--workdir={wd}",
      "--split=test",
      "--max_examples=8",
      "--settings=2:0.1",
    ],
    cwd=root,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
  assert [r["setting"] for r in rows] == ["plain", "crg a=2 plausibility=0.1"]
  assert all(0.0 <= r["all"] <= 1.0 and "main" in r for r in rows)
  bad = subprocess.run(
    [sys.executable, "experiments/crg_sweep.py", f"--workdir={wd}", "--settings=2"],
    cwd=root,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert bad.returncode != 0 and "ALPHA:PLAUSIBILITY" in bad.stderr
