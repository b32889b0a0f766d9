"""Interleaved image-text documents: the embedded documents, the OBELICS-layout JSONL source, the
pipeline's document batches, and Flamingo and a decoder VLM training and answering on them."""

import json

import ml_collections
import numpy as np
import pytest
from PIL import Image
from helpers import TINY_LM as LM, TINY_VISION as VISION

from vlm.data import embedded, get_tokenizer, make_pipeline, sources
from vlm.data.conversation import chat_tokenizer_from_config
from vlm.data.pipeline import check_config

DOCS = dict(num_train=64, num_validation=8, num_test=32, documents=3)


def test_embedded_documents_interleave_images_and_paragraphs():
  args = embedded.BuildArgs(**DOCS)
  doc = embedded.make_document(args, "train", 5)
  m = len(doc["labels"])
  assert 2 <= m <= 3 and len(doc["texts"]) == len(doc["images"]) == 1 + 2 * m
  kinds = ["image" if im else "text" for im in doc["images"]]
  assert kinds == ["text"] + ["image", "text"] * m
  assert all(bool(t) != bool(im) for t, im in zip(doc["texts"], doc["images"]))  # one kind per position
  assert doc["questions"][2].endswith("in the second image?")
  assert embedded.make_document(args, "train", 5)["images"] == doc["images"]  # deterministic


def _config(module, data_dir, tasks=("document", "qa")):
  c = module.get_config("demo")
  c.data.data_dir = str(data_dir)
  c.data.builder.update(DOCS)
  c.data.interleaved_images = 1
  c.data.max_images = 2  # documents of 3 images are cut before the third
  c.data.conversation.tasks = tasks
  c.data.conversation.task_weights = None
  c.data.conversation.length = 128  # 2 images x 16 placeholders (LLaVA) and the text
  c.data.conversation.prompt_length = 112
  return c


def test_pipeline_document_batches(data_dir):
  from configs import llava_stage2

  c = _config(llava_stage2, data_dir, tasks=("document",))
  check_config(c.data)
  batch = next(iter(make_pipeline(c.data, split="train", batch_size=8, mesh=None, seed=0)))
  assert batch["image"].shape == (8, 2, 32, 32, 3)
  conv = c.data.conversation
  chat = chat_tokenizer_from_config(conv, get_tokenizer(c.data))
  for row, tokens, loss in zip(batch["image"], batch["tokens"], batch["loss_mask"]):
    placeholders = tokens == chat.image_id
    real = int(np.any(row != 0, axis=(1, 2, 3)).sum())  # zero images pad the short documents
    assert placeholders.sum() == real * conv.image_tokens
    assert not loss[placeholders].any() and loss[~placeholders & (tokens != 0)][1:].all()


def test_document_jsonl_source_and_its_errors(tmp_path):
  for name, colour in (("a.png", 200), ("b.png", 50)):
    Image.fromarray(np.full((40, 48, 3), colour, np.uint8)).save(tmp_path / name)
  lines = [
    {
      "texts": ["two pictures.", None, "a bright one.", None, "a dark one."],
      "images": [None, "a.png", None, "b.png", None],
      "questions": ["q?"],
      "answers": ["a"],
    },
    {"texts": ["both", None], "images": ["a.png", None]},
    {"texts": ["no image here"], "images": [None]},
  ]
  path = tmp_path / "docs.jsonl"
  path.write_text("\n".join(json.dumps(obj) for obj in lines) + "\n")
  src = sources.DocumentSource(str(path))
  ex = sources.decode_record(src[0])
  assert [k for k, _ in ex["document"]] == ["text", "image", "text", "image", "text"]
  assert ex["document"][1][1].shape == (40, 48, 3) and ex["caption"] == "two pictures. a bright one. a dark one."
  assert src.describe(1) == f"{path}:2"
  with pytest.raises(sources.BadExample, match="both a text and an image"):
    sources.decode_record({"texts": ["x"], "images": [b"\x89PNG"]})
  with pytest.raises(sources.BadExample, match="no image"):
    sources.decode_record(src[2])
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps(lines[0]) + "\n" + json.dumps({"texts": ["a", None], "images": [None]}) + "\n")
  with pytest.raises(ValueError, match=r"bad.jsonl:2: 'texts' has 2 entries, 'images' 1"):
    sources.DocumentSource(str(bad))

  # Through the pipeline (resized per image, padded to max_images); the bad documents are counted.
  from configs import llava_stage2

  c = llava_stage2.get_config("demo")
  c.data.source, c.data.max_images = f"docs:{path}", 3
  c.data.conversation.tasks, c.data.conversation.task_weights = ("document",), None
  c.data.conversation.prompt_length = 96
  it = make_pipeline(
    c.data, split="train", batch_size=1, mesh=None, seed=0, shuffle=False, num_epochs=1, drop_remainder=False
  )
  batches = list(it)
  assert len(batches) == 1 and batches[0]["image"].shape == (1, 3, 32, 32, 3)
  assert it.stats()["skipped/bad_document"] == 1 and it.stats()["skipped/missing_image"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flamingo", "vision_lm"])
def test_flamingo_and_decoder_vlm_train_and_answer_on_documents(family, data_dir, tmp_path):
  from configs import flamingo, llava_stage2
  from vlm.train import train

  c = _config(flamingo if family == "flamingo" else llava_stage2, data_dir)
  c.model.lm_config.update(LM)
  c.model.vision_config.update(VISION)
  if family == "flamingo":
    c.model.resampler_config.update(num_latents=4, depth=1, head_dim=16)
    c.model.xattn_config.update(head_dim=16)
  c.init = ml_collections.ConfigDict(dict(path=None, mapping=None, step=None))
  c.frozen = []
  c.batch_size, c.total_steps, c.log_every, c.checkpoint_every = 8, 2, 1, 1000
  c.schedule.warmup_steps = 1
  c.tensorboard = False
  c.evals.vqa.update(max_examples=16, every=2)
  out = train(c, tmp_path / family)
  assert np.isfinite(out["train/loss"]) and 0.0 <= out["vqa/accuracy"] <= 1.0
