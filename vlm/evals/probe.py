"""Frozen-feature attentional probe (CoCa, Yu et al. 2022, sec. 4.2).

CoCa evaluates its frozen image encoder by training a new attentional pooler and a linear
classifier on top of the encoder's tokens; the encoder itself is not updated. Here the
tokens are extracted once per call, then `AttentionalProbe` (vlm.models.video) is trained
on them with AdamW. Works for any model with the predict function image_features(params, images)
-> aux whose aux holds tokens [B, T, D] under `tokens_key`.
"""

from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax

from vlm import parallel
from vlm.data import load_split_numpy
from vlm.evals.base import EVALS, batched_apply, jit_on_mesh
from vlm.evals.classification import data_config, top1_metrics
from vlm.models.registry import PredictFns, require
from vlm.models.video import AttentionalProbe


@EVALS.register("probe")
class Probe:
  """Trains AttentionalProbe on frozen tokens of `train_split`; reports {prefix}/top1 on `test_split`.

  Tokens: image_features(params, images)[tokens_key] [N, T, D]. With frames=True each clip's
  frames [N, F, H, W, 3] are encoded one by one and the probe reads all F*T tokens with a
  learned temporal embedding per frame.
  Probe: AttentionalPooler(num_queries, num_heads) -> mean over queries -> LayerNorm ->
  Dense(num_classes); `steps` AdamW steps (cosine-decayed lr, weight decay on matrices) on
  minibatches of `batch_size` drawn epoch by epoch. Deterministic given `seed`.
  num_classes: default len(metadata['class_names']) for label_key 'label', len(metadata[label_key
  + 's']) where present (the scenes' 'motions'), else the largest training label + 1.
  Examples with a negative label are left out (the scenes mark 'no motion' with -1).
  Also reports top1_seen / top1_unseen where the split has 'seen'.
  """

  def __init__(
    self,
    *,
    data: ml_collections.ConfigDict,
    rules: parallel.Rules,
    predict_fns: PredictFns,
    mesh,
    prefix: str,
    train_split: str = "train",
    test_split: str = "test",
    train_examples: int | None = 2048,
    test_examples: int | None = None,
    label_key: str = "label",
    num_classes: int | None = None,
    steps: int = 300,
    batch_size: int = 128,
    lr: float = 1e-3,
    wd: float = 1e-4,
    num_queries: int = 1,
    num_heads: int = 4,
    tokens_key: str = "encoded",
    frames: bool = False,
    seed: int = 0,
  ):
    self.mesh, self.prefix = mesh, prefix
    self.splits = {"train": (train_split, train_examples), "test": (test_split, test_examples)}
    self.label_key, self.num_classes, self.frames = label_key, num_classes, frames
    self.steps, self.batch_size, self.seed = steps, batch_size, seed
    self.num_queries, self.num_heads = num_queries, num_heads
    self.tx = optax.adamw(
      optax.cosine_decay_schedule(lr, max(steps, 1)),
      weight_decay=wd,
      mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p),
    )
    self.data_config = data_config(data, frames)
    require(predict_fns, ("image_features",), f"evals.{prefix}")
    features = predict_fns["image_features"]
    self.encode = jit_on_mesh(
      lambda p, x: features(p, x)[tokens_key],
      mesh,
      rules,
    )
    self._data: dict[str, tuple[dict[str, np.ndarray], dict[str, Any]]] = {}
    self._init = self._step = self._logits = None

  def data(self, which: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, meta) of the 'train' or 'test' split, loaded once, examples with a label only."""
    if which not in self._data:
      split, n = self.splits[which]
      arrays, meta = load_split_numpy(self.data_config, split, max_examples=n)
      keep = arrays[self.label_key] >= 0
      self._data[which] = ({k: v[keep] for k, v in arrays.items()}, meta)
    return self._data[which]

  def features(self, params, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Frozen tokens [N, T, D], or [N, F, T, D] with frames (each frame encoded on its own)."""
    if not self.frames:
      return batched_apply(self.encode, params, arrays["image"], self.mesh, self.batch_size)
    clips = arrays["frames"]
    n, f = clips.shape[:2]
    tokens = batched_apply(self.encode, params, clips.reshape(n * f, *clips.shape[2:]), self.mesh, self.batch_size)
    return tokens.reshape(n, f, *tokens.shape[1:])

  def _build(self, labels: np.ndarray, meta: dict[str, Any]) -> None:
    """The probe's jitted init, train and predict steps (built once: their shapes do not change)."""
    num_classes = self.num_classes
    if num_classes is None:
      names = meta.get("class_names") if self.label_key == "label" else meta.get(f"{self.label_key}s")
      num_classes = len(names) if names else int(labels.max()) + 1
    probe = AttentionalProbe(num_classes, self.num_queries, self.num_heads, temporal_embedding=self.frames)

    def loss_fn(p, x, y):
      return optax.softmax_cross_entropy_with_integer_labels(probe.apply({"params": p}, x), y).mean()

    def step(p, opt_state, x, y):
      grads = jax.grad(loss_fn)(p, x, y)
      updates, opt_state = self.tx.update(grads, opt_state, p)
      return optax.apply_updates(p, updates), opt_state

    self._init = jax.jit(lambda key, x: nn.meta.unbox(probe.init(key, x)["params"]))
    self._step = jax.jit(step)
    self._logits = jax.jit(lambda p, x: probe.apply({"params": p}, x))

  def fit(self, x: np.ndarray, y: np.ndarray) -> Any:
    """Probe parameters after `steps` AdamW steps on features x [N, ...] and labels y [N]."""
    params = self._init(jax.random.key(self.seed), x[:1])
    opt_state = self.tx.init(params)
    rng = np.random.default_rng(self.seed)
    bs = min(self.batch_size, len(x))
    order, pos = rng.permutation(len(x)), 0
    for _ in range(self.steps):
      if pos + bs > len(order):  # a new epoch
        order, pos = rng.permutation(len(x)), 0
      idx = np.sort(order[pos : pos + bs])
      pos += bs
      params, opt_state = self._step(params, opt_state, x[idx], y[idx])
    return params

  def predict(self, params, x: np.ndarray) -> np.ndarray:
    """Predicted classes [N], in fixed-size (padded) batches so the predict step compiles once."""
    bs, out = self.batch_size, []
    for i in range(0, len(x), bs):
      chunk = x[i : i + bs]
      pad = bs - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
      out.append(np.argmax(np.asarray(self._logits(params, chunk)), axis=-1)[: bs - pad])
    return np.concatenate(out)

  def __call__(self, params) -> dict[str, float]:
    train, meta = self.data("train")
    test, _ = self.data("test")
    if self._init is None:
      self._build(train[self.label_key], meta)
    probe_params = self.fit(self.features(params, train), train[self.label_key])
    pred = self.predict(probe_params, self.features(params, test))
    return top1_metrics(pred, test, self.label_key, self.prefix)
