"""Conversations for VLMs on a language model: instruction format, chat templates, loss masks.

A conversation is a list of turns `(role, content)` with role in {'system', 'user', 'assistant'};
content may hold `<image>` placeholders. A chat template (a config block, `data.conversation.template`)
says how each role's turn is written; special markers in it (`<|user|>`, ...) are single token ids
given by `data.conversation.specials`, everything else goes through the SentencePiece tokenizer:

    template = dict(system="<|system|>{content}<|end|>", user="<|user|>{content}<|end|>",
                    assistant="<|assistant|>{content}<|end|>", generation_prefix="<|assistant|>")
    specials = {"<image>": 1000, "<|system|>": 1001, "<|user|>": 1002, "<|assistant|>": 1003, "<|end|>": 1}

`<image>` expands to `image_tokens` copies of its id (the connector's output length): the model
writes the image embeddings at exactly those positions (LLaVA's convention). An example whose
preprocessing set 'image_tokens' (the pp op `anyres`: LLaVA-NeXT's count depends on the image's
size) gets that many instead. With `image_row_break` (a special marker) and `image_rows` = R, the
placeholders come in R rows each followed by that marker (Fuyu: a `|NEWLINE|` token after every row
of patches), still image_tokens placeholders in all. `<video>` (a special of its own, e.g. 1006) expands
to `video_tokens` copies of its id: with video_tokens > 0 every user turn that would open with
`<image>` opens with `<video>` instead, and the model writes the clip's tokens there (video LMs:
VisionLanguageModel's video_token_id, configs/video_lm.py). Mapping `<|end|>` to
the tokenizer's EOS makes generation stop at the end of the assistant's turn.

Loss: only the assistant's content and its end marker carry loss (`loss_mask` = 1), as in
LLaVA / Vicuna instruction tuning; the template's role prefix does not. A 'text' task (LM
pretraining on plain documents) puts loss on every token.

Tasks built from an embedded-dataset example (`build_turns`):
    caption   user: <image> + a brief-description instruction   assistant: the short caption
              (LLaVA stage 1, feature alignment: sec. 4.1 of Liu et al. 2023)
    detailed  user: <image> + a describe-in-detail instruction  assistant: the detailed caption
    qa        user: <image> + question 1, assistant: answer 1, then up to max_turns - 1 more
              question/answer turns without image (LLaVA stage 2, multi-turn instruction tuning)
    text      a plain document (detailed caption, then the question/answer pairs) with no
              template and no image: the language model's pretraining text.
    document  an interleaved image-text document (data.max_images; its 'image_context': paragraphs
              and `<image>` placeholders) as one text with no template: loss on every text token,
              none on the placeholders (OBELICS / Flamingo pretraining on web documents).

Prompt tuning (Lester et al. 2021): `data.conversation.soft_prompts` = P puts P `<|soft_prompt|>`
ids after BOS; VisionLanguageModel(num_soft_prompts=P) writes its learned vectors there, and
`config.trainable = ('soft_prompt',)` trains only them (see configs/llava_base.py).

Instructions for the image encoder (`data.conversation.instruction_length` = L > 0): every
example also gets 'instruction' [L] (the text of the user turn that holds the image, without
the placeholder: BOS + SentencePiece ids, pad_id padded, truncated to L) and, beside its prompt,
'prompt_instruction' [L] (the prompt's question). vlm.objectives.lm and the vqa_generate eval pass
them to the model, whose instruction-aware Q-Former reads them (vlm.models.vision_lm; BLIP-2
sec. 4.3, InstructBLIP). Not with packing.

Packing (`data.conversation.pack` = k > 1, training split only; `pack_examples`): each batch row
holds k consecutive examples' unpadded conversations back to back, with 'segment_ids' (example j
of the row is segment j + 1, 0 = padding) for block-diagonal attention and per-segment positions
(vlm.models.decoder). An example that does not fit in the remaining room is truncated, unless that
would cut image placeholders: then none of its tokens go in (`packed_dropped`, its image becomes a
surplus image the model ignores). Every other key becomes per example [rows, k, ...]. `length`
is the packed row's: raise it with k (at the unpacked length most rows would cut their last example).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vlm.data.tokenizer import Tokenizer

IMAGE = "<image>"
VIDEO = "<video>"
SOFT_PROMPT = "<|soft_prompt|>"
TASKS = ("caption", "detailed", "qa", "text", "document")
BRIEF_INSTRUCTIONS = (
  "describe the image briefly.",
  "give a short description of the image.",
  "what is in this picture?",
)
DETAILED_INSTRUCTIONS = ("describe the image in detail.", "give a detailed description of the image.")
DEFAULT_TEMPLATE = {
  "system": "<|system|>{content}<|end|>",
  "user": "<|user|>{content}<|end|>",
  "assistant": "<|assistant|>{content}<|end|>",
  "generation_prefix": "<|assistant|>",
}
DEFAULT_SPECIALS = {
  "<image>": 1000,
  "<|system|>": 1001,
  "<|user|>": 1002,
  "<|assistant|>": 1003,
  "<|soft_prompt|>": 1004,
  "<|end|>": 1,
}

Turn = tuple[str, str]


def build_turns(
  ex: Mapping[str, Any],
  task: str,
  rng: np.random.Generator,
  *,
  max_turns: int = 3,
  question_index: int | None = None,
  system: str | None = None,
  instructions: Mapping[str, Sequence[str]] | None = None,
  question_format: str = "{question}",
) -> list[Turn]:
  """One conversation of `task` about example `ex` (keys caption, caption_detailed, questions,
  answers). question_index fixes the first question (the eval's drawn question).

  instructions: per task ('caption', 'detailed') the instructions to draw from (default
  BRIEF_INSTRUCTIONS / DETAILED_INSTRUCTIONS); question_format: how a question is written in the
  user's turn (Monkey's VQA prompt: '{question} Answer:')."""
  if task not in TASKS:
    raise ValueError(f"data.conversation.tasks: unknown task {task!r}; known: {TASKS}")
  qs, ans = list(ex.get("questions", [])), list(ex.get("answers", []))
  detailed = ex.get("caption_detailed") or ex["caption"]
  if task == "text":
    return [("text", ". ".join([detailed, *(f"{q} {a}" for q, a in zip(qs, ans))]))]
  if task == "document":
    if not ex.get("image_context"):
      raise ValueError(
        "data.conversation: task 'document' needs interleaved documents "
        "(records with 'texts' and 'images'; see data.max_images)"
      )
    return [("text", ex["image_context"])]
  turns: list[Turn] = [("system", system)] if system else []
  instructions = instructions or {}
  images = ex.get("image_context") or IMAGE  # an interleaved document before the question (interleave)
  if task == "caption":
    options = tuple(instructions.get("caption", BRIEF_INSTRUCTIONS))
    instruction = options[int(rng.integers(len(options)))]
    return turns + [("user", f"{images}{instruction}"), ("assistant", ex["caption"])]
  if task == "detailed":
    options = tuple(instructions.get("detailed", DETAILED_INSTRUCTIONS))
    instruction = options[int(rng.integers(len(options)))]
    return turns + [("user", f"{images}{instruction}"), ("assistant", detailed)]
  if not qs:
    raise ValueError("data.conversation: task 'qa' needs questions; this example has none")
  first = int(rng.integers(len(qs))) if question_index is None else question_index
  rest = [i for i in rng.permutation(len(qs)).tolist() if i != first][: max(max_turns - 1, 0)]
  for k, i in enumerate([first, *rest]):
    turns += [("user", (images if k == 0 else "") + question_format.format(question=qs[i])), ("assistant", ans[i])]
  return turns


class ChatTokenizer:
  """Turns -> (tokens, loss_mask) with a chat template and single-id special markers."""

  def __init__(
    self,
    tokenizer: Tokenizer,
    template: Mapping[str, str] | None = None,
    specials: Mapping[str, int] | None = None,
    image_tokens: int = 1,
    add_bos: bool = True,
    soft_prompts: int = 0,
    image_row_break: str | None = None,
    image_rows: int = 1,
    video_tokens: int = 0,
  ):
    self.tok = tokenizer
    self.template = dict(DEFAULT_TEMPLATE if template is None else template)
    self.specials = {str(k): int(v) for k, v in (DEFAULT_SPECIALS if specials is None else specials).items()}
    for role in ("system", "user", "assistant"):
      if "{content}" not in self.template.get(role, ""):
        raise ValueError(
          f"data.conversation.template.{role} must contain '{{content}}', got {self.template.get(role)!r}"
        )
    if IMAGE not in self.specials:
      raise ValueError(f"data.conversation.specials needs an id for {IMAGE!r}")
    self.image_id = self.specials[IMAGE]
    self.image_tokens = int(image_tokens)
    self.video_tokens = int(video_tokens)
    self.video_id = self.specials.get(VIDEO)
    if self.video_tokens and self.video_id is None:
      raise ValueError(f"data.conversation.video_tokens needs an id for {VIDEO!r} in data.conversation.specials")
    self.image_rows = int(image_rows)
    self.row_break = None
    if image_row_break:
      if image_row_break not in self.specials:
        raise ValueError(
          f"data.conversation.image_row_break {image_row_break!r} must be one of "
          f"data.conversation.specials, got {sorted(self.specials)}"
        )
      if self.image_rows < 1 or self.image_tokens % self.image_rows:
        raise ValueError(
          f"data.conversation.image_rows={image_rows} must divide image_tokens="
          f"{self.image_tokens} (one row of patches per row break)"
        )
      self.row_break = self.specials[image_row_break]
    self.add_bos = add_bos
    self.soft_prompts = int(soft_prompts)
    if self.soft_prompts and SOFT_PROMPT not in self.specials:
      raise ValueError(f"data.conversation.soft_prompts needs an id for {SOFT_PROMPT!r} in data.conversation.specials")
    names = sorted(self.specials, key=len, reverse=True)
    self._split = re.compile("(" + "|".join(re.escape(n) for n in names) + ")")

  def with_image_tokens(self, image_tokens: int) -> "ChatTokenizer":
    """A copy whose `<image>` expands to image_tokens ids (an example whose image gives its own
    count: LLaVA-NeXT AnyRes, the pp op `anyres`)."""
    chat = copy.copy(self)
    chat.image_tokens = int(image_tokens)
    return chat

  def encode_text(self, text: str) -> list[int]:
    """Text with special markers -> ids (`<image>` expanded to image_tokens ids, `<video>` to video_tokens)."""
    out: list[int] = []
    for piece in self._split.split(text):
      if not piece:
        continue
      if piece == IMAGE:
        out += self._image_ids()
      elif piece == VIDEO and self.video_tokens:
        out += [self.video_id] * self.video_tokens
      elif piece in self.specials:
        out += [self.specials[piece]]
      else:
        out += self.tok.encode(piece, None, add_bos=False, add_eos=False).tolist()
    return out

  def _image_ids(self) -> list[int]:
    """What one `<image>` becomes: image_tokens placeholders, in rows closed by the row break if set."""
    if self.row_break is None:
      return [self.image_id] * self.image_tokens
    row = [self.image_id] * (self.image_tokens // self.image_rows) + [self.row_break]
    return row * self.image_rows

  def _prefix(self) -> tuple[list[int], list[int]]:
    """BOS, then `soft_prompts` placeholders for prompt tuning's learned vectors (no loss)."""
    ids = [self.tok.bos_id] if self.add_bos and self.tok.bos_id >= 0 else []
    if self.soft_prompts:  # a template without the marker has no prompt tuning: not looked up
      ids += [self.specials[SOFT_PROMPT]] * self.soft_prompts
    return ids, [0] * len(ids)

  def encode(self, turns: Sequence[Turn]) -> tuple[list[int], list[int]]:
    """Whole conversation -> (ids, loss) lists; loss marks the assistant's content + end marker."""
    ids, loss = self._prefix()
    for role, content in turns:
      if role == "text":  # loss on every token but image placeholders (inputs, never targets)
        piece = self.encode_text(content) + [self.tok.eos_id]
        ids += piece
        loss += [int(i not in (self.image_id, self.row_break, self.video_id)) for i in piece]
        continue
      head, _, tail = self.template[role].partition("{content}")
      for part, carries in ((head, False), (content, role == "assistant"), (tail, role == "assistant")):
        piece = self.encode_text(part)
        ids += piece
        loss += [int(carries)] * len(piece)
    return ids, loss

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Ids -> text up to the first EOS, with special-marker ids written back as their markers
    (e.g. Qwen-VL's `<box>` as a single id); text between them through the tokenizer."""
    names = {v: k for k, v in self.specials.items() if v != self.tok.eos_id}
    parts: list[str] = []
    run: list[int] = []
    for i in np.asarray(ids).reshape(-1).tolist():
      if i == self.tok.eos_id:
        break
      if i in names:
        parts += [self.tok.decode(run), names[i]]
        run = []
      else:
        run.append(i)
    return "".join(parts + [self.tok.decode(run)])

  def encode_prompt(self, turns: Sequence[Turn]) -> list[int]:
    """Turns up to a user turn, then the generation prefix: what the model answers after."""
    ids, _ = self.encode(turns)
    return ids + self.encode_text(self.template.get("generation_prefix", ""))

  def pad(
    self,
    ids: list[int],
    loss: list[int] | None,
    length: int,
    *,
    left: bool = False,
    where: str = "data.conversation.length",
  ) -> tuple[np.ndarray, np.ndarray]:
    """Pads (right, or left for prompts) to `length`. Too long: a prompt raises naming `where`; a
    training conversation is truncated on the right unless that would cut an image's placeholders."""
    loss = [1] * len(ids) if loss is None else loss
    if len(ids) > length:
      if left:
        raise ValueError(f"{where}={length} is shorter than a prompt of {len(ids)} tokens; raise it")
      cut = ids[length:]
      what = None
      if self.image_id in cut:
        what = f"an image's {self.image_tokens}"
      elif self.video_tokens and self.video_id in cut:
        what = f"a video's {self.video_tokens}"
      if what:
        raise ValueError(
          f"{where}={length} cuts {what} placeholder tokens (the conversation has {len(ids)} tokens); raise it"
        )
      ids, loss = ids[:length], loss[:length]
    n = length - len(ids)
    pad = [self.tok.pad_id] * n
    if left:
      return np.asarray(pad + ids, np.int32), np.asarray([0] * n + [1] * len(ids), np.int32)
    return np.asarray(ids + pad, np.int32), np.asarray(loss + [0] * n, np.int32)


def chat_tokenizer_from_config(conv: Mapping[str, Any], tokenizer: Tokenizer) -> ChatTokenizer:
  """The ChatTokenizer that `data.conversation` describes."""
  return ChatTokenizer(
    tokenizer,
    conv.get("template"),
    conv.get("specials"),
    int(conv.get("image_tokens", 1)),
    bool(conv.get("add_bos", True)),
    int(conv.get("soft_prompts", 0)),
    conv.get("image_row_break"),
    int(conv.get("image_rows", 1) or 1),
    int(conv.get("video_tokens", 0) or 0),
  )


def check_conversation_config(conv: Mapping[str, Any]) -> None:
  """Validates data.conversation; ValueError names the bad key."""
  tasks = conv.get("tasks", ("qa",))
  if isinstance(tasks, str) or not tasks:
    raise ValueError(f"data.conversation.tasks: a non-empty tuple of {TASKS}, got {tasks!r}")
  for t in tasks:
    if t not in TASKS:
      raise ValueError(f"data.conversation.tasks: unknown task {t!r}; known: {TASKS}")
  soft = conv.get("soft_prompts", 0)
  if isinstance(soft, bool) or not isinstance(soft, int) or soft < 0:
    raise ValueError(f"data.conversation.soft_prompts: must be an int >= 0, got {soft!r}")
  for key in ("length", "prompt_length", "image_tokens", "image_rows", "max_turns", "pack"):
    if key in conv and not (isinstance(conv[key], int) and conv[key] > 0):
      raise ValueError(f"data.conversation.{key}: must be a positive int, got {conv[key]!r}")
  vt = conv.get("video_tokens", 0)
  if isinstance(vt, bool) or not isinstance(vt, int) or vt < 0:
    raise ValueError(f"data.conversation.video_tokens: must be an int >= 0, got {vt!r}")
  if vt and VIDEO not in (conv.get("specials") or DEFAULT_SPECIALS):
    raise ValueError(f"data.conversation.video_tokens needs an id for {VIDEO!r} in data.conversation.specials")
  qformat = conv.get("question_format") or "{question}"
  if "{question}" not in qformat:
    raise ValueError(f"data.conversation.question_format must contain '{{question}}', got {qformat!r}")
  for task, options in dict(conv.get("instructions") or {}).items():
    if task not in ("caption", "detailed") or isinstance(options, str) or not options:
      raise ValueError(
        f"data.conversation.instructions.{task}: a non-empty tuple of instructions for "
        f"task 'caption' or 'detailed', got {options!r}"
      )
  ilen = conv.get("instruction_length", 0)
  if isinstance(ilen, bool) or not isinstance(ilen, int) or ilen < 0:
    raise ValueError(f"data.conversation.instruction_length: must be an int >= 0, got {ilen!r}")
  if ilen and conv.get("pack", 1) > 1:
    raise ValueError(
      "data.conversation.instruction_length > 0 does not work with data.conversation.pack > 1 "
      "(a packed row would need one instruction per example); set one of them off"
    )
  eoc = conv.get("end_of_chunk")
  specials = conv.get("specials") or DEFAULT_SPECIALS
  if eoc and eoc not in specials:
    raise ValueError(
      f"data.conversation.end_of_chunk {eoc!r} must be one of data.conversation.specials "
      f"(a single-token marker), got specials {sorted(specials)}"
    )
  weights = conv.get("task_weights")
  if weights is not None and (len(weights) != len(tasks) or min(weights) < 0 or sum(weights) <= 0):
    raise ValueError(f"data.conversation.task_weights: {len(tasks)} non-negative weights, got {weights!r}")


def conversation_example(
  ex: Mapping[str, Any],
  conv: Mapping[str, Any],
  chat: ChatTokenizer,
  rng: np.random.Generator,
  question_index: int | None,
) -> dict[str, np.ndarray]:
  """The model inputs of one example: 'tokens', 'loss_mask' [length] (a training conversation of a
  task drawn from conv.tasks) and 'prompt', 'prompt_mask' [prompt_length] (left-padded: system +
  the drawn question about the image + generation prefix; the eval generates from it). With
  conv.video_tokens = N > 0 the user's turn opens with `<video>` (N placeholders of its special id)
  instead of `<image>`: the model reads the clip (data.with_frames' 'frames') there."""
  if int(conv.get("video_tokens", 0) or 0):  # the clip (data.with_frames' 'frames') opens the user's turn
    ex = dict(ex, image_context=VIDEO)
  tasks = tuple(conv.get("tasks", ("qa",)))
  weights = conv.get("task_weights")
  p = None if weights is None else np.asarray(weights, np.float64) / np.sum(weights)
  task = tasks[int(rng.choice(len(tasks), p=p))]
  system = conv.get("system")
  qformat = conv.get("question_format") or "{question}"
  turns = build_turns(
    ex,
    task,
    rng,
    max_turns=int(conv.get("max_turns", 3)),
    question_index=question_index,
    system=system,
    instructions=conv.get("instructions"),
    question_format=qformat,
  )
  if not conv.get("with_image", True):  # text-only data, e.g. the language model's pretraining
    turns = [(role, content.replace(IMAGE, "")) for role, content in turns]
  if "image_tokens" in ex:  # this example's own placeholder count (pp op `anyres`)
    chat = chat.with_image_tokens(ex["image_tokens"])
  ids, loss = chat.encode(turns)
  tokens, loss_mask = chat.pad(ids, loss, int(conv.get("length", 64)))
  out = {"tokens": tokens, "loss_mask": loss_mask}
  ilen = int(conv.get("instruction_length", 0))
  if ilen:
    out["instruction"] = instruction_tokens(turns, chat.tok, ilen)
  if ex.get("questions"):
    j = 0 if question_index is None else question_index
    prompt_turns = ([("system", system)] if system else []) + [
      ("user", (ex.get("image_context") or IMAGE) + qformat.format(question=ex["questions"][j]))
    ]
    out["prompt"], out["prompt_mask"] = chat.pad(
      chat.encode_prompt(prompt_turns),
      None,
      int(conv.get("prompt_length", 48)),
      left=True,
      where="data.conversation.prompt_length",
    )
    if ilen:
      out["prompt_instruction"] = instruction_tokens(prompt_turns, chat.tok, ilen)
  return out


ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")


def about_image(question: str, k: int) -> str:
  """'what colour is the star?' -> 'what colour is the star in the second image?' (k = 1)."""
  return f"{question.rstrip('?').rstrip()} in the {ORDINALS[k]} image?"


def interleave(
  ex: Mapping[str, Any], others: Sequence[Mapping[str, Any]], rng: np.random.Generator, end_of_chunk: str = ""
) -> dict:
  """An interleaved image-text document (Flamingo, Alayrac et al. 2022, sec. 2.3) around example ex.

  ex's image goes at a drawn position k among the M = 1 + len(others) images; 'image' becomes
  [M, H, W, 3]; 'image_context' is '<image>caption. ' for every image but the last, then '<image>'
  (what the user turn holds before the question, build_turns); with `end_of_chunk` (a special
  marker, Flamingo's <EOC> / OpenFlamingo's '<|endofchunk|>') each caption chunk ends with it
  instead: '<image>caption.<|endofchunk|><image>...'; ex's questions become "... in the
  k-th image?" (its answers unchanged). Text after an image sees that image (Flamingo's masking),
  so a question about an earlier image must be answered from the document's text.
  """
  m = 1 + len(others)
  if m > len(ORDINALS):
    raise ValueError(f"data.interleaved_images: at most {len(ORDINALS)} images, got {m}")
  k = int(rng.integers(m))
  order = [*others[:k], ex, *others[k:]]
  chunk_end = end_of_chunk or " "
  context = "".join(IMAGE + (f"{o['caption']}.{chunk_end}" if p < m - 1 else "") for p, o in enumerate(order))
  questions = [about_image(q, k) for q in ex.get("questions", [])]
  return dict(
    ex,
    image=np.stack([np.asarray(o["image"]) for o in order]),
    image_context=context,
    questions=questions,
    image_position=k,
  )


def instruction_tokens(turns: Sequence[Turn], tokenizer: Tokenizer, length: int) -> np.ndarray:
  """[length] ids of the first user turn holding `<image>`, the placeholder removed (BOS + text,
  pad_id padded, truncated): the image encoder's instruction. No such turn: all padding."""
  for role, content in turns:
    if role == "user" and IMAGE in content:
      return tokenizer.encode(content.replace(IMAGE, "").strip(), length, add_bos=True, add_eos=False)
  return np.full((length,), tokenizer.pad_id, np.int32)


PACKED_KEYS = ("tokens", "loss_mask", "segment_ids")  # per row [length]; every other key per example


def pack_examples(examples: Sequence[Mapping[str, Any]], length: int, pad_id: int, image_id: int) -> dict[str, Any]:
  """k examples (conversation_example outputs plus the pipeline's other keys) -> one packed row.

  Each example's unpadded conversation (its 'tokens' / 'loss_mask' up to the last non-pad token)
  is appended in order to a row of `length` tokens:
      tokens, loss_mask   [length]  the examples' tokens and loss masks, unchanged, then padding
                                    (pad_id, loss 0)
      segment_ids         [length]  int32, j + 1 on example j's tokens, 0 on padding
  An example longer than the room left is truncated on the right (counted in packed_truncated),
  unless an image placeholder (image_id) lies in the cut part: then the example is left out of
  the row entirely (no segment j + 1; counted in packed_dropped) and later examples still get
  the room. The first token of every segment keeps its loss mask (the BOS's is 0);
  vlm.objectives.lm never trains a token from the previous segment.

  Every other key is stacked per example, [k, ...], in example order (label, seen, text,
  question, answer, prompt, prompt_mask, ...), except 'image': [k, H, W, 3] ordered as the
  images are used, i.e. first the images of the examples whose placeholders are in the row, in
  row order (the model fills placeholder runs with the row's images in order), then the others
  (dropped or image-free examples: surplus images the model leaves unused). Without absent or
  image-free examples that is example order.

  Also returns 'packed_dropped' and 'packed_truncated' (ints: counts for this row; the pipeline
  pops them into its stats). An example with no tokens at all (all padding) is neither.
  """
  if not examples:
    raise ValueError("pack_examples: no examples")
  tokens = np.full((length,), pad_id, np.int32)
  loss_mask = np.zeros((length,), np.int32)
  segment_ids = np.zeros((length,), np.int32)
  pos = dropped = truncated = 0
  with_image: list[int] = []
  for j, ex in enumerate(examples):
    ids = np.asarray(ex["tokens"]).reshape(-1)
    loss = np.asarray(ex["loss_mask"]).reshape(-1)
    real = np.flatnonzero(ids != pad_id)
    n = int(real[-1]) + 1 if real.size else 0
    if n == 0:
      continue
    ids, loss = ids[:n], loss[:n]
    room = length - pos
    if n > room:
      if room == 0 or np.any(ids[room:] == image_id):
        dropped += 1
        continue
      ids, loss = ids[:room], loss[:room]
      truncated += 1
      n = room
    tokens[pos : pos + n] = ids
    loss_mask[pos : pos + n] = loss
    segment_ids[pos : pos + n] = j + 1
    pos += n
    if np.any(ids == image_id):
      with_image.append(j)
  out: dict[str, Any] = {"tokens": tokens, "loss_mask": loss_mask, "segment_ids": segment_ids}
  for key in examples[0]:
    if key in PACKED_KEYS:
      continue
    values = [np.asarray(ex[key]) for ex in examples]
    if key == "image":
      order = with_image + [j for j in range(len(examples)) if j not in with_image]
      values = [values[j] for j in order]
    out[key] = np.stack(values)
  out["packed_dropped"], out["packed_truncated"] = dropped, truncated
  return out
