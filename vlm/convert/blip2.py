"""Import of Hugging Face BLIP-2 weights (transformers' modeling_blip_2) into our modules.

- `import_hf_blip2_qformer`: Blip2QFormerModel (+ the owner's `query_tokens` and text
  `embeddings.*` when present) -> vlm.nn.qformer.QFormer params.
- `import_hf_blip2_vision`: Blip2VisionModel -> vlm.models.vit.ViT params (class token, learned
  positions over [CLS; patches], pre-LN blocks with a fused qkv, post_layernorm = encoder_norm).
- `import_hf_blip2_stage1`: Blip2ForImageTextRetrieval -> ('blip2_qformer', kwargs, params) of
  vlm.models.blip2.Blip2QFormer (vision model, query tokens, Q-Former with its text embeddings,
  vision/text projections, ITM head). HF has no ITG head nor temperature: `lm_*` and `t` are
  absent from the returned params (merge them into initialised ones, e.g. checkpoint.merge_params).

- `import_hf_blip2`: Blip2ForConditionalGeneration with a decoder-only Llama / Qwen2 / Gemma LM ->
  ('vision_lm', vlm.models.vision_lm.VisionLanguageModel kwargs, params): vision_model 'blip2_qformer'
  (its `query_features`), connector 'linear' (language_projection), the LM by vlm.convert.common.lm_table.
  `vlm.convert.import_hf` dispatches here for model_type 'blip-2' (a Blip2ForImageTextRetrieval
  checkpoint goes to import_hf_blip2_stage1).

The row tables (`qformer_rows`, `vision_rows`, `language_projection_rows`) map HF keys to our paths
with a layout; `import_hf_blip2` combines them with vlm.convert.common.lm_table's.

Layout names are those of vlm.convert.common.fwd (`dense`: torch [out, in] -> [in, out]; `qkv`:
[h*hd, D] -> [D, h, hd]; `out`: [D, h*hd] -> [h, hd, D]; `conv`: [D, C, p, p] -> [p, p, C, D]).

Config: config.json is read only through vlm.convert.hf_config (transformers' defaults of Blip2Config,
Blip2VisionConfig, Blip2QFormerConfig and the LM's config for what a 4.x file leaves out); a config
given with a state dict may be an HFConfig, a transformers config or its dict (wrapped with
hf_config.from_dict). A value vlm cannot express is a ConfigError naming file, key and value (an
activation ACT_FROM_HF lacks, a non-positive cross_attention_frequency, ...). As transformers 5 does,
the LM is decoder-only iff text_config.model_type is a causal LM (the file's
use_decoder_only_language_model is not read), its head tying is the LM config's tie_word_embeddings,
and Blip2VisionConfig.qkv_bias=False (no q/v biases) imports as zero biases.
"""

from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

from vlm.convert import hf_config, llm
from vlm.convert.common import (
  ACT_FROM_HF,
  LM_LAYOUTS,
  Part,
  Row,
  apply_part,
  as_config,
  fwd,
  linear_rows,
  lm_table,
  load_source,
  norm_rows,
  square_size,
  stack_encoder_blocks,
)
from vlm.convert.hf_config import HFConfig
from vlm.convert.registry import register_importer


def language_projection_rows(ours: str = "projector", hf: str = "language_projection") -> list[Row]:
  """Stage 2's Linear from the query outputs [.., D] to the LLM width (Blip2ForConditionalGeneration)."""
  return linear_rows(hf, ours, "dense")


def _attention_rows(hf: str, ours: str) -> list[Row]:
  """BERT attention: {query,key,value} Linear + output.dense (+ output.LayerNorm)."""
  rows = []
  for name in ("query", "key", "value"):
    rows += linear_rows(f"{hf}.attention.{name}", f"{ours}/{name}", "qkv", bias_kind="qkv_bias")
  return rows + linear_rows(f"{hf}.output.dense", f"{ours}/out", "out")


