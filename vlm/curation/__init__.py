"""Data curation: filters, model scores, near-duplicate removal, concept balancing, re-captioning.

The stages (run in order by `vlm.curate`, each on the survivors of the previous ones):

- `filters.heuristic_reasons`: caption length, language-agnostic junk rules, image size and
  aspect ratio (no model).
- CLIP-score (`models.contrastive_scores`): a trained contrastive model's image-text similarity,
  keep the top fraction or everything above a threshold (DataComp, Gadre et al. 2023, sec. 3.4).
- `dedup.near_duplicates`: clusters of near-identical image embeddings found by random-hyperplane
  LSH over the whole set (deterministic), one survivor per cluster.
- `filters.balance`: MetaCLIP's concept balancing (Xu et al. 2023, sec. 3.3): an example matching
  concepts is kept with probability max_c min(1, t / count_c).
- `models.recaption`: synthetic captions from one of our captioning models.

Per-example results are computed in chunks and saved as they finish (`store.ChunkStore`), so an
interrupted run resumes where it stopped; `writer.write_dataset` writes the result as a TFDS
ArrayRecord dataset (atomically: TFDS builds into `incomplete.*` and renames).
"""
