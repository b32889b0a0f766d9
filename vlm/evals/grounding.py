"""Grounding evaluations of VLMs on an LM: referring-expression boxes (IoU >= 0.5) and region
questions, the latter also with contrastive region guidance (CRG, Wan et al. 2024).

Both ask about every object of the split's images that has a unique referring phrase
(vlm.data.grounding.object_phrases), in the chat template of data.conversation (the image, then
the question; greedy answers), and report the main objects and the small corner distractors
apart as well (`_main`, `_distractor`).
"""

from typing import Any

import ml_collections
import numpy as np

from vlm import parallel
from vlm.data import conversation, get_tokenizer, grounding
from vlm.data.preprocess import eval_images
from vlm.evals.base import EVALS
from vlm.evals.vqa import GenerateAnswers, normalize_answer
from vlm.models.registry import PredictFns


class _Objects(GenerateAnswers):
  """Queries about the uniquely named objects of the split (images with data.pp_eval, boxes)."""

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
    max_new_tokens: int = 32,
  ):
    if not data.get("conversation"):
      raise ValueError(f"evals.{prefix}: grounding evaluations need data.conversation (the chat template)")
    self._setup(data, rules, predict_fns, mesh, prefix, split, batch_size, max_examples, max_new_tokens)
    self.data_config = ml_collections.ConfigDict(data.to_dict())
    self.data_config.with_boxes = True
    self.data_config.grounding = None  # the pipeline's own questions are not used here
    self.data_config.max_boxes = max(int(data.get("max_boxes", 8)), 8)
    self.last_answers: list[str] = []

  def objects(self) -> list[tuple[int, int, str, tuple[int, int, int, int], np.ndarray]]:
    """(example, box index, phrase, 0-1000 box, pixel box) of every uniquely named object."""
    arrays, _ = self.data()
    out = []
    for i, (img, boxes, labels) in enumerate(zip(arrays["image"], arrays["boxes"], arrays["box_labels"])):
      valid = labels >= 0
      ex = {"image": img, "boxes": boxes[valid], "box_labels": labels[valid]}
      h, w = img.shape[-3:-1]
      for k, phrase in enumerate(grounding.object_phrases(ex)):
        if phrase is not None:
          out.append((i, k, phrase, grounding.to_1000(boxes[valid][k], w, h), boxes[valid][k]))
    return out

  def prompts(self, questions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts [N, prompt_length] of the chat template: (system), the image, the question."""
    conv = self.data_config.conversation
    chat = conversation.chat_tokenizer_from_config(conv, get_tokenizer(self.data_config))
    system = conv.get("system")
    rows = [
      chat.pad(
        chat.encode_prompt(([("system", system)] if system else []) + [("user", conversation.IMAGE + q)]),
        None,
        int(conv.get("prompt_length", 48)),
        left=True,
        where="data.conversation.prompt_length",
      )
      for q in questions
    ]
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])

  @staticmethod
  def _split_scores(name: str, hits: np.ndarray, main: np.ndarray) -> dict[str, float]:
    out = {name: float(hits.mean()) if len(hits) else 0.0}
    for tag, sel in (("main", main), ("distractor", ~main)):
      if sel.any():
        out[f"{name}_{tag}"] = float(hits[sel].mean())
    return out


@EVALS.register("grounding")
class Grounding(_Objects):
  """Referring-expression comprehension: "where is the {phrase}?" -> the first `<box>(x1,y1),(x2,y2)</box>`
  of the answer (0-1000 coordinates). Reports {prefix}/iou50 (IoU >= 0.5 with the true box, the
  RefCOCO accuracy) and /miou (each also _main / _distractor), and /parsed (answers holding a
  well-formed box)."""

  def __call__(self, params) -> dict[str, float]:
    arrays, _ = self.data()
    objs = self.objects()
    prompt, mask = self.prompts([f"where is the {phrase}?" for _, _, phrase, _, _ in objs])
    images = arrays["image"][[o[0] for o in objs]]
    self.last_answers = self.answers(params, images, prompt, mask)
    ious, parsed = [], []
    for (_, _, _, truth, _), ans in zip(objs, self.last_answers):
      boxes = grounding.parse_boxes(ans)
      parsed.append(bool(boxes))
      ious.append(grounding.iou(boxes[0], truth) if boxes else 0.0)
    ious, main = np.asarray(ious), np.asarray([o[1] == 0 for o in objs])
    out = self._split_scores(f"{self.prefix}/iou50", ious >= 0.5, main)
    out.update(self._split_scores(f"{self.prefix}/miou", ious, main))
    out[f"{self.prefix}/parsed"] = float(np.mean(parsed)) if parsed else 0.0
    return out


@EVALS.register("region_qa")
class RegionQA(_Objects):
  """Region questions, "what colour / shape is the object in <box>..</box>?", exact match.

  crg_alpha > 0 also answers with contrastive region guidance (Wan et al. 2024): the contrast image
  is the image with the asked-about box filled black (data.pp_eval's value of a black pixel), the
  logits (1 + a) l(image) - a l(masked image), among the tokens whose plain probability is at least
  crg_plausibility times the top one's (0: all; decoding.guided_step_fn). Reports {prefix}/accuracy and, with CRG,
  /accuracy_crg (each also _main / _distractor); keeps the answers in last_answers / last_answers_crg.
  """

  def __init__(self, *, crg_alpha: float = 1.0, crg_plausibility: float = 0.0, **kw):
    super().__init__(**kw)
    self.crg_alpha = float(crg_alpha)
    self.crg_plausibility = float(crg_plausibility)
    self.last_answers_crg: list[str] = []
    self._questions: dict[str, Any] | None = None

  def black(self) -> np.ndarray:
    """A black pixel after data.pp_eval (e.g. -1 for value_range(-1, 1))."""
    return eval_images([np.zeros((64, 64, 3), np.uint8)], self.data_config.pp_eval)[0, 0, 0]

  def questions(self) -> dict[str, Any]:
    """Two questions (colour, shape) per named object: images [Q, H, W, 3], prompt / mask, the
    reference answers, whether each asks about a main object, and the asked box in pixels."""
    if self._questions is None:
      arrays, _ = self.data()
      questions, refs, main, rows, boxes = [], [], [], [], []
      for i, k, phrase, box, pixels in self.objects():
        colour, shape = phrase.split()[1:3]
        for kind, ref in (("colour", colour), ("shape", shape)):
          questions.append(f"what {kind} is the object in {grounding.box_text(box)}?")
          refs.append(ref), main.append(k == 0), rows.append(i), boxes.append(pixels)
      prompt, mask = self.prompts(questions)
      self._questions = dict(
        images=arrays["image"][rows], prompt=prompt, mask=mask, refs=refs, main=np.asarray(main), boxes=boxes
      )
    return self._questions

  def _score(self, answers: list[str], key: str) -> dict[str, float]:
    q = self.questions()
    hits = np.asarray([normalize_answer(a) == r for a, r in zip(answers, q["refs"])])
    return self._split_scores(f"{self.prefix}/{key}", hits, q["main"])

  def crg_scores(self, params, alpha: float, plausibility: float) -> dict[str, float]:
    """/accuracy_crg (and _main / _distractor) with CRG at (alpha, plausibility)."""
    q = self.questions()
    masked = q["images"].copy()
    black = self.black()
    for j, (x1, y1, x2, y2) in enumerate(q["boxes"]):
      masked[j, int(np.floor(y1)) : int(np.ceil(y2)), int(np.floor(x1)) : int(np.ceil(x2))] = black
    self.last_answers_crg = self.answers(
      params,
      q["images"],
      q["prompt"],
      q["mask"],
      contrast_images=masked,
      crg_alpha=alpha,
      crg_plausibility=plausibility,
    )
    return self._score(self.last_answers_crg, "accuracy_crg")

  def __call__(self, params) -> dict[str, float]:
    q = self.questions()
    self.last_answers = self.answers(params, q["images"], q["prompt"], q["mask"])
    out = self._score(self.last_answers, "accuracy")
    if self.crg_alpha > 0:
      out.update(self.crg_scores(params, self.crg_alpha, self.crg_plausibility))
    return out
