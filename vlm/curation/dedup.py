"""Near-duplicate removal by embedding similarity: random-hyperplane LSH over the whole set.

Each of `num_tables` tables hashes an L2-normalised embedding to `num_bits` signs of random
projections (Charikar 2002: two vectors at angle a agree on a bit with probability 1 - a / pi);
pairs that share a bucket in any table are compared exactly, and pairs with cosine >= threshold
join one cluster (union-find). Everything is seeded, so the result is deterministic. With 12 bits
and 16 tables a pair at cosine 0.95 is found with probability ~0.995; `num_tables=0` compares all
pairs (exact, O(N^2), for small sets and tests).
"""

from __future__ import annotations

import numpy as np


class _UnionFind:
  def __init__(self, n: int):
    self.parent = np.arange(n)

  def find(self, i: int) -> int:
    root = i
    while self.parent[root] != root:
      root = self.parent[root]
    while self.parent[i] != root:
      self.parent[i], i = root, self.parent[i]
    return root

  def union(self, i: int, j: int) -> None:
    ri, rj = self.find(i), self.find(j)
    if ri != rj:
      self.parent[max(ri, rj)] = min(ri, rj)


def _pairs_above(z: np.ndarray, idx: np.ndarray, threshold: float, block: int = 2048):
  """(i, j) index pairs of z[idx] (i < j) with cosine >= threshold."""
  for s in range(0, len(idx), block):
    rows = idx[s : s + block]
    sim = z[rows] @ z[idx].T
    a, b = np.nonzero(sim >= threshold)
    sel = idx[b] > rows[a]
    yield rows[a[sel]], idx[b[sel]]


def near_duplicates(
  emb: np.ndarray, threshold: float = 0.95, *, num_bits: int = 12, num_tables: int = 16, seed: int = 0
) -> np.ndarray:
  """Cluster id of each row of emb [N, D] (the smallest member index); singletons are their own."""
  z = np.asarray(emb, np.float32)
  z = z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
  n = len(z)
  uf = _UnionFind(n)
  if num_tables == 0:
    groups = [np.arange(n)]
  else:
    planes = np.random.default_rng(seed).standard_normal((num_tables, z.shape[1], num_bits)).astype(np.float32)
    weights = 1 << np.arange(num_bits, dtype=np.int64)
    groups = []
    for t in range(num_tables):
      codes = ((z @ planes[t]) > 0).astype(np.int64) @ weights
      order = np.argsort(codes, kind="stable")
      bounds = np.flatnonzero(np.diff(codes[order])) + 1
      groups += [g for g in np.split(order, bounds) if len(g) > 1]
  for g in groups:
    for i, j in _pairs_above(z, np.sort(g), threshold):
      for a, b in zip(i.tolist(), j.tolist()):
        uf.union(a, b)
  return np.array([uf.find(i) for i in range(n)])


def keep_one_per_cluster(clusters: np.ndarray, priority: np.ndarray | None = None) -> np.ndarray:
  """keep [N] bool: in each cluster the member with the highest priority (ties: lowest index)."""
  n = len(clusters)
  priority = np.zeros(n) if priority is None else np.asarray(priority, np.float64)
  order = np.lexsort((np.arange(n), -priority))  # best first
  _, first = np.unique(clusters[order], return_index=True)
  keep = np.zeros(n, bool)
  keep[order[first]] = True
  return keep


def thumbnail_embedding(images: np.ndarray, size: int = 16) -> np.ndarray:
  """A model-free embedding for pixel-level near-duplicates: the image box-downsampled to
  size x size, each channel centred (mean 0): with the cosine, a copy with other brightness or
  contrast or a little noise stays at ~1. [N, size*size*C]."""
  x = np.asarray(images, np.float32)
  n, h, w, c = x.shape
  fh, fw = h // size, w // size
  if fh < 1 or fw < 1 or h % size or w % size:
    raise ValueError(f"thumbnail_embedding: images {h}x{w} are not a multiple of size {size}")
  t = x.reshape(n, size, fh, size, fw, c).mean((2, 4))
  t = t.reshape(n, size * size, c)
  return (t - t.mean(1, keepdims=True)).reshape(n, -1)