def qformer_rows(
  depth: int,
  cross_attention_frequency: int,
  text: bool,
  *,
  hf: str = "qformer",
  ours: str = "qformer",
  embeddings: str | None = "embeddings",
) -> list[Row]:
  """Rows for HF Blip2QFormerModel at prefix `hf` ('' for a standalone one) -> our QFormer at `ours`.

  text: the layers have the text FFN (HF use_qformer_text_input / LAVIS stage 1); embeddings: the HF
  prefix of Blip2TextEmbeddings (word + position embeddings; None: none).
  """
  p = f"{hf}." if hf else ""
  o = f"{ours}/" if ours else ""
  rows = norm_rows(f"{p}layernorm", f"{o}norm")
  if text and embeddings:
    rows += [
      (f"{embeddings}.word_embeddings.weight", f"{o}word_embed/embedding", "id"),
      (f"{embeddings}.position_embeddings.weight", f"{o}pos_embed/pos_embedding", "batch1"),
    ]
  for i in range(depth):
    h, b = f"{p}encoder.layer.{i}", f"{o}block_{i}"
    rows += _attention_rows(f"{h}.attention", f"{b}/attn")
    rows += norm_rows(f"{h}.attention.output.LayerNorm", f"{b}/norm_attn")
    if i % cross_attention_frequency == 0:
      rows += _attention_rows(f"{h}.crossattention", f"{b}/cross_attn")
      rows += norm_rows(f"{h}.crossattention.output.LayerNorm", f"{b}/norm_cross")
    ffns = [("_query", "query")] + ([("", "text")] if text else [])
    for suffix, name in ffns:
      rows += linear_rows(f"{h}.intermediate{suffix}.dense", f"{b}/mlp_{name}/fc1")
      rows += linear_rows(f"{h}.output{suffix}.dense", f"{b}/mlp_{name}/fc2")
      rows += norm_rows(f"{h}.output{suffix}.LayerNorm", f"{b}/norm_mlp_{name}")
  return rows


def vision_rows(depth: int, *, hf: str = "vision_model", ours: str = "img") -> list[Row]:
  """Rows for HF Blip2VisionModel at prefix `hf` ('' for a standalone one) -> our ViT at `ours`.

  The fused `self_attn.qkv` must first be split by `split_fused_qkv` (into `self_attn.{q,k,v}`).
  """
  p = f"{hf}." if hf else ""
  o = f"{ours}/" if ours else ""
  rows = [
    (f"{p}embeddings.class_embedding", f"{o}cls", "id"),
    (f"{p}embeddings.position_embedding", f"{o}pos_embedding/pos_embedding", "id"),
  ]
  rows += linear_rows(f"{p}embeddings.patch_embedding", f"{o}embedding/conv", "conv")
  for i in range(depth):
    h, b = f"{p}encoder.layers.{i}", f"{o}encoder/block_{i}"
    rows += norm_rows(f"{h}.layer_norm1", f"{b}/norm1") + norm_rows(f"{h}.layer_norm2", f"{b}/norm2")
    for a, name in (("q", "query"), ("k", "key"), ("v", "value")):
      rows += linear_rows(f"{h}.self_attn.{a}", f"{b}/attn/{name}", "qkv", bias_kind="qkv_bias")
    rows += linear_rows(f"{h}.self_attn.projection", f"{b}/attn/out", "out")
    rows += linear_rows(f"{h}.mlp.fc1", f"{b}/mlp/fc1") + linear_rows(f"{h}.mlp.fc2", f"{b}/mlp/fc2")
  return rows + norm_rows(f"{p}post_layernorm", f"{o}encoder_norm")


