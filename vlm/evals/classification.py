"""Top-1 of a classifier's logits over a split (e.g. VideoClassifier on the scenes' motion labels),
and the helpers it shares with the frozen-feature probe (vlm.evals.probe)."""

import ml_collections
import numpy as np

from vlm import parallel
from vlm.evals.base import EVALS, SplitData, batched_apply, jit_on_mesh
from vlm.models.registry import PredictFns, require


def data_config(data: ml_collections.ConfigDict, frames: bool) -> ml_collections.ConfigDict:
  """The run's data options, copied with with_frames=True where `frames` asks for clips they do not load."""
  if not frames or data.get("with_frames", False):
    return data
  data = ml_collections.ConfigDict(data.to_dict())
  data.with_frames = True
  return data


def top1_metrics(pred: np.ndarray, arrays: dict[str, np.ndarray], label_key: str, prefix: str) -> dict[str, float]:
  """{prefix}/top1 of pred [N] against arrays[label_key] [N] (negative labels skipped), and
  {prefix}/top1_seen, top1_unseen on seen / held-out attribute combinations where arrays has 'seen'."""
  labels = arrays[label_key]
  valid = labels >= 0
  correct = pred == labels
  out = {f"{prefix}/top1": float(correct[valid].mean()) if valid.any() else 0.0}
  if "seen" in arrays:
    seen = arrays["seen"].astype(bool)
    for name, mask in (("seen", seen & valid), ("unseen", ~seen & valid)):
      if mask.any():
        out[f"{prefix}/top1_{name}"] = float(correct[mask].mean())
  return out


@EVALS.register("classify")
class Classify(SplitData):
  """Top-1 of a classifier's logits against arrays[label_key] on `split`.

  input_key: one batch key or a tuple of keys passed in order; method: the predict function that
  returns the logits, e.g. 'vqa_logits' with input_key ('image', 'question') and label_key
  'answer_label' for VQA as answer classification; None: 'logits' (a classifier's own output).
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
    input_key: str | tuple[str, ...] = "frames",
    label_key: str = "motion",
    method: str | None = None,
    batch_size: int = 256,
    max_examples: int | None = None,
  ):
    self.prefix, self.mesh, self.split = prefix, mesh, split
    self.input_keys = (input_key,) if isinstance(input_key, str) else tuple(input_key)
    self.label_key = label_key
    self.batch_size, self.max_examples = batch_size, max_examples
    self.data_config = data_config(data, frames="frames" in self.input_keys)
    name = method or "logits"
    require(predict_fns, (name,), f"evals.{prefix}.method={method!r}")
    fn = predict_fns[name]
    self.logits = jit_on_mesh(lambda p, xs: fn(p, *xs), mesh, rules)

  def __call__(self, params) -> dict[str, float]:
    arrays, _ = self.data()
    missing = [k for k in (*self.input_keys, self.label_key) if k not in arrays]
    if missing:
      raise ValueError(f"evals.{self.prefix}: the {self.split} batches have no {missing} (have {sorted(arrays)})")
    inputs = tuple(arrays[k] for k in self.input_keys)
    logits = batched_apply(self.logits, params, inputs, self.mesh, self.batch_size)
    return top1_metrics(np.argmax(logits, axis=-1), arrays, self.label_key, self.prefix)
