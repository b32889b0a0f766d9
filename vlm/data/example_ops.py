"""Per-example ops: one decoded record -> one model-ready example, each step a registered op.

The pipeline (vlm.data.pipeline) runs, for every element of its stream, the ordered op list that
`make_ops(data, pp, ...)` builds from `config.data`; nothing family-specific stays in the pipeline.
Each op is a small class registered here with its name; `known_ops()` lists them in the order they
run (registration order):

    op              on when                      what
    decode          always                       record -> example: 'image' uint8 [H, W, 3], texts, label,
                                                 boxes, frames (sources.decode_record; an unreadable record
                                                 raises sources.BadExample: counted and skipped)
    pp              always                       the image pp ops (data.pp_train / pp_eval, vlm.data.preprocess)
                                                 on image, frames, boxes, texts (not on documents)
    document        always (acts on documents)   each image of a document through the pp ops -> 'image'
                                                 [max_images, H, W, 3], 'image_context' (text + '<image>')
    mixgen          data.mixgen > 0              MixGen: mixed with another example
    grounding       data.grounding               question/answer pairs from the boxes (vlm.data.grounding)
    question_regex  data.question_regex          keeps the pairs whose question matches
    interleave      data.interleaved_images > 1  a document of that many images around the example
    frames_as_images data.frames_as_images       the clip's frames as its images, '<image>' (+ subtitle) each
    image           always                       out 'image' float32 (uint8 / 255)
    text            always                       out 'text' int32 [text_length] (the caption)
    label           always                       out 'label' int32, 'seen' bool
    text_detailed   extra_text_keys              out 'text_detailed' int32 [detailed_text_length]
    question        extra_text_keys              draws the question j; out 'question', 'answer' [text_length]
    answer_label    data.answer_vocab            out 'answer_label' int32 (index in the vocab, -1: absent)
    image_layout    the pp op 'anyres'           out 'image_layout' int32 [4] (tile rows, cols, height, width)
    conversation    data.conversation            out 'tokens', 'loss_mask', 'prompt', ... (vlm.data.conversation)
    cm3             data.cm3                     CM3's span transform of 'tokens', 'loss_mask' (vlm.data.cm3)
    boxes           data.with_boxes              out 'boxes' f32 [max_boxes, 4], 'box_labels' i32 [max_boxes]
    frames          data.with_frames             out 'frames' f32 [T, H, W, 3], 'motion' int32

An op works on an ExampleState: `ex`, the example being transformed (the decoded record, then its
preprocessed image, texts, ...), and `out`, the model inputs written so far (what the pipeline
batches). Its class method `check(data)` validates the config keys it reads, with the ValueError
that names the key (the pipeline's `check_config` runs every op's check, active or not, so a bad
value fails when the config is read); `from_config(data, env)` builds it, or returns None when the
config leaves it off.

Random streams, as before the ops were split out: every op that draws without a stream of its own
draws from `state.rng` = np.random.default_rng([seed, 0, position]) (position: the example's place in
the global stream), in op order: the pp ops, the other examples of `interleave`, the question pick of
`question`. The conversation draws from stream [seed, 1, position], CM3 from [seed, 2, position],
MixGen from [seed, 3, position] (`state.stream(k)`), so turning one of them on leaves every other
draw as it was.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from vlm.data import cm3, conversation, grounding, preprocess, sources, video
from vlm.data.tokenizer import Tokenizer

EXTRA_TEXT_KEYS = ("caption_detailed", "question", "answer")

Config = Mapping[str, Any]  # config.data (an ml_collections.ConfigDict)


@dataclasses.dataclass
class ExampleState:
  """One example on its way through the ops.

  ex: the example being transformed (starts as the source's record); out: the model inputs written
  so far; rng: the shared stream [seed, 0, position]; question: the index of the drawn question
  (`question` op: -1 when the example has none; None when no op drew one).
  """

  ex: dict[str, Any]
  position: int
  seed: int
  out: dict[str, Any] = dataclasses.field(default_factory=dict)
  question: int | None = None
  rng: np.random.Generator = dataclasses.field(init=False)

  def __post_init__(self):
    # The 0 keeps single-process streams as they were when the key held the process index.
    self.rng = np.random.default_rng([self.seed, 0, self.position])

  def stream(self, k: int) -> np.random.Generator:
    """An op's own random stream [seed, k, position] (1: conversation, 2: CM3, 3: MixGen)."""
    return np.random.default_rng([self.seed, k, self.position])


class OtherExamples:
  """Random other examples of the split, decoded and through the image pp ops (MixGen, interleave)."""

  def __init__(self, source: Any, caption_key: str, max_pixels: int | None, image_ops: Sequence[preprocess.Op]):
    self.source, self.caption_key, self.max_pixels, self.image_ops = source, caption_key, max_pixels, image_ops

  def __call__(self, rng: np.random.Generator, n: int) -> list[dict]:
    """n examples drawn with rng (unreadable ones are drawn again, up to 100 * (n + 1) draws)."""
    out = []
    for _ in range(100 * (n + 1)):
      if len(out) == n:
        break
      i = int(rng.integers(len(self.source)))
      try:
        ex = sources.decode_record(self.source[i], self.caption_key, self.max_pixels)
        out.append(preprocess.apply_ops(self.image_ops, ex, rng))
      except sources.BadExample:
        continue
    if len(out) < n:
      raise ValueError("data.interleaved_images / data.mixgen: could not find enough readable examples")
    return out


@dataclasses.dataclass
class OpEnv:
  """What ops are built from beside config.data: the parsed image pp ops and their names, the
  tokenizer, the split's source, and the sampler of other examples over it."""

  image_ops: list[preprocess.Op]
  pp_names: list[str]
  tokenizer: Tokenizer
  source: Any
  others: OtherExamples


class ExampleOp:
  """A per-example op: `check(data)` validates its config keys, `from_config` builds it (None: off),
  `__call__(state)` transforms state.ex and / or writes model inputs into state.out."""

  name: ClassVar[str]

  @classmethod
  def check(cls, data: Config) -> None:
    """Raises ValueError naming the bad config key (nothing to check by default)."""

  @classmethod
  def from_config(cls, data: Config, env: OpEnv) -> ExampleOp | None:
    raise NotImplementedError

  def __call__(self, state: ExampleState) -> None:
    raise NotImplementedError

  def __repr__(self) -> str:
    return f"<example op {self.name}>"


_OPS: dict[str, type[ExampleOp]] = {}


def register(cls: type[ExampleOp]) -> type[ExampleOp]:
  """Registers an op class under cls.name; ops run in the order they are registered."""
  if cls.name in _OPS and _OPS[cls.name] is not cls:
    raise ValueError(f"example op {cls.name!r} is registered twice")
  _OPS[cls.name] = cls
  return cls


def known_ops() -> list[str]:
  """The registered op names, in the order they run."""
  return list(_OPS)


def get_op(name: str) -> type[ExampleOp]:
  """The op class registered as `name`."""
  if name not in _OPS:
    raise ValueError(f"unknown example op {name!r}; known: {', '.join(_OPS)}")
  return _OPS[name]


# ----------------------------------------------------------------- shared config readers


def _conversation(data: Config) -> Any:
  return data.get("conversation")


def _end_of_chunk(data: Config) -> str:
  return (_conversation(data) or {}).get("end_of_chunk") or ""


def uses_anyres(data: Config) -> bool:
  """Whether data.pp_train or data.pp_eval holds the pp op 'anyres' (call after they parse)."""
  return any("anyres" in preprocess.op_names(data[k]) for k in ("pp_train", "pp_eval") if k in data)


def _extra_text_keys(data: Config) -> tuple[str, ...]:
  return tuple(data.get("extra_text_keys", ()))


def _num_images(data: Config) -> int:
  return int(data.get("interleaved_images", 1) or 1)


def load_answer_vocab(vocab: Any) -> dict[str, int]:
  """data.answer_vocab (a list of answers, or a path to a file with one per line) -> {answer: index}."""
  if isinstance(vocab, str):
    try:
      with open(vocab, encoding="utf-8") as f:
        vocab = [line.strip() for line in f if line.strip()]
    except OSError as e:
      raise ValueError(f"data.answer_vocab: cannot read {vocab!r}: {e}") from None
  answers = [str(a) for a in vocab]
  if not answers:
    raise ValueError("data.answer_vocab is empty")
  dup = sorted(a for a, n in collections.Counter(answers).items() if n > 1)
  if dup:
    raise ValueError(f"data.answer_vocab: duplicate answers {dup[:5]}")
  return {a: i for i, a in enumerate(answers)}


class _Encoder:
  """Text -> int32 [length] ids with data.add_bos / data.add_eos (None: the tokenizer's default)."""

  def __init__(self, data: Config, tokenizer: Tokenizer):
    self.tok = tokenizer
    self.add_bos, self.add_eos = data.get("add_bos", False), data.get("add_eos", True)

  def __call__(self, text: str, length: int) -> np.ndarray:
    return self.tok.encode(text, length, self.add_bos, self.add_eos)


def _positive_int(data: Config, key: str) -> None:
  if key in data and not (isinstance(data[key], int) and data[key] > 0):
    raise ValueError(f"data.{key}: must be a positive int, got {data[key]!r}")


# ----------------------------------------------------------------- example ops, in the order they run


@register
class Decode(ExampleOp):
  """Record -> example ('image' uint8 [H, W, 3], str texts, label, seen, boxes, frames, or a
  'document'); raises sources.BadExample for what it cannot read (counted and skipped)."""

  name = "decode"

  def __init__(
    self,
    caption_key: str = "caption",
    max_pixels: int | None = sources.MAX_IMAGE_PIXELS,
    max_frames: int = video.MAX_VIDEO_FRAMES,
  ):
    self.caption_key, self.max_pixels, self.max_frames = caption_key, max_pixels, max_frames

  @classmethod
  def check(cls, data: Config) -> None:
    v = data.get("max_image_pixels")
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
      raise ValueError(f"data.max_image_pixels: must be a positive int or None, got {v!r}")
    _positive_int(data, "max_video_frames")

  @classmethod
  def from_config(cls, data: Config, env: OpEnv) -> Decode:
    return cls(
      data.get("caption_key", "caption"),
      data.get("max_image_pixels", sources.MAX_IMAGE_PIXELS),
      data.get("max_video_frames", video.MAX_VIDEO_FRAMES),
    )

  def __call__(self, state: ExampleState) -> None:
    state.ex = sources.decode_record(state.ex, self.caption_key, self.max_pixels, self.max_frames)


@register
class Pp(ExampleOp):
  """The image pp ops (vlm.data.preprocess: geometry, augmentation, value range) on a single-image
  example; a document is left to `document`."""

  name = "pp"

  def __init__(self, image_ops: Sequence[preprocess.Op]):
    self.image_ops = list(image_ops)

  @classmethod
  def check(cls, data: Config) -> None:
    for key in ("pp_train", "pp_eval"):
      if key in data:
        preprocess.parse_pp(data[key], where=f"data.{key}")

  @classmethod
  def from_config(cls, data: Config, env: OpEnv) -> Pp:
    return cls(env.image_ops)

  def __call__(self, state: ExampleState) -> None:
    if "document" not in state.ex:
      state.ex = preprocess.apply_ops(self.image_ops, state.ex, state.rng)


@register
class Document(ExampleOp):
  """A decoded document -> 'image' [max_images, H, W, 3] (each image through the pp ops; zeros after
  the last one, a longer document cut before its (max_images + 1)-th image) and 'image_context' (its
  paragraphs with '<image>' placeholders, a paragraph after an image closed by end_of_chunk if set)."""

  name = "document"

  def __init__(self, image_ops: Sequence[preprocess.Op], max_images: int, end_of_chunk: str = ""):
    self.image_ops, self.max_images, self.end_of_chunk = list(image_ops), max_images, end_of_chunk

  @classmethod
  def check(cls, data: Config) -> None:
    if int(data.get("max_images", 4)) < 1:
      raise ValueError(f"data.max_images: must be >= 1, got {data.max_images!r}")
    kind = str(data.source).split(":", 1)[0]
    documents = kind == "docs" or (kind == "embedded" and int((data.get("builder") or {}).get("documents", 0) or 0))
    m = data.get("interleaved_images", 1)  # (its own check is interleave's)
    if documents and (data.get("mixgen", 0.0) or (isinstance(m, int) and m > 1) or uses_anyres(data)):
      raise ValueError(
        "data.mixgen, data.interleaved_images > 1 and the pp op 'anyres' do not work with "
        "interleaved documents (data.source docs:, or data.builder.documents > 0)"
      )

  @classmethod
  def from_config(cls, data: Config, env: OpEnv) -> Document:
    return cls(env.image_ops, int(data.get("max_images", 4)), _end_of_chunk(data))

  def __call__(self, state: ExampleState) -> None:
    if "document" not in state.ex:
      return
    ex = state.ex
    images, parts = [], []
    eoc = self.end_of_chunk
    for kind, value in ex.pop("document"):
      if kind == "image":
        if len(images) == self.max_images:
          break
        images.append(preprocess.apply_ops(self.image_ops, {"image": value}, state.rng)["image"])
        parts.append(conversation.IMAGE)
      else:  # a paragraph after an image closes its chunk (Flamingo's <EOC>) when one is set
        parts.append(value + (eoc if images and eoc else " "))
    pad = [np.zeros_like(images[0])] * (self.max_images - len(images))
    state.ex = dict(ex, image=np.stack(images + pad), image_context="".join(parts))


@register
class MixGen(ExampleOp):
  """MixGen (Hao et al. 2023, "MixGen: A New Multi-Modal Data Augmentation", sec. 3), with probability
  data.mixgen: image (and frames) lam * own + (1 - lam) * other's with lam = 0.5 as in the paper, in
  float (rounded back to uint8 if the pp ops left uint8); caption "own other"; label, boxes and
  questions stay its own. Its own stream [seed, 3, position]."""

  name = "mixgen"

  def __init__(self, p: float, others: OtherExamples):
    self.p, self.others = p, others

  @classmethod
  def check(cls, data: Config) -> None:
    mixgen = data.get("mixgen", 0.0)
    if mixgen is not None and (
      isinstance(mixgen, bool) or not isinstance(mixgen, (int, float)) or not 0 <= mixgen <= 1
    ):
      raise ValueError(f"data.mixgen: must be a probability in [0, 1], got {mixgen!r}")
    if mixgen and uses_anyres(data):
      raise ValueError("data.mixgen does not work with the pp op 'anyres' (examples have their own tile grids)")

  @classmethod
  def from_config(cls, data: Config, env: OpEnv) -> MixGen | None:
    p = float(data.get("mixgen", 0.0) or 0.0)
    return cls(p, env.others) if p > 0 else None

  def __call__(self, state: ExampleState) -> None:
    rng = state.stream(3)
    if rng.random() >= self.p:
      return
    other = self.others(rng, 1)[0]
    lam = 0.5
    ex = dict(state.ex, caption=f"{state.ex['caption']} {other['caption']}")
    for key in ("image", "frames"):
      if key not in ex or key not in other:
        continue
      a, b = ex[key], other[key]
      if a.shape != b.shape:
        raise ValueError(
          f"data.mixgen: the pp ops must give every example's {key} the same shape "
          f"(e.g. end with resize), got {a.shape} and {b.shape}"
        )
      mixed = lam * a.astype(np.float32) + (1 - lam) * b.astype(np.float32)
      ex[key] = np.round(mixed).astype(np.uint8) if a.dtype == np.uint8 else mixed
    state.ex = ex


@register
class Grounding(ExampleOp):
  """Adds grounding question/answer pairs built from the boxes (vlm.data.grounding; after the pp ops,
  so the boxes are in the final image's pixels); data.grounding.only keeps only those."""

  name = "grounding"

  def __init__(self, tasks: Sequence[str], only: bool = False):
    self.tasks, self.only = tuple(tasks), bool(only)

  @classmethod
  def check(cls, data: Config) -> None:
    if data.get("grounding") is not None:
      grounding.check_tasks(tuple(data.grounding.get("tasks", grounding.GROUNDING_TASKS)))

  @classmethod
  def from_config(cls, data: Config, env: OpEnv) -> Grounding | None:
    g = data.get("grounding")
    if g is None:
      return None
    return cls(tuple(g.get("tasks", grounding.GROUNDING_TASKS)), g.get("only", False))

  def __call__(self, state: ExampleState) -> None:
    ex = state.ex
    gq, ga = grounding.grounding_pairs(ex, self.tasks)
    keep = not self.only
    state.ex = dict(
      ex,
      questions=(list(ex.get("questions", [])) if keep else []) + gq,
      answers=(list(ex.get("answers", [])) if keep else []) + ga,
    )


@register
class QuestionRegex(ExampleOp):
  """Keeps only the question/answer pairs whose question matches data.question_regex (re.search)."""

  name = "question_regex"

  def __init__(self, regex: str):
    self.regex = re.compile(regex)

  @classmethod
  def check(cls, data: Config) -> None:
    if data.get("question_regex"):
      try:
        re.compile(data.question_regex)
      except re.error as e:
        raise ValueError(f"data.question_regex: bad regex {data.question_regex!r}: {e}") from None

  @classmethod
  def from_config(cls, data: Config, env: OpEnv) -> QuestionRegex | None:
    regex = data.get("question_regex")
    return cls(regex) if regex else None

  def __call__(self, state: ExampleState) -> None:
    ex = state.ex
    pairs = [(q, a) for q, a in zip(ex.get("questions", []), ex.get("answers", [])) if self.regex.search(q)]
    state.ex = dict(ex, questions=[q for q, _ in pairs], answers=[a for _, a in pairs])


@register
class Interleave(ExampleOp):
  """An interleaved document of data.interleaved_images = M images around the example
  (conversation.interleave): M - 1 other random examples (drawn from the shared stream) join it,
  'image' becomes [M, H, W, 3], its questions ask about "the k-th image"."""

  name = "interleave"

  def __init__(self, num_images: int, others: OtherExamples, end_of_chunk: str = ""):
    self.num_images, self.others, self.end_of_chunk = num_images, others, end_of_chunk

  @classmethod
  def check(cls, data: Config) -> None:
    m = data.get("interleaved_images", 1)
    if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
      raise ValueError(f"data.interleaved_images: must be an int >= 1, got {m!r}")
    conv = _conversation(data)
    if (m or 1) > 1 and conv is not None:
      conversation.check_conversation_config(conv)  # its own errors first (tasks must be a tuple)
    if (m or 1) > 1 and (conv is None or tuple(conv.get("tasks", ())) != ("qa",)):
      raise ValueError(
        "data.interleaved_images > 1 needs data.conversation with tasks=('qa',) (the question "
        "names the image it is about)"
      )

  @classmethod
  def from_config(cls, data: Config, env: OpEnv) -> Interleave | None:
    m = _num_images(data)
    return cls(m, env.others, _end_of_chunk(data)) if m > 1 else None

  def __call__(self, state: ExampleState) -> None:
    others = self.others(state.rng, self.num_images - 1)
    state.ex = conversation.interleave(state.ex, others, state.rng, end_of_chunk=self.end_of_chunk)


@register
class FramesAsImages(ExampleOp):
  """data.frames_as_images: the clip's frames (after the pp ops, e.g. sample_frames) become the
  example's images [T, H, W, 3], and its image context one '<image>' per frame, each followed by that
  frame's subtitle when data.subtitles is set (MiniGPT4-Video's interleaving of frames and subtitles,
  Ataallah et al. 2024 sec. 3.1): the conversation's user turn opens with it, and a multi-image VLM
  (VisionLanguageModel with images [B, T, H, W, 3]; merge_tokens=4 as that paper) reads it."""

  name = "frames_as_images"

  def __init__(self, subtitles: bool):
    self.subtitles = subtitles

  @classmethod
  def check(cls, data: Config) -> None:
    for key in ("frames_as_images", "subtitles"):
      if not isinstance(data.get(key, False), bool):
        raise ValueError(f"data.{key}: True or False, got {data[key]!r}")
    if data.get("subtitles", False) and not data.get("frames_as_images", False):
      raise ValueError("data.subtitles: interleaves subtitles with the frames; needs data.frames_as_images=True")
    if data.get("frames_as_images", False) and _num_images(data) > 1:
      raise ValueError("data.frames_as_images: a clip's frames are its images; not with data.interleaved_images > 1")

  @classmethod
  def from_config(cls, data: Config, env: OpEnv) -> FramesAsImages | None:
    return cls(bool(data.get("subtitles", False))) if data.get("frames_as_images", False) else None

  def __call__(self, state: ExampleState) -> None:
    ex = state.ex
    frames = ex.get("frames")
    if frames is None or not len(frames):
      raise sources.BadExample("bad_clip", "data.frames_as_images: the example has no frames")
    subs = list(ex.get("subtitles") or []) if self.subtitles else []
    if self.subtitles and len(subs) != len(frames):
      raise sources.BadExample("bad_clip", f"{len(subs)} subtitles for {len(frames)} frames")
    parts = [conversation.IMAGE + (f"{subs[t]} " if subs and subs[t] else "") for t in range(len(frames))]
    state.ex = dict(ex, image=np.asarray(frames), image_context="".join(parts))


@register
class FloatImage(ExampleOp):
  """out 'image': the example's image(s) in float32 (uint8 pixels / 255, floats as the pp ops left them)."""

  name = "image"

  @classmethod
  def from_config(cls, data: Config, env: OpEnv) -> FloatImage:
    return cls()

  def __call__(self, state: ExampleState) -> None:
    image = state.ex["image"]
    state.out["image"] = image.astype(np.float32) / 255 if image.dtype == np.uint8 else image.astype(np.float32)


@register
class Text(ExampleOp):
  """out 'text': the caption (data.caption_key's text, after the text pp ops) as int32 [text_length]."""

  name = "text"

  def __init__(self, encode: _Encoder, length: int):
    self.encode, self.length = encode, length

  @classmethod
  def check(cls, data: Config) -> None:
    for key in _extra_text_keys(data):
      if key not in EXTRA_TEXT_KEYS:
        raise ValueError(f"data.extra_text_keys: unknown key {key!r}; known: {EXTRA_TEXT_KEYS}")
    _positive_int(data, "text_length")

  @classmethod
  def from_config(cls, data: Config, env: OpEnv) -> Text:
    return cls(_Encoder(data, env.tokenizer), int(data.get("text_length", 32)))

  def __call__(self, state: ExampleState) -> None:
    state.out["text"] = self.encode(state.ex["caption"], self.length)


@register
class Label(ExampleOp):
  """out 'label' int32 (the class, -1 without one) and 'seen' bool (not a held-out combination)."""

  name = "label"

  @classmethod
  def from_config(cls, data: Config, env: OpEnv) -> Label:
    return cls()

  def __call__(self, state: ExampleState) -> None:
    state.out["label"] = np.int32(state.ex["label"])
    state.out["seen"] = np.bool_(state.ex["seen"])


@register
class TextDetailed(ExampleOp):
  """out 'text_detailed': the detailed caption (the caption without one) as int32 [detailed_text_length]."""

  name = "text_detailed"

  def __init__(self, encode: _Encoder, length: int):
    self.encode, self.length = encode, length

  @classmethod
  def check(cls, data: Config) -> None:
    _positive_int(data, "detailed_text_length")

  @classmethod
  def from_config(cls, data: Config, env: OpEnv) -> TextDetailed | None:
    if "caption_detailed" not in _extra_text_keys(data):
      return None
    return cls(_Encoder(data, env.tokenizer), int(data.get("detailed_text_length", 64)))

  def __call__(self, state: ExampleState) -> None:
    ex = state.ex
    state.out["text_detailed"] = self.encode(ex.get("caption_detailed", ex["caption"]), self.length)


@register
class Question(ExampleOp):
  """Draws one of the example's questions (shared stream; state.question = its index, -1 without any)
  and writes out 'question', 'answer' int32 [text_length] (empty texts without a question)."""

  name = "question"

  def __init__(self, encode: _Encoder, length: int):
    self.encode, self.length = encode, length

  @classmethod
  def from_config(cls, data: Config, env: OpEnv) -> Question | None:
    extra = _extra_text_keys(data)
    if "question" not in extra and "answer" not in extra:
      return None
    return cls(_Encoder(data, env.tokenizer), int(data.get("text_length", 32)))

  def __call__(self, state: ExampleState) -> None:
    qs, ans = state.ex.get("questions", []), state.ex.get("answers", [])
    j = int(state.rng.integers(len(qs))) if qs else -1
    state.question = j
    state.out["question"] = self.encode(qs[j] if j >= 0 else "", self.length)
    state.out["answer"] = self.encode(ans[j] if j >= 0 else "", self.length)


@register
class AnswerLabel(ExampleOp):
  """out 'answer_label' int32: the drawn answer's index in data.answer_vocab (-1 if absent): VQA as
  classification. Needs 'question' in data.extra_text_keys."""

  name = "answer_label"

  def __init__(self, answers: Mapping[str, int]):
    self.answers = dict(answers)

  @classmethod
  def check(cls, data: Config) -> None:
    if data.get("answer_vocab") is not None:
      if "question" not in _extra_text_keys(data):
        raise ValueError("data.answer_vocab needs 'question' in data.extra_text_keys")
      load_answer_vocab(data.answer_vocab)

  @classmethod
  def from_config(cls, data: Config, env: OpEnv) -> AnswerLabel | None:
    vocab = data.get("answer_vocab")
    extra = _extra_text_keys(data)
    if vocab is None or ("question" not in extra and "answer" not in extra):
      return None
    return cls(load_answer_vocab(vocab))

  def __call__(self, state: ExampleState) -> None:
    j, ans = state.question, state.ex.get("answers", [])
    state.out["answer_label"] = np.int32(self.answers.get(ans[j], -1) if j is not None and j >= 0 else -1)


@register
class ImageLayout(ExampleOp):
  """out 'image_layout' int32 [4] (tile rows, cols, original height, width) that the pp op `anyres`
  set. anyres gives one image per example with its own token count: no interleaving, no packing."""

  name = "image_layout"

  @classmethod
  def check(cls, data: Config) -> None:
    pack = (_conversation(data) or {}).get("pack", 1)  # (its own check is the conversation's)
    if uses_anyres(data) and (_num_images(data) > 1 or (isinstance(pack, int) and pack > 1)):
      raise ValueError(
        "the pp op 'anyres' gives one image per example with its own token count: it does not "
        "work with data.interleaved_images > 1 or data.conversation.pack > 1"
      )

  @classmethod
  def from_config(cls, data: Config, env: OpEnv) -> ImageLayout | None:
    return cls() if "anyres" in env.pp_names else None

  def __call__(self, state: ExampleState) -> None:
    if "image_layout" in state.ex:
      state.out["image_layout"] = state.ex["image_layout"]


@register
class Conversation(ExampleOp):
  """out 'tokens', 'loss_mask' [length] (a conversation of a task drawn from data.conversation.tasks)
  and 'prompt', 'prompt_mask' [prompt_length] (+ 'instruction' ...): conversation.conversation_example,
  asking the question the `question` op drew. Its own stream [seed, 1, position]."""

  name = "conversation"

  def __init__(self, conv: Config, chat: conversation.ChatTokenizer):
    self.conv, self.chat = conv, chat

  @classmethod
  def check(cls, data: Config) -> None:
    if _conversation(data) is not None:
      conversation.check_conversation_config(data.conversation)

  @classmethod
  def from_config(cls, data: Config, env: OpEnv) -> Conversation | None:
    conv = _conversation(data)
    return cls(conv, conversation.chat_tokenizer_from_config(conv, env.tokenizer)) if conv else None

  def __call__(self, state: ExampleState) -> None:
    j = state.question
    state.out.update(
      conversation.conversation_example(
        state.ex, self.conv, self.chat, state.stream(1), j if j is not None and j >= 0 else None
      )
    )


@register
class CM3(ExampleOp):
  """CM3's causal-masked transform of out 'tokens' / 'loss_mask' (vlm.data.cm3: spans moved to the end
  after sentinels). Needs data.conversation tasks=('text',). Its own stream [seed, 2, position]."""

  name = "cm3"

  def __init__(self, cfg: Config, tokenizer: Tokenizer):
    self.cfg, self.tok = cfg, tokenizer

  @classmethod
  def check(cls, data: Config) -> None:
    if data.get("cm3"):
      conv = _conversation(data)
      if conv is None or tuple(conv.get("tasks", ())) != ("text",):
        raise ValueError(
          "data.cm3 needs data.conversation with tasks=('text',): it rearranges whole documents, every token trained"
        )
      cm3.check_cm3_config(data.cm3)

  @classmethod
  def from_config(cls, data: Config, env: OpEnv) -> CM3 | None:
    return cls(data.cm3, env.tokenizer) if data.get("cm3") and _conversation(data) else None

  def __call__(self, state: ExampleState) -> None:
    out = state.out
    out["tokens"], out["loss_mask"] = cm3.apply_cm3(
      out["tokens"],
      out["loss_mask"],
      self.cfg,
      state.stream(2),
      pad_id=self.tok.pad_id,
      bos_id=self.tok.bos_id,
      eos_id=self.tok.eos_id,
    )


@register
class Boxes(ExampleOp):
  """out 'boxes' float32 [max_boxes, 4] (pixels of the final image, zeros after the last) and
  'box_labels' int32 [max_boxes] (-1 after the last); more boxes than max_boxes are cut."""

  name = "boxes"

  def __init__(self, max_boxes: int):
    self.max_boxes = max_boxes

  @classmethod
  def check(cls, data: Config) -> None:
    _positive_int(data, "max_boxes")

  @classmethod
  def from_config(cls, data: Config, env: OpEnv) -> Boxes | None:
    return cls(int(data.get("max_boxes", 8))) if data.get("with_boxes", False) else None

  def __call__(self, state: ExampleState) -> None:
    ex, n = state.ex, self.max_boxes
    boxes = np.zeros((n, 4), np.float32)
    labels = np.full((n,), -1, np.int32)
    b = np.asarray(ex.get("boxes", np.zeros((0, 4))), np.float32)[:n]
    boxes[: len(b)] = b
    labels[: len(b)] = np.asarray(ex.get("box_labels", np.zeros(len(b))), np.int32)[: len(b)]
    state.out["boxes"], state.out["box_labels"] = boxes, labels


@register
class Frames(ExampleOp):
  """out 'frames' float32 [T, H, W, 3] (the image as one frame without frames; uint8 / 255) and
  'motion' int32 (the clip's direction of motion, -1 without one)."""

  name = "frames"

  @classmethod
  def from_config(cls, data: Config, env: OpEnv) -> Frames | None:
    return cls() if data.get("with_frames", False) else None

  def __call__(self, state: ExampleState) -> None:
    ex = state.ex
    frames = ex.get("frames", ex["image"][None])
    state.out["frames"] = frames.astype(np.float32) / 255 if frames.dtype == np.uint8 else frames.astype(np.float32)
    state.out["motion"] = np.int32(ex.get("motion", -1))


# ----------------------------------------------------------------- building and running


def check_ops(data: Config) -> None:
  """Every registered op's check of config.data (in op order); ValueError names the bad key."""
  for cls in _OPS.values():
    cls.check(data)


def make_ops(
  data: Config, pp: str | Sequence[str], *, tokenizer: Tokenizer, source: Any, where: str = "pp"
) -> list[ExampleOp]:
  """The ordered example ops that config.data turns on, with image pp spec `pp` (parsed here; `where`
  names it in errors), `tokenizer` for the texts and `source` (the split) for ops drawing other examples."""
  image_ops = preprocess.parse_pp(pp, where=where)
  others = OtherExamples(
    source, data.get("caption_key", "caption"), data.get("max_image_pixels", sources.MAX_IMAGE_PIXELS), image_ops
  )
  env = OpEnv(image_ops, preprocess.op_names(pp), tokenizer, source, others)
  return [op for op in (cls.from_config(data, env) for cls in _OPS.values()) if op is not None]


def op_names(ops: Sequence[ExampleOp]) -> list[str]:
  """The names of an op list, in order."""
  return [op.name for op in ops]


def run_ops(ops: Sequence[ExampleOp], record: dict, position: int, seed: int) -> dict[str, Any]:
  """A source record -> its model inputs (state.out) through `ops`; position is its place in the
  global stream (the random streams' key). sources.BadExample from an op propagates."""
  state = ExampleState(record, position, seed)
  for op in ops:
    op(state)
  return state.out
