r"""Curates a data source into a new ArrayRecord dataset, with a report.

    python -m vlm.curate --config=configs/curate.py:demo --workdir=/tmp/curate_demo

runs `config.steps` in order on `config.split` of `config.data` (any source the trainer reads),
each on the survivors of the ones before:

  heuristic   caption length, junk rules, image size / aspect ratio (vlm.curation.filters)
  clip_score  a trained contrastive workdir's image-text score; keep_fraction of the survivors
              (ranked) or those with score >= threshold (DataComp's CLIP-score filter)
  dedup       near-duplicate clusters by embedding cosine >= threshold, approximate nearest
              neighbours by LSH over the whole set (vlm.curation.dedup); embedding 'model' (the
              clip_score model's image embeddings) or 'pixels' (16x16 thumbnails); in each cluster
              the member with the highest CLIP-score (else the first) survives
  balance     MetaCLIP concept balancing: cap ~max_per_concept examples per concept found in captions
  recaption   synthetic captions from a captioning workdir, written to `field` (replacing or added)

Model stages run in batches sharded over the model's mesh. Every stage computes its per-example
results in chunks saved under `<workdir>/cache/` as they finish, behind a progress bar; run the
same command again after an interruption and finished chunks are loaded, not recomputed. The
result is `tfds:vlm_curated/<output.name>` under `output.data_dir` (the other splits in
`output.copy_splits` copied unchanged) and `<workdir>/report.json` (counts per stage and rule,
score quantiles, duplicate clusters, concept counts; for the embedded dataset built with noise,
how many injected shuffled pairs and duplicates each stage removed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from vlm.curation import dedup, filters, store
from vlm.data import make_source
from vlm.data.sources import BadExample, to_str, decode_record

STEPS = ("heuristic", "clip_score", "dedup", "balance", "recaption")


def _source_key(config) -> list:
  d = config.data
  return [
    str(d.source),
    d.get("data_dir"),
    dict(d.builder) if d.get("builder") is not None else None,
    config.split,
    str(config.caption_key),
  ]


def _model_key(workdir: str) -> list:
  """What identifies a model's results in the cache: its workdir and newest checkpoint step."""
  from vlm.checkpoint import latest_step

  return [str(Path(workdir).resolve()), latest_step(workdir)]


def _check(config) -> None:
  unknown = [s for s in config.steps if s not in STEPS]
  if unknown:
    raise ValueError(f"steps: unknown {unknown}; known: {list(STEPS)}")
  if "clip_score" in config.steps:
    cs = config.clip_score
    if not cs.get("workdir"):
      raise ValueError("clip_score.workdir: set it to a trained contrastive model's workdir")
    if (cs.get("keep_fraction") is None) == (cs.get("threshold") is None):
      raise ValueError("clip_score: set exactly one of keep_fraction and threshold")
    if cs.get("keep_fraction") is not None and not 0 < cs.keep_fraction <= 1:
      raise ValueError(f"clip_score.keep_fraction: {cs.keep_fraction} is not in (0, 1]")
  if "dedup" in config.steps and config.dedup.embedding not in ("model", "pixels"):
    raise ValueError(f"dedup.embedding: {config.dedup.embedding!r}; expected 'model' or 'pixels'")
  if "dedup" in config.steps and config.dedup.embedding == "model" and "clip_score" not in config.steps:
    raise ValueError(
      "dedup.embedding='model' uses the clip_score model: add 'clip_score' to steps "
      "before 'dedup' or use dedup.embedding='pixels'"
    )
  if "balance" in config.steps and not config.balance.get("concepts"):
    raise ValueError("balance.concepts: give a list of concepts or a text file with one per line")
  if "recaption" in config.steps and not config.recaption.get("workdir"):
    raise ValueError("recaption.workdir: set it to a trained captioning model's workdir")


def _pairs(source, indices: np.ndarray, caption_key: str) -> tuple[list, list, np.ndarray]:
  """(uint8 images, captions, ok) of the records at indices (bad ones: a black image, ok False)."""
  images, captions, ok = [], [], []
  for i in indices:
    try:
      ex = decode_record(source[int(i)], caption_key)
      images.append(ex["image"]), captions.append(ex["caption"]), ok.append(True)
    except BadExample:
      images.append(None), captions.append(""), ok.append(False)
  shape = next((im.shape for im in images if im is not None), (1, 1, 3))
  images = [im if im is not None and im.shape == shape else np.zeros(shape, np.uint8) for im in images]
  return images, captions, np.asarray(ok)


def _resize(images: list[np.ndarray], size: int) -> np.ndarray:
  from PIL import Image

  return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BOX)) for im in images])