def split_fused_qkv(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`*.self_attn.qkv.{weight,bias}` [3D, D] / [3D] -> `*.self_attn.{q,k,v}.{weight,bias}`.

  Blip2Attention without qkv_bias has no bias: the split biases are zeros.
  """
  out = dict(tensors)
  for key in [k for k in tensors if k.endswith(".self_attn.qkv.weight")]:
    base = key[: -len(".qkv.weight")]
    w = out.pop(key)
    d = w.shape[0] // 3
    b = out.pop(f"{base}.qkv.bias", np.zeros((3 * d,), w.dtype))
    for i, name in enumerate("qkv"):
      out[f"{base}.{name}.weight"] = w[i * d : (i + 1) * d]
      out[f"{base}.{name}.bias"] = b[i * d : (i + 1) * d]
  return out


# -- sources ----------------------------------------------------------------------------------------


def _sub_config(config: HFConfig, key: str) -> HFConfig:
  """config[key] for a composite config that has the sub-config `key`; else config itself (a bare
  sub-config, e.g. a Blip2QFormerConfig)."""
  config = as_config(config)
  return config[key] if key in hf_config.SUB_CONFIGS.get(config.model_type, {}) else config


def _expect_type(c: HFConfig, *model_types: str) -> HFConfig:
  if c.model_type not in model_types:
    raise c.error("model_type", f"expected {' or '.join(map(repr, model_types))}")
  return c


def _apply_rows(
  tensors: dict[str, np.ndarray], rows: list[Row], heads: dict[str, int], what: str
) -> tuple[dict, set[str]]:
  """Flat params {path tuple: array} for `rows`; heads maps an our-path prefix to the head count."""
  missing = [hf for hf, _, _ in rows if hf not in tensors]
  if missing:
    raise ValueError(f"{what}: tensors expected but absent: {missing[:20]}")
  flat = {}
  for hf, ours, kind in rows:
    h = next((n for prefix, n in heads.items() if ours.startswith(prefix)), 1)
    flat[tuple(ours.split("/"))] = np.asarray(fwd(kind, tensors[hf], h), np.float32)
  return flat, {hf for hf, _, _ in rows}


def _prefix(tensors: dict[str, np.ndarray], marker: str, candidates: tuple[str, ...]) -> str:
  for c in candidates:
    if f"{c}.{marker}" in tensors or (not c and marker in tensors):
      return c
  raise ValueError(
    f"no {marker!r} under any of the prefixes {candidates}: not a BLIP-2 checkpoint? keys: {sorted(tensors)[:10]}"
  )


def qformer_kwargs_from_hf(qc, text: bool) -> dict[str, Any]:
  """Our QFormer kwargs for an HF Blip2QFormerConfig (an HFConfig, or a dict / transformers config: wrapped;
  text: the checkpoint has the text side)."""
  qc = _expect_type(as_config(qc, "blip_2_qformer"), "blip_2_qformer")
  every = qc["cross_attention_frequency"]
  if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
    raise qc.error("cross_attention_frequency", "expected a positive integer")
  pad = qc["pad_token_id"]  # the key mask of our text side; Blip2QFormerConfig's default is 0
  return dict(
    width=qc["hidden_size"],
    depth=qc["num_hidden_layers"],
    num_heads=qc["num_attention_heads"],
    mlp_dim=qc["intermediate_size"],
    cross_attention_frequency=every,
    vocab_size=qc["vocab_size"] if text else None,
    max_len=qc["max_position_embeddings"],
    pad_id=int(pad) if isinstance(pad, int) else 0,
    mlp_act=qc.choice("hidden_act", ACT_FROM_HF),
    norm_eps=float(qc["layer_norm_eps"]),
    dropout=float(qc["hidden_dropout_prob"]),
  )


def vit_kwargs_from_hf(vc) -> dict[str, Any]:
  """Our ViT kwargs for an HF Blip2VisionConfig (an HFConfig, or a dict / transformers config: wrapped).
  qkv_bias False needs nothing: split_fused_qkv gives zero biases."""
  vc = _expect_type(as_config(vc, "blip_2_vision_model"), "blip_2_vision_model")
  size, patch = square_size(vc, "image_size"), square_size(vc, "patch_size")
  if size % patch:
    raise vc.error("image_size", f"not a multiple of patch_size {patch}")
  grid = size // patch
  return dict(
    width=vc["hidden_size"],
    depth=vc["num_hidden_layers"],
    mlp_dim=vc["intermediate_size"],
    num_heads=vc["num_attention_heads"],
    patch_size=patch,
    class_token=True,
    pool_type="none",
    posemb="learn",
    posemb_grid=(grid, grid),
    pre_norm=False,
    patch_bias=True,
    norm_eps=float(vc["layer_norm_eps"]),
    mlp_act=vc.choice("hidden_act", ACT_FROM_HF),
  )


# -- importers --------------------------------------------------------------------------------------


def _qformer_flat(tensors, qc, ours: str = ""):
  qp = _prefix(tensors, "layernorm.weight", ("qformer", ""))
  text = f"{qp + '.' if qp else ''}encoder.layer.0.intermediate.dense.weight" in tensors
  emb = "embeddings" if "embeddings.word_embeddings.weight" in tensors else None
  kwargs = qformer_kwargs_from_hf(qc, text)
  if emb:
    kwargs["vocab_size"] = tensors["embeddings.word_embeddings.weight"].shape[0]
    kwargs["max_len"] = tensors["embeddings.position_embeddings.weight"].shape[0]
  rows = qformer_rows(kwargs["depth"], kwargs["cross_attention_frequency"], text, hf=qp, ours=ours, embeddings=emb)
  flat, used = _apply_rows(tensors, rows, {"": kwargs["num_heads"]}, "Blip2QFormerModel")
  return kwargs, flat, used


def import_hf_blip2_qformer(source, config=None) -> tuple[dict[str, Any], dict, np.ndarray | None]:
  """HF Blip2QFormerModel weights -> (QFormer kwargs, QFormer params, query_tokens [1, Q, D] or None).

  source: an HF directory (config.json + safetensors) of any Blip2* model or a state dict
  {key: array or torch tensor} of Blip2QFormerModel (keys 'layernorm.*', 'encoder.layer.*') or of a
  model holding one under 'qformer.' (with 'query_tokens' and 'embeddings.*' beside it).
  config: the HF config (a composite Blip2Config's qformer_config is used), required with a state
  dict. Text side: when the layers have the text FFN (use_qformer_text_input) the kwargs get a
  vocab_size; the word / position embeddings are imported when the source has 'embeddings.*'
  (Blip2ForImageTextRetrieval, Blip2TextModelWithProjection), else absent from the params.
  """
  tensors, config = load_source(source, config)
  kwargs, flat, _ = _qformer_flat(tensors, _sub_config(config, "qformer_config"))
  query = tensors.get("query_tokens")
  return kwargs, traverse_util.unflatten_dict(flat), (None if query is None else np.asarray(query, np.float32))


def import_hf_blip2_vision(source, config=None) -> tuple[dict[str, Any], dict]:
  """HF Blip2VisionModel weights (standalone or under 'vision_model.') -> (ViT kwargs, ViT params).

  Our ViT expresses the whole model: class token, learned positions over [CLS; patches], pre-LN
  blocks (the fused qkv with q/v biases is split, k bias 0), exact GELU, post_layernorm as the
  final norm, pool_type 'none' (aux['encoded'] = HF last_hidden_state).
  """
  tensors, config = load_source(source, config)
  vc = _sub_config(config, "vision_config")
  tensors = split_fused_qkv(tensors)
  vp = _prefix(tensors, "post_layernorm.weight", ("vision_model", ""))
  kwargs = vit_kwargs_from_hf(vc)
  flat, _ = _apply_rows(
    tensors, vision_rows(kwargs["depth"], hf=vp, ours=""), {"": kwargs["num_heads"]}, "Blip2VisionModel"
  )
  return kwargs, traverse_util.unflatten_dict(flat)


def import_hf_blip2_stage1(source, config=None) -> tuple[str, dict[str, Any], dict]:
  """HF Blip2ForImageTextRetrieval -> ('blip2_qformer', Blip2QFormer kwargs, params).

  The ITG head ('lm_transform', 'lm_norm', 'lm_bias') and the temperature 't' are not in HF's
  model: they are absent from the params. dec_id is set to the last vocabulary row (LAVIS appends
  [DEC] to BERT's vocabulary). Raises listing tensors that were not used.
  """
  tensors, config = load_source(source, config)
  tensors = split_fused_qkv(tensors)
  vc, qc = _sub_config(config, "vision_config"), _sub_config(config, "qformer_config")
  vit = vit_kwargs_from_hf(vc)
  qkw, flat, used = _qformer_flat(tensors, qc, ours="qformer")
  if not qkw.get("vocab_size"):
    raise ValueError(
      "import_hf_blip2_stage1 needs a Q-Former with a text side (use_qformer_text_input) and "
      "'embeddings.*': a Blip2ForImageTextRetrieval checkpoint"
    )
  vflat, vused = _apply_rows(tensors, vision_rows(vit["depth"]), {"img/": vit["num_heads"]}, "Blip2VisionModel")
  flat.update(vflat)
  used |= vused
  heads = linear_rows("vision_projection", "vision_proj") + linear_rows("text_projection", "text_proj")
  heads += linear_rows("itm_head", "itm_head") + [("query_tokens", "query_tokens", "id")]
  hflat, hused = _apply_rows(tensors, heads, {}, "Blip2ForImageTextRetrieval")
  flat.update(hflat)
  used |= hused
  unused = sorted(set(tensors) - used - {"embeddings.position_ids"})
  if unused:
    raise ValueError(f"tensors not used by the BLIP-2 importer (unsupported layout?): {unused[:20]}")
  query = tensors["query_tokens"]
  kwargs = dict(
    image=vit,
    qformer=qkw,
    num_query_tokens=int(query.shape[1]),
    embed_dim=int(tensors["text_projection.weight"].shape[0]),
    dec_id=qkw["vocab_size"] - 1,
  )
  return "blip2_qformer", kwargs, traverse_util.unflatten_dict(flat)


# -- stage 2: Blip2ForConditionalGeneration -> VisionLanguageModel ----------------------------------

# The LM is found in vlm.convert.common.LM_LAYOUTS ('language_model.model.*' + 'language_model.lm_head.*', as
# transformers saves Blip2ForConditionalGeneration, or 'model.language_model.*' + 'lm_head.*'); the other parts
# may sit under a 'model.' prefix too. Buffers that some versions save:
_IGNORED_SUFFIXES = ("position_ids", "rotary_emb.inv_freq")


def _stage2_vision_config(vit: dict[str, Any], qformer: dict[str, Any], num_query_tokens: int) -> dict[str, Any]:
  """Blip2QFormer kwargs (VisionLanguageModel.vision_config) of a stage-2 model: a queries-only Q-Former
  (`vocab_size=None`: no text side, ITC/ITM/ITG heads or temperature), exactly the checkpoint's tensors."""
  return dict(image=vit, qformer=dict(qformer, vocab_size=None), num_query_tokens=num_query_tokens)


def _text_config(config: HFConfig) -> HFConfig:
  """The LM's HFConfig (text_config; Blip2Config's default is OPT's); NotImplementedError naming the file for a
  LM that is not a decoder-only Llama / Qwen2 / Gemma."""
  tc = config["text_config"]
  if tc.model_type not in llm.MODEL_TYPES:
    raise NotImplementedError(
      f"{tc.where('model_type')} = {tc.model_type!r}: VisionLanguageModel's DecoderLM imports decoder-only "
      f"{'/'.join(llm.MODEL_TYPES)} LMs (vlm.convert.llm); "
      "OPT (learned positions, ReLU MLP, pre-LN with biases) and encoder-decoder Flan-T5 language models are not "
      "supported"
    )
  return tc


def _image_token(config: HFConfig):
  """Blip2Config.image_token_index (attribute_map: a file may spell it image_token_id)."""
  if config.given("image_token_id") and not config.given("image_token_index"):
    return "image_token_id", config["image_token_id"]
  return "image_token_index", config["image_token_index"]


@register_importer("blip-2")
def import_hf_blip2(
  source, config=None, scan: bool = False, image_token_id: int | None = None
) -> tuple[str, dict[str, Any], dict]:
  """HF Blip2ForConditionalGeneration -> ('vision_lm', VisionLanguageModel kwargs, params float32).

  source: an HF directory (config.json + safetensors, sharded or not) or a state dict {key: array or
  torch tensor} with its config (dict or transformers config). A Blip2ForImageTextRetrieval checkpoint
  (no language_projection, an itm_head) is passed to import_hf_blip2_stage1.

  The model: images -> our ViT (HF vision_model with post_layernorm) -> Blip2QFormer.query_features
  (query_tokens through the queries-only Q-Former) -> connector 'linear' (language_projection) -> the
  query outputs written at the `image_token_index` placeholders (the Blip2Processor puts
  num_query_tokens of them before the text) -> DecoderLM. Only decoder-only Llama / Qwen2 / Gemma LMs
  (vlm.convert.llm): OPT and Flan-T5 raise NotImplementedError. image_token_id: the placeholder id for
  a config without image_token_index (it must never occur in the text).

  Raises naming the tensors that are absent or left unused. The params are exactly those that
  VisionLanguageModel.init creates for the kwargs. scan: the ViT and the LM in their scanned layouts
  (vision_config.image scan=True: vision/img/encoder/layers/...; lm_config scan_layers=True:
  lm/decoder/layers/...); the Q-Former stays unrolled (its blocks alternate with and without
  cross-attention). A stage-1 checkpoint has no scanned import (NotImplementedError).
  """
  where = str(source) if isinstance(source, (str, Path)) else "state dict"
  tensors, config = load_source(source, config)
  if "language_projection.weight" not in tensors and "model.language_projection.weight" not in tensors:
    if "itm_head.weight" in tensors:
      if scan:
        raise NotImplementedError(
          f"{where}: a BLIP-2 stage-1 (Blip2ForImageTextRetrieval) checkpoint has no scanned "
          "import; import it with scan=False"
        )
      return import_hf_blip2_stage1(tensors, config)
    raise ValueError(
      f"{where}: not a Blip2ForConditionalGeneration checkpoint (no language_projection; "
      f"architectures {config['architectures']}); keys: {sorted(tensors)[:10]}"
    )
  _expect_type(config, "blip-2")
  tc = _text_config(config)
  token_key, token = _image_token(config)
  token = token if image_token_id is None else image_token_id
  if token is None:
    raise config.error(
      token_key,
      "a BLIP-2 checkpoint from before the placeholder layout (HF prepended the query "
      "outputs to the text): pass image_token_id, an id that never occurs in the text, and put "
      "num_query_tokens of them before the prompt",
    )

  # Split: the LM (canonical 'model.*' / 'lm_head.*' keys) and the rest without a 'model.' prefix.
  lm_map = next((m for m in LM_LAYOUTS if any(k.startswith(next(iter(m))) for k in tensors)), None)
  if lm_map is None:
    raise ValueError(
      f"{where}: no language model under 'language_model.model.' / 'model.language_model.'; "
      f"keys: {sorted(tensors)[:10]}"
    )
  lm = Part("language model", lm_map)
  rest, stored = {}, {}
  for k, v in tensors.items():
    if not lm.take(k, v):
      c = k[len("model.") :] if k.startswith("model.") else k
      rest[c], stored[c] = v, k
  rest = split_fused_qkv(rest)

  # Vision tower, queries, Q-Former (no text side), projection: this module's tables under our paths.
  vit = vit_kwargs_from_hf(_sub_config(config, "vision_config"))
  qkw = qformer_kwargs_from_hf(_sub_config(config, "qformer_config"), text=False)
  rows = vision_rows(vit["depth"], hf="vision_model", ours="vision/img")
  rows += qformer_rows(
    qkw["depth"], qkw["cross_attention_frequency"], text=False, hf="qformer", ours="vision/qformer", embeddings=None
  )
  rows += [("query_tokens", "vision/query_tokens", "id")] + language_projection_rows("connector/proj")
  flat, used = _apply_rows(
    rest,
    rows,
    {"vision/img/": vit["num_heads"], "vision/qformer/": qkw["num_heads"]},
    f"{where}: Blip2ForConditionalGeneration",
  )

  # Language model: vlm.convert.common's lm_table on the canonical keys.
  lm_kw = llm.model_kwargs_from_hf_llm(tc, lm.tensors)
  lrows = lm_table(lm_kw)
  flat.update({("lm",) + k: v for k, v in apply_part(lm, lrows, where, gemma_norm=tc.model_type == "gemma").items()})

  proj = flat[("connector", "proj", "kernel")]
  if proj.shape != (qkw["width"], lm_kw["width"]):
    raise ValueError(
      f"{where}: language_projection maps {proj.shape[0]} -> {proj.shape[1]}; the Q-Former has width "
      f"{qkw['width']} and the LM {lm_kw['width']}"
    )
  num_query = int(flat[("vision", "query_tokens")].shape[1])
  if config["num_query_tokens"] != num_query:
    raise config.error("num_query_tokens", f"but the checkpoint's query_tokens holds {num_query}")

  ignored = {"lm_head.weight"} if lm_kw["tie_embeddings"] else set()  # a tied head saved anyway
  unused = [stored.get(k, k) for k in rest if k not in used and not k.endswith(_IGNORED_SUFFIXES)]
  lused = {r[0] for r in lrows} | ignored
  unused += [lm.stored(k) for k in lm.tensors if k not in lused and not k.endswith(_IGNORED_SUFFIXES)]
  if unused:
    raise ValueError(f"{where}: tensors not used by the BLIP-2 importer (unsupported layout?): {sorted(unused)[:20]}")
  kwargs = dict(
    lm_config=lm_kw,
    vision_model="blip2_qformer",
    vision_config=_stage2_vision_config(vit, qkw, num_query),
    vision_method="query_features",
    connector_type="linear",
    prefix_tokens=1,
    image_token_id=int(token),
  )
  params = traverse_util.unflatten_dict(flat)
  if scan:
    vc = kwargs["vision_config"]
    kwargs = dict(
      kwargs, vision_config=dict(vc, image=dict(vc["image"], scan=True)), lm_config=dict(lm_kw, scan_layers=True)
    )
    params = stack_encoder_blocks(params, names=("encoder", "decoder"))
  return "vision_lm", kwargs, params
