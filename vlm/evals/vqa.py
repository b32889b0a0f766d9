"""Open-ended VQA by generation: exact-match accuracy of generated answers (VLMs on an LM)."""

import re
from typing import Any

import ml_collections
import numpy as np

from vlm import parallel
from vlm.data import conversation, get_tokenizer
from vlm.evals.base import EVALS, SplitData, batched_apply, jit_on_mesh
from vlm.models.registry import PredictFns, require


def normalize_answer(text: str) -> str:
  """Lower case, surrounding whitespace and a final full stop removed (VQA-style light normalisation)."""
  return text.strip().lower().rstrip(".").strip()


class GenerateAnswers(SplitData):
  """Greedy answers of a VLM on an LM (its predict function `generate(params, images, prompt, ...)`;
  `generate_guided` for contrastive region guidance) to left-padded prompts, batched on the mesh; the
  base of the generation evals."""

  def _setup(
    self,
    data: ml_collections.ConfigDict,
    rules: parallel.Rules,
    predict_fns: PredictFns,
    mesh,
    prefix: str,
    split: str,
    batch_size: int,
    max_examples: int | None,
    max_new_tokens: int,
  ) -> None:
    require(predict_fns, ("generate",), f"evals.{prefix}")
    self.predict_fns, self.mesh, self.prefix = predict_fns, mesh, prefix
    self.data_config = data
    self.split, self.batch_size, self.max_examples = split, batch_size, max_examples
    self.max_new_tokens = max_new_tokens
    self.rules = rules
    self._fns: dict[tuple[float, float] | None, Any] = {}

  def _generate_fn(self, crg: tuple[float, float] | None = None):
    """The jitted answer function; crg = (alpha, plausibility) decodes with contrastive region guidance."""
    if crg not in self._fns:
      tok = get_tokenizer(self.data_config)
      if crg is not None:
        require(self.predict_fns, ("generate_guided",), f"evals.{self.prefix}: contrastive region guidance")
      generate = self.predict_fns["generate" if crg is None else "generate_guided"]

      def fn(params, x):
        images, prompt, mask, extra = x
        kw = dict(mask=mask, max_new_tokens=self.max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id)
        if crg is not None:
          kw.update(crg_alpha=crg[0], crg_plausibility=crg[1])
        return generate(params, images, prompt, **extra, **kw).tokens

      self._fns[crg] = jit_on_mesh(fn, self.mesh, self.rules)
    return self._fns[crg]

  def answers(
    self,
    params: Any,
    images: np.ndarray,
    prompt: np.ndarray,
    mask: np.ndarray,
    instruction: np.ndarray | None = None,
    image_layout: np.ndarray | None = None,
    contrast_images: np.ndarray | None = None,
    crg_alpha: float = 1.0,
    crg_plausibility: float = 0.0,
    videos: np.ndarray | None = None,
  ) -> list[str]:
    """Greedy answers; instruction [N, L]: the image encoder's ('prompt_instruction' of the data);
    image_layout [N, 4]: AnyRes views' layout ('image_layout' of the data); contrast_images: decode
    with contrastive region guidance against them (the predict function generate_guided); videos
    [N, F, H, W, 3]: clips at the prompt's video placeholders (images may then be None)."""
    extra = {
      k: v
      for k, v in (
        ("instruction", instruction),
        ("image_layout", image_layout),
        ("contrast_images", contrast_images),
        ("videos", videos),
      )
      if v is not None
    }
    inputs = (images, prompt, mask, extra)
    fn = self._generate_fn(None if contrast_images is None else (float(crg_alpha), float(crg_plausibility)))
    tokens = batched_apply(fn, params, inputs, self.mesh, self.batch_size)
    tok = get_tokenizer(self.data_config)
    if not self.data_config.get("conversation"):
      return tok.decode_batch(tokens)
    chat = conversation.chat_tokenizer_from_config(self.data_config.conversation, tok)
    return [chat.decode(row) for row in tokens]  # special markers (e.g. <box>) as text