def _removed(before: np.ndarray, after: np.ndarray) -> int:
  return int(before.sum() - after.sum())


def _noise_report(config, stage_masks: dict[str, np.ndarray]) -> dict | None:
  """For the embedded scenes built with injected noise: what each stage removed of it."""
  if str(config.data.source) != "embedded" or config.split != "train":
    return None
  from vlm.data import embedded

  args = embedded.BuildArgs(**dict(config.data.builder))
  if not (args.noise_shuffled or args.noise_duplicates):
    return None
  noise = np.array([embedded.noise_of(args, "train", i) for i in range(args.num_train)])
  # Disjoint kinds: wrong captions (whatever the image), else a near-duplicate image, else clean.
  kinds = {"shuffled": noise[:, 1] >= 0, "duplicate": (noise[:, 0] >= 0) & (noise[:, 1] < 0)}
  kinds["clean"] = (noise[:, 0] < 0) & (noise[:, 1] < 0)
  out = {k: {"total": int(m.sum())} for k, m in kinds.items()}
  prev = np.ones(args.num_train, bool)
  for stage, mask in stage_masks.items():
    for k, m in kinds.items():
      out[k][f"removed_by_{stage}"] = int((m & prev & ~mask).sum())
    prev = mask
  for k, m in kinds.items():
    out[k]["kept"] = int((m & prev).sum())
  return out


