"""A published checkpoint as a vlm run: model, parameters, tokenizer and image preprocessing.

`load_published(path)` takes an HF Hub directory (config.json + safetensors, with its tokenizer files
and preprocessor_config.json as downloaded) or a big_vision two-tower `.npz`, and returns
`(config, params)`: an ml_collections config like the one vlm.train writes into a workdir
(`model_name`, `model`, `data.tokenizer`, `data.tokenizer_family`, `data.text_length`,
`data.add_bos`/`add_eos`, `data.pp_eval`) and the imported parameters. vlm.predict and vlm.evaluate
use it for `--hf=PATH` / `--init=PATH`, or when `--workdir` is such a directory.

Preprocessing comes from preprocessor_config.json, op for op (vlm.data.preprocess reproduces
CLIPImageProcessor / SiglipImageProcessor / BlipImageProcessor pixel for pixel): resize (shortest
edge or height x width, with the file's PIL filter), centre crop, rescale, normalize. Without that
file, the reference recipe of the model type is used (REFERENCE_PP) and the choice is printed.
The tokenizer is the directory's own (tokenizer.json, spiece.model or tokenizer.model) with the
family of the model type (SigLIP: 'siglip'); a big_vision .npz carries none: pass `tokenizer=`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from vlm.convert.hf_config import ConfigError, read_config
from vlm.data.preprocess import REFERENCE_PP, reference_pp

# PIL's resample codes as transformers stores them (PILImageResampling) -> vlm resize methods.
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# Tokenizer conventions and reference preprocessing by model type.
_FAMILY = {"siglip": "siglip", "llama": "llama", "gemma": "gemma", "llava": None, "llava_next": None}
_REFERENCE = {
  "clip": "clip",
  "siglip": "siglip",
  "llava": "llava",
  "llava_next": "clip",
  "blip-2": "blip",
  "idefics": "blip",
  "chameleon": "chameleon",
}
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer.model")


def pp_from_processor(file: str | Path) -> str:
  """The pp string (with "decode|") that reproduces the image processor of a preprocessor_config.json."""
  file = Path(file)
  p = json.loads(file.read_text())
  where = lambda key: f"{file}: {key}"  # noqa: E731
  ops = ["decode"]
  if p.get("do_pad") and p.get("image_processor_type", "").startswith("Llava"):
    ops.append("pad_to_square('clip')")
  method = _PIL_RESAMPLE.get(p.get("resample", 3))
  if method is None:
    raise ConfigError(f"{where('resample')} = {p.get('resample')!r}: not a PIL filter code 0-5")
  if p.get("do_resize", True):
    size = p.get("size")
    if isinstance(size, int):
      size = (
        {"shortest_edge": size}
        if p.get("image_processor_type", "").startswith("CLIP")
        else {"height": size, "width": size}
      )
    if not isinstance(size, dict):
      raise ConfigError(f"{where('size')} = {size!r}: expected shortest_edge or height/width")
    if "shortest_edge" in size:
      if size.get("longest_edge"):
        raise ConfigError(f"{where('size')} = {size!r}: longest_edge is not supported")
      ops.append(f"resize_small({int(size['shortest_edge'])}, method={method!r})")
    elif "height" in size and "width" in size:
      ops.append(f"resize(({int(size['height'])}, {int(size['width'])}), method={method!r})")
    else:
      raise ConfigError(f"{where('size')} = {size!r}: expected shortest_edge or height/width")
  if p.get("do_center_crop"):
    crop = p.get("crop_size")
    crop = {"height": crop, "width": crop} if isinstance(crop, int) else crop
    if not isinstance(crop, dict) or not {"height", "width"} <= set(crop):
      raise ConfigError(f"{where('crop_size')} = {crop!r}: expected height/width")
    ops.append(f"center_crop(({int(crop['height'])}, {int(crop['width'])}))")
  if p.get("do_rescale", True):
    ops.append(f"rescale({float(p.get('rescale_factor', 1 / 255))!r})")
  if p.get("do_normalize", True):
    mean, std = p.get("image_mean"), p.get("image_std")
    if mean is None or std is None:
      raise ConfigError(f"{file}: do_normalize without image_mean / image_std")
    ops.append(f"normalize(mean={tuple(float(x) for x in mean)!r}, std={tuple(float(x) for x in std)!r})")
  return "|".join(ops)


def _text_config(cfg) -> Any:
  """The sub-config that holds the text tower / LM sizes (max_position_embeddings)."""
  for key in ("text_config",):
    if key in cfg:
      return cfg[key]
  return cfg


def _hf_data(path: Path, cfg, tokenizer: str | None) -> dict[str, Any]:
  mt = cfg.model_type
  tok = tokenizer or next((str(path / f) for f in _TOKENIZER_FILES if (path / f).exists()), None)
  if tok is None:
    raise FileNotFoundError(f"{path}: no tokenizer ({', '.join(_TOKENIZER_FILES)}); pass tokenizer=")
  if (path / "preprocessor_config.json").exists():
    pp = pp_from_processor(path / "preprocessor_config.json")
  elif mt in _REFERENCE:
    size = cfg["vision_config"]["image_size"] if "vision_config" in cfg else None
    pp = "decode|" + reference_pp(_REFERENCE[mt], size)
    logging.warning("%s: no preprocessor_config.json; using vlm's %r reference recipe: %s", path, _REFERENCE[mt], pp)
  else:
    raise FileNotFoundError(
      f"{path}: no preprocessor_config.json and no reference recipe for {mt!r}; known: {sorted(REFERENCE_PP)}"
    )
  text = _text_config(cfg)
  length = int(text["max_position_embeddings"]) if mt in ("clip", "siglip") else 64
  return dict(
    tokenizer=tok,
    tokenizer_family=_FAMILY.get(mt) if tok.endswith(".model") else None,
    text_length=length,
    pp_eval=pp,
    add_bos=None,
    add_eos=None,
  )


def load_published(
  path: str | Path, tokenizer: str | None = None, **import_kw
) -> tuple[ml_collections.ConfigDict, dict]:
  """(config, params numpy) for an HF directory or a big_vision .npz (see the module docstring)."""
  from vlm.data.pipeline import get_default_config

  path = Path(path)
  if path.suffix == ".npz":
    from vlm.convert.big_vision import import_big_vision

    if not path.is_file():
      raise FileNotFoundError(f"{path}: no such file")
    name, kwargs, params = import_big_vision(path, **import_kw)
    patch = kwargs["image"]["patch_size"]
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    if not kwargs["image"].get("posemb_grid"):
      raise ValueError(f"{path}: sin-cos position embeddings do not fix the image size; pass posemb_grid=(h, w)")
    image_size = kwargs["image"]["posemb_grid"][0] * patch
    # big_vision's SigLIP evaluation pp: f"resize({res})|value_range(-1, 1)" (bilinear, no crop).
    data = dict(
      tokenizer=tokenizer,
      tokenizer_family="siglip" if tokenizer and tokenizer.endswith(".model") else None,
      text_length=int(kwargs["text"]["max_len"]),
      add_bos=None,
      add_eos=None,
      pp_eval=f"decode|resize({image_size})|value_range(-1, 1)",
    )
    if tokenizer is None:
      raise ValueError(
        f"{path}: a big_vision .npz holds no tokenizer; pass tokenizer= (--tokenizer=), e.g. the "
        "SigLIP SentencePiece model"
      )
  else:
    from vlm.convert import import_hf

    cfg = read_config(path)
    name, kwargs, params = import_hf(path, **import_kw)
    data = _hf_data(path, cfg, tokenizer)
  config = ml_collections.ConfigDict()
  config.model_name = name
  config.model = _to_config(kwargs)
  config.data = get_default_config()
  for key, value in data.items():
    if value is None and key in ("add_bos", "add_eos", "tokenizer_family"):
      config.data[key] = None  # the tokenizer's (family / post-processor) default
    else:
      config.data[key] = value
  config.init = ml_collections.ConfigDict(dict(path=str(path)))
  config.mesh = [("data", -1)]
  return config, params


def _to_config(kwargs: dict) -> ml_collections.ConfigDict:
  """Model kwargs (nested dicts, tuples) as a ConfigDict that build_model reads back unchanged."""

  def conv(v):
    if isinstance(v, dict):
      return {k: conv(x) for k, x in v.items()}
    if isinstance(v, np.generic):
      return v.item()
    return v

  return ml_collections.ConfigDict(conv(kwargs))


def is_published(path: str | Path) -> bool:
  """Whether path is an HF checkpoint directory (config.json with a model_type) or an .npz file."""
  path = Path(path)
  if path.suffix == ".npz" and path.is_file():
    return True
  file = path / "config.json"
  if not file.exists():
    return False
  try:
    return "model_type" in json.loads(file.read_text())
  except json.JSONDecodeError:
    return False