@EVALS.register("vqa_generate")
class VQAGenerate(GenerateAnswers):
  """Greedy answers to data.conversation's prompt (left-padded 'prompt' / 'prompt_mask': the question
  about the image, then the template's generation prefix) scored by exact match against 'answer'.

  Needs data.conversation and 'question', 'answer' in data.extra_text_keys (the prompt asks the
  same drawn question as 'answer' holds; with data.conversation.instruction_length, the question
  also goes to the image encoder as 'prompt_instruction'; AnyRes views come with 'image_layout';
  with data.conversation.video_tokens the prompt asks about the clip, 'frames', given as `videos`).
  The model has the predict function `generate` (VLMs on an LM: vision_lm, flamingo). Reports
  {prefix}/accuracy, and /accuracy_unseen for examples whose main-object combination is held out
  of training; keeps the last answers in `last_answers`. question_groups {name: regex}: also
  {prefix}/accuracy_<name> over the examples whose question matches (re.search), e.g. the video
  questions' kinds (configs/video_lm.py).
  """

  def __init__(
    self,
    *,
    data: ml_collections.ConfigDict,
    rules: parallel.Rules,
    predict_fns: PredictFns,
    mesh,
    prefix: str,
    split: str = "test",
    batch_size: int = 256,
    max_examples: int | None = None,
    max_new_tokens: int = 8,
    question_groups: dict[str, str] | None = None,
  ):
    if not data.get("conversation"):
      raise ValueError(f"evals.{prefix}: type 'vqa_generate' needs data.conversation")
    if not {"question", "answer"} <= set(data.get("extra_text_keys", ())):
      raise ValueError(f"evals.{prefix}: type 'vqa_generate' needs 'question' and 'answer' in data.extra_text_keys")
    self._setup(data, rules, predict_fns, mesh, prefix, split, batch_size, max_examples, max_new_tokens)
    self.last_answers: list[str] = []
    self.question_groups = {}
    for name, regex in dict(question_groups or {}).items():
      try:
        self.question_groups[str(name)] = re.compile(regex)
      except (re.error, TypeError) as e:
        raise ValueError(f"evals.{prefix}.question_groups.{name}: bad regex {regex!r}: {e}") from None

  def __call__(self, params) -> dict[str, float]:
    return self.score(params, self.data()[0])

  def score(self, params, arrays: dict[str, np.ndarray]) -> dict[str, float]:
    """The metrics on `arrays` (the split's arrays, self.data()[0], or a changed copy: e.g. another
    example's images, to measure what the answers owe to the image)."""
    tok = get_tokenizer(self.data_config)
    video = bool(int(self.data_config.conversation.get("video_tokens", 0) or 0))
    if video and "frames" not in arrays:
      raise ValueError(f"evals.{self.prefix}: data.conversation.video_tokens > 0 needs data.with_frames=True")
    self.last_answers = self.answers(
      params,
      None if video else arrays["image"],
      arrays["prompt"],
      arrays["prompt_mask"],
      arrays.get("prompt_instruction"),
      arrays.get("image_layout"),
      videos=arrays["frames"] if video else None,
    )
    refs = [normalize_answer(a) for a in tok.decode_batch(arrays["answer"])]
    hit = np.array([normalize_answer(a) == r for a, r in zip(self.last_answers, refs)], np.float64)
    out = {f"{self.prefix}/accuracy": float(hit.mean())}
    unseen = ~arrays["seen"].astype(bool)
    if unseen.any():
      out[f"{self.prefix}/accuracy_unseen"] = float(hit[unseen].mean())
    if self.question_groups:
      questions = tok.decode_batch(arrays["question"])
      for name, regex in self.question_groups.items():
        match = np.array([bool(regex.search(q)) for q in questions])
        if match.any():
          out[f"{self.prefix}/accuracy_{name}"] = float(hit[match].mean())
    return out