def curate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Runs the steps, writes the dataset and `<workdir>/report.json`; returns the report."""
  _check(config)
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  cache = workdir / "cache"
  source = make_source(config.data, config.split)
  n = len(source)
  key, chunk, caption_key = _source_key(config), int(config.chunk_size), str(config.caption_key)
  keep = np.ones(n, bool)
  report: dict[str, Any] = {"source": str(config.data.source), "split": config.split, "examples": n, "steps": {}}
  masks: dict[str, np.ndarray] = {}
  scores = embeddings = None
  overrides: dict[str, list[str]] = {}

  for step in config.steps:
    before = keep.copy()
    info: dict[str, Any] = {}
    if step == "heuristic":
      rules = dict(config.heuristic)

      def run(start, stop):
        codes = []
        for i in range(start, stop):
          rec = source[i]
          image = rec.get("image", rec.get("image_path"))
          cap = to_str(rec.get(caption_key, rec.get("caption", "")))
          codes.append(filters.REASONS.index(filters.heuristic_reason(image, cap, **rules)))
        return {"reason": np.asarray(codes, np.int8)}

      reason = store.ChunkStore(cache, "heuristic", [key, rules], n, chunk).compute(run, "heuristic")["reason"]
      keep &= reason == 0
      counts = np.bincount(reason[before], minlength=len(filters.REASONS))
      info["reasons"] = {r: int(c) for r, c in zip(filters.REASONS, counts) if c and r != "ok"}
    elif step == "clip_score":
      from vlm.curation.models import ContrastiveScorer

      cs = config.clip_score
      scorer = None

      def run(start, stop):
        nonlocal scorer
        scorer = scorer or ContrastiveScorer(cs.workdir, int(config.batch_size))
        images, caps, ok = _pairs(source, np.arange(start, stop), caption_key)
        out = scorer(images, caps)
        out["score"] = np.where(ok, out["score"], -np.inf).astype(np.float32)
        out["image_embedding"] = out["image_embedding"].astype(np.float16)
        return out

      res = store.ChunkStore(cache, "clip_score", [key, *_model_key(cs.workdir)], n, chunk).compute(run, "clip_score")
      scores, embeddings = res["score"], res["image_embedding"].astype(np.float32)
      alive = np.flatnonzero(keep)
      if cs.get("keep_fraction") is not None:
        order = alive[np.lexsort((alive, -scores[alive]))]  # best first, ties by index
        k = int(round(cs.keep_fraction * len(alive)))
        keep[:] = False
        keep[order[:k]] = True
        info["threshold"] = float(scores[order[k - 1]]) if k else None
      else:
        keep &= scores >= cs.threshold
        info["threshold"] = float(cs.threshold)
      q = np.quantile(scores[alive][np.isfinite(scores[alive])], [0.05, 0.25, 0.5, 0.75, 0.95]) if len(alive) else []
      info["score_quantiles"] = dict(zip(("p5", "p25", "p50", "p75", "p95"), map(float, q)))
    elif step == "dedup":
      dd = config.dedup
      if dd.embedding == "pixels":

        def run(start, stop):
          images, _, _ = _pairs(source, np.arange(start, stop), caption_key)
          return {
            "thumb": dedup.thumbnail_embedding(_resize(images, 4 * dd.thumbnail_size), dd.thumbnail_size).astype(
              np.float16
            )
          }

        emb = store.ChunkStore(cache, "thumbnails", [key, dd.thumbnail_size], n, chunk).compute(run, "thumbnails")
        emb = emb["thumb"].astype(np.float32)
      else:
        emb = embeddings
      alive = np.flatnonzero(keep)
      clusters = dedup.near_duplicates(
        emb[alive], dd.threshold, num_bits=dd.num_bits, num_tables=dd.num_tables, seed=dd.seed
      )
      survivors = dedup.keep_one_per_cluster(clusters, None if scores is None else scores[alive])
      keep[alive[~survivors]] = False
      sizes = np.bincount(clusters)
      info.update(clusters_with_duplicates=int((sizes > 1).sum()), largest_cluster=int(sizes.max(initial=0)))
    elif step == "balance":
      bl = config.balance
      concepts = bl.concepts
      if isinstance(concepts, str):
        concepts = [line.strip() for line in Path(concepts).read_text().splitlines() if line.strip()]
      alive = np.flatnonzero(keep)
      caps = [to_str(source[int(i)].get(caption_key, "")) for i in alive]
      matches = filters.find_concepts(caps, list(concepts))
      sel, counts = filters.balance(
        matches, len(concepts), int(bl.max_per_concept), int(bl.seed), bool(bl.keep_unmatched)
      )
      keep[alive[~sel]] = False
      after = np.zeros(len(concepts), np.int64)
      for m in (m for m, s in zip(matches, sel) if s):
        after[list(m)] += 1
      info["concepts"] = {c: [int(b), int(a)] for c, b, a in zip(concepts, counts, after)}
      info["unmatched"] = int(sum(not m for m in matches))
    elif step == "recaption":
      from vlm.curation.models import Captioner

      rc = config.recaption
      alive = np.flatnonzero(keep)
      captioner = None

      def run(start, stop):
        nonlocal captioner
        captioner = captioner or Captioner(rc.workdir, rc.method, int(config.batch_size))
        images, _, _ = _pairs(source, alive[start:stop], caption_key)
        return {"caption": np.asarray(captioner(images), dtype=np.str_)}

      caps = store.ChunkStore(
        cache,
        "recaption",
        [key, *_model_key(rc.workdir), rc.method, store.fingerprint(alive.tolist())],
        len(alive),
        chunk,
      )
      caps = caps.compute(run, "recaption")["caption"] if len(alive) else np.zeros(0, np.str_)
      overrides[rc.field] = dict(zip(alive.tolist(), caps.tolist()))
      info["field"] = rc.field
      info["examples"] = [str(c) for c in caps[:5]]
    info["removed"] = _removed(before, keep)
    info["kept"] = int(keep.sum())
    report["steps"][step] = info
    masks[step] = keep.copy()
    print(f"{step}: removed {info['removed']}, kept {info['kept']}")

  noise = _noise_report(config, masks)
  if noise:
    report["injected_noise"] = noise
  out = config.output
  indices = np.flatnonzero(keep)
  from vlm.curation import writer
  from vlm.data.embedded import default_data_dir

  data_dir = out.get("data_dir") or config.data.get("data_dir") or default_data_dir()
  splits = {config.split: (source, indices, {k: [v[int(i)] for i in indices] for k, v in overrides.items()})}
  for s in out.copy_splits:
    if s != config.split:
      other = make_source(config.data, s)
      splits[s] = (other, np.arange(len(other)), {})
  summary = {"curation": {k: v["kept"] for k, v in report["steps"].items()}}
  path = writer.write_dataset(
    out.name,
    data_dir,
    splits,
    source=source,
    extra_text_fields=list(overrides),
    metadata=summary,
    caption_key=caption_key,
  )
  report["output"] = {
    "tfds": f"{writer.NAME}/{out.name}",
    "data_dir": str(data_dir),
    "path": str(path),
    "examples": int(len(indices)),
  }
  (workdir / "report.json").write_text(json.dumps(report, indent=1))
  return report


_CONFIG = config_flags.DEFINE_config_file("config", None, "Curation config file (configs/curate.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Cache and report directory (a rerun resumes from it).")


def main(argv) -> None:
  del argv
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  report = curate(_CONFIG.value, _WORKDIR.value)
  print(json.dumps({k: report[k] for k in ("steps", "output") if k in report}, indent=1))
  if "injected_noise" in report:
    print("injected noise:", json.dumps(report["injected_noise"]))


if __name__ == "__main__":
  app.run(main)
