"""Predictions for your own image from a trained workdir.

Zero-shot labels (any contrastive model: SigLIP, CLIP, LiT, CoCa, Llip):

    python -m vlm.predict --workdir=DIR --image=cat.png --labels="a,b,c"

embeds each label with the prompt templates (ensembled) and prints the labels ranked with their
probabilities (sigmoid of the logit for a model with a bias, as SigLIP; softmax over labels otherwise).

A caption (captioning models, e.g. CoCa), when no --labels are given:

    python -m vlm.predict --workdir=DIR --image=cat.png [--method=beam --num_beams=4]

An answer (VQA as answer classification, e.g. VLMo fine-tuned by configs/vlmo_vqa.py):

    python -m vlm.predict --workdir=DIR --image=cat.png --question="what colour is the cat?"

prints the top answers of data.answer_vocab with their probabilities.

A generated answer (VLMs on a language model, e.g. configs/llava_stage2.py):

    python -m vlm.predict --workdir=DIR --image=cat.png --prompt="what colour is the cat?"

wraps the prompt in the chat template of data.conversation (the image placeholder first, as in
training) and prints the greedy answer (--method/--num_beams as for captions).

The image goes through `data.pp_eval`; the workdir's config and latest checkpoint are used.

A published checkpoint, as downloaded (an HF Hub directory with its tokenizer and
preprocessor_config.json, or a big_vision SigLIP .npz with --tokenizer=spiece.model):

    python -m vlm.predict --hf=/path/to/siglip-base-patch16-224 --image=cat.jpg --labels="a cat,a dog"

(`--hf`, `--init` and `--workdir` all take it; vlm.convert.published builds the model, tokenizer and
image preprocessing from the directory.)
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from vlm.data import get_metadata, get_tokenizer
from vlm.data.example_ops import load_answer_vocab
from vlm.data.preprocess import apply_ops, parse_pp
from vlm.data.sources import decode_image
from vlm.convert.published import is_published
from vlm.load import load_run
from vlm.models.registry import predict_fns, require

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def load_example(path: str | Path, pp: str) -> dict:
  """An image file -> the example dict after the pp string ('image' and what the ops add, e.g. the
  `anyres` op's 'image_layout' and 'image_tokens')."""
  try:
    img = decode_image(Path(path).read_bytes())
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: cannot read the image: {e}") from None
  return apply_ops(parse_pp(pp, "data.pp_eval"), {"image": img}, np.random.default_rng(0))


def load_image(path: str | Path, pp: str) -> np.ndarray:
  """An image file -> [1, H, W, 3] float32 through the pp string (geometric ops, value range)."""
  return np.asarray(load_example(path, pp)["image"], np.float32)[None]


def predict(
  workdir: str | Path,
  image: str | Path,
  labels: list[str],
  templates: list[str] | None = None,
  step: int | None = None,
  tokenizer: str | None = None,
) -> list[tuple[str, float]]:
  """Labels ranked by a contrastive model's probability for the image (prompt-ensembled templates)."""
  config, model, _, params = load_run(workdir, step, tokenizer)
  fns = predict_fns(model)
  require(
    fns, ("embed_image", "embed_text", "scale_and_bias"), f"{workdir}: zero-shot labels (model {config.model_name!r})"
  )
  if templates is None and is_published(workdir):  # a published model: no dataset templates
    templates = list(DEFAULT_TEMPLATES)
  if templates is None:
    try:
      templates = list(get_metadata(config.data, "test").get("templates") or DEFAULT_TEMPLATES)
    except Exception:  # a source without metadata
      templates = list(DEFAULT_TEMPLATES)
  tok = get_tokenizer(config.data)
  ids = tok.encode_batch(
    [t.format(label) for label in labels for t in templates],
    config.data.text_length,
    config.data.add_bos,
    config.data.add_eos,
  )
  x = jnp.asarray(load_image(image, config.data.pp_eval))
  zimg = fns["embed_image"](params, x)
  ztxt = fns["embed_text"](params, jnp.asarray(ids))
  scale, bias = fns["scale_and_bias"](params)
  ztxt = jax.tree.map(lambda z: z.reshape(len(labels), len(templates), *z.shape[1:]).mean(1), ztxt)
  if "pair_similarity" in fns:  # Llip: caption-conditioned image embeddings
    sim = fns["pair_similarity"](zimg, ztxt)
  else:
    ztxt = ztxt / jnp.linalg.norm(ztxt, axis=-1, keepdims=True)
    sim = zimg @ ztxt.T
  logits = scale * sim[0]
  probs = jax.nn.sigmoid(logits + bias) if bias is not None else jax.nn.softmax(logits)
  order = np.argsort(-np.asarray(logits))
  return [(labels[i], float(probs[i])) for i in order]


def caption(
  workdir: str | Path,
  image: str | Path,
  method: str = "greedy",
  step: int | None = None,
  tokenizer: str | None = None,
  **decode_kw,
) -> str:
  """A caption of the image by a captioning model's KV-cached decoder (vlm.decoding)."""
  config, model, _, params = load_run(workdir, step, tokenizer)
  fns = predict_fns(model)
  if "caption" not in fns:
    raise ValueError(f"{workdir}: model {config.model_name!r} does not caption; pass --labels for zero-shot")
  tok = get_tokenizer(config.data)
  x = jnp.asarray(load_image(image, config.data.pp_eval))
  rng = jax.random.key(0) if method == "sample" else None
  out = fns["caption"](
    params,
    x,
    bos_id=tok.bos_id,
    eos_id=tok.eos_id,
    pad_id=tok.pad_id,
    max_len=int(config.data.text_length),
    method=method,
    rng=rng,
    **decode_kw,
  )
  return tok.decode(np.asarray(out.tokens)[0])


def answer(
  workdir: str | Path,
  image: str | Path,
  question: str,
  top_k: int = 3,
  step: int | None = None,
  tokenizer: str | None = None,
) -> list[tuple[str, float]]:
  """The top_k answers of data.answer_vocab (softmax probabilities) of a model with the predict
  function `vqa_logits`."""
  config, model, _, params = load_run(workdir, step, tokenizer)
  fns = predict_fns(model)
  if "vqa_logits" not in fns or config.data.get("answer_vocab") is None:
    raise ValueError(
      f"{workdir}: model {config.model_name!r} has no VQA classifier and answer vocabulary "
      "(train one with configs/vlmo_vqa.py)"
    )
  answers = list(load_answer_vocab(config.data.answer_vocab))
  tok = get_tokenizer(config.data)
  q = tok.encode_batch([question], config.data.text_length, config.data.add_bos, config.data.add_eos)
  x = jnp.asarray(load_image(image, config.data.pp_eval))
  probs = jax.nn.softmax(fns["vqa_logits"](params, x, jnp.asarray(q))[0])
  order = np.argsort(-np.asarray(probs))[:top_k]
  return [(answers[i], float(probs[i])) for i in order]


def chat(
  workdir: str | Path,
  image: str | Path,
  prompt: str,
  method: str = "greedy",
  max_new_tokens: int = 32,
  step: int | None = None,
  tokenizer: str | None = None,
  **decode_kw,
) -> str:
  """The answer of a VLM on a language model (its predict function `generate`) to `prompt` about the image."""
  from vlm.data.conversation import IMAGE, chat_tokenizer_from_config, instruction_tokens

  config, model, _, params = load_run(workdir, step, tokenizer)
  conv = config.data.get("conversation")
  fns = predict_fns(model)
  if "generate" not in fns or not conv:
    raise ValueError(
      f"{workdir}: model {config.model_name!r} is not a VLM on a language model with "
      "data.conversation (train one with configs/llava_stage2.py); use --question or --labels"
    )
  tok = get_tokenizer(config.data)
  turns = ([("system", conv.system)] if conv.get("system") else []) + [("user", IMAGE + prompt)]
  ex = load_example(image, config.data.pp_eval)
  chat_tok = chat_tokenizer_from_config(conv, tok)
  if "image_tokens" in ex:  # AnyRes: the image's own placeholder count
    chat_tok = chat_tok.with_image_tokens(ex["image_tokens"])
  ids = np.asarray(chat_tok.encode_prompt(turns), np.int32)[None]
  x = jnp.asarray(np.asarray(ex["image"], np.float32)[None])
  layout = jnp.asarray(ex["image_layout"])[None] if "image_layout" in ex else None
  rng = jax.random.key(0) if method == "sample" else None
  instruction = None
  if conv.get("instruction_length"):  # an instruction-aware Q-Former reads the prompt too
    instruction = jnp.asarray(instruction_tokens(turns, tok, int(conv.instruction_length)))[None]
  kw = dict(max_new_tokens=max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id, method=method, rng=rng, **decode_kw)
  if instruction is not None:
    kw["instruction"] = instruction
  if layout is not None:
    kw["image_layout"] = layout
  out = fns["generate"](params, x, jnp.asarray(ids), **kw)
  return tok.decode(np.asarray(out.tokens)[0])


def main(argv) -> None:
  del argv
  from absl import flags, logging

  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  sources = [x for x in (f.workdir, f.hf, f.init) if x]
  if len(sources) != 1:
    raise ValueError(
      "pass exactly one of --workdir (a training run), --hf / --init (an HF directory or a "
      f"big_vision .npz); got {len(sources)}"
    )
  run, tok = sources[0], f.tokenizer
  if f.prompt is not None:
    kw = {"num_beams": f.num_beams} if f.method == "beam" else {}
    print(json.dumps({"answer": chat(run, f.image, f.prompt, f.method, step=f.step, tokenizer=tok, **kw)}), flush=True)
    return
  if f.question is not None:
    ranked = answer(run, f.image, f.question, step=f.step, tokenizer=tok)
    print(json.dumps([{"answer": a, "prob": round(p, 4)} for a, p in ranked], indent=2), flush=True)
    return
  if f.labels is None:
    kw = {"num_beams": f.num_beams} if f.method == "beam" else {}
    print(json.dumps({"caption": caption(run, f.image, f.method, f.step, tokenizer=tok, **kw)}), flush=True)
    return
  labels = [s.strip() for s in f.labels.split(",") if s.strip()]
  if not labels:
    raise ValueError("--labels: give at least one label, e.g. --labels='red circle,blue star'")
  templates = [t for t in f.templates.split("|")] if f.templates else None
  ranked = predict(run, f.image, labels, templates=templates, step=f.step, tokenizer=tok)
  print(json.dumps([{"label": label, "prob": round(p, 4)} for label, p in ranked], indent=2), flush=True)


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("workdir", None, "Workdir of a training run (or a published checkpoint, as --hf).")
  flags.DEFINE_string("hf", None, "A published checkpoint: HF Hub directory (or big_vision .npz).")
  flags.DEFINE_string("init", None, "Same as --hf.")
  flags.DEFINE_string("tokenizer", None, "Tokenizer file/directory (needed for a big_vision .npz).")
  flags.DEFINE_string(
    "templates", None, "'|'-separated prompt templates with {} (default: the data's, or 'a photo of a {}.')."
  )
  flags.DEFINE_string("image", None, "Path to an image file.")
  flags.DEFINE_string("labels", None, "Comma-separated candidate labels (zero-shot); without: a caption.")
  flags.DEFINE_string("question", None, "A question about the image (VQA classifiers).")
  flags.DEFINE_string("prompt", None, "A prompt about the image (VLMs on a language model: generated answer).")
  flags.DEFINE_enum("method", "greedy", ["greedy", "beam", "sample"], "Caption decoding method.")
  flags.DEFINE_integer("num_beams", 4, "Beams for --method=beam.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.mark_flags_as_required(["image"])
  app.run(main)
