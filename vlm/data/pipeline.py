"""The grain input pipeline: config -> per-process batches -> global jax.Arrays.

    source -> seeded shuffle of the whole split (reshuffled each epoch) -> repeat: ONE
    global stream, the same for every process count -> this process's rows of each
    global batch -> the example ops (worker processes if data.worker_count > 0) -> drop
    bad examples, counted by reason -> batch (or pack) -> global jax.Array sharded over
    the mesh's ('data', 'fsdp') axes.

The example ops (vlm.data.example_ops) are every per-example step, registered ops built from
`config.data` in a fixed order: decode, the image pp ops, documents, MixGen, grounding pairs, the
question filter, interleaving, then the model inputs (image, text, label, extra texts, answer label,
AnyRes layout, conversation, CM3, boxes, frames); each validates its own config keys, and this module
knows none of them (`example_ops.make_ops(data, pp, ...)`; `check_config` runs their checks).

Global batch s is elements [s*B, (s+1)*B) of the global stream; process p reads its
contiguous rows [p*b, (p+1)*b) (b = B / process_count), which is how
`jax.make_array_from_process_local_data` lays out rows when processes own contiguous
blocks of the data axes. Random ops draw from np.random.default_rng([seed, 0, position])
(some from their own streams [seed, k, position]: vlm.data.example_ops) with the GLOBAL
stream position, so 1 process and N processes see the same global batches with the same
augmentations (as long as no example is bad: a process replaces its bad examples with the
next ones of its own rows), a run is reproducible, and a resumed iterator (`set_state`)
continues with exactly the examples and augmentations it would have produced.

Config keys (`config.data`, see `get_default_config`):
    source        'embedded' | 'digits' | 'tfds:NAME' | 'jsonl:PATH' | 'csv:PATH' | 'wds:GLOB' |
                  'docs:PATH' (interleaved documents, sources.DocumentSource) (PATH/GLOB may contain
                  '{split}')
    data_dir      TFDS / embedded data dir (None: $VLM_DATA_DIR or ~/.cache/vlm/data)
    builder       embedded-dataset build kwargs (num_train, num_validation, num_test,
                  image_size, num_frames, seed, vocab_size, text_rich: 1 = every image has small
                  text, the high-resolution test bed of vlm.data.scenes; noise_shuffled /
                  noise_duplicates: percent of train pairs with another example's captions / that
                  near-duplicate an earlier example, for curation experiments)
    image_size    digits upsampling size (pp strings carry their own sizes)
    pp_train, pp_eval   preprocessing strings (vlm.data.preprocess); a list of op strings
                  works too (set it with `with config.ignore_type():` on a default config)
    mixgen        MixGen (Hao et al. 2023): probability (default 0.0, off) that an example, after its pp
                  ops, is mixed with one other random example of the split (through the same ops):
                  image 0.5 * own + 0.5 * other, caption "own other"; label, boxes, questions stay its own
    text_length, detailed_text_length   token lengths
    caption_key   record key tokenized into 'text'
    tokenizer     SentencePiece .model, HF tokenizer.json, or a directory holding one (None: the
                  embedded dataset's tokenizer); vlm.data.tokenizer.load_tokenizer
    tokenizer_family   SentencePiece conventions: None (vlm's), 'siglip', 't5', 'llama', 'gemma'
    add_bos, add_eos   True / False, or None: the tokenizer's default (data.tokenizer_family's, or a
                  tokenizer.json's post-processor)
    extra_text_keys   subset of ('caption_detailed', 'question', 'answer')
    max_images    documents (records with 'texts' / 'images': the embedded set built with
                  builder.documents = n, or docs:PATH): each image goes through the pp ops on its
                  own (text-editing ops such as flip_lr's left/right swap do not reach the document),
                  'image' becomes [max_images, H, W, 3] (zeros after the document's last image; a
                  longer document is cut before its (max_images + 1)-th image), and the document's
                  text with '<image>' placeholders is what the conversation writes before a question
                  (task 'qa') or trains on whole (task 'document')
    interleaved_images  M > 1: each example becomes an interleaved document of M images (Flamingo):
                  M - 1 other random examples of the split join it, 'image' is [M, H, W, 3], the
                  example's own image sits at a drawn position k, its questions ask "... in the
                  k-th image?", and data.conversation writes '<image>caption. <image>...' before
                  the question (conversation.interleave; conversation task 'qa' only);
                  data.conversation.end_of_chunk (a special marker, e.g. '<|endofchunk|>') ends
                  each caption chunk
    pp op anyres  LLaVA-NeXT views: 'image' becomes [1 + max_tiles, tile, tile, 3] and batches get
                  'image_layout' [B, 4] (tile rows, cols, original height, width); the conversation
                  writes each example's own number of `<image>` placeholders (not with packing or
                  interleaved_images)
    question_regex    None, or keep only the question/answer pairs whose question matches it
                  (re.search), e.g. 'text say' for the text-reading VQA of the text-rich scenes
    answer_vocab  VQA as classification: a list of answers or a text file (one per line); with
                  'question' in extra_text_keys, batches get 'answer_label' (index, -1 if absent)
    conversation  VLMs on a language model (vlm.data.conversation): a block with tasks
                  ('caption' | 'detailed' | 'qa' | 'text'), task_weights, template, specials,
                  system, image_tokens, with_image, length, prompt_length, max_turns, add_bos; batches
                  get 'tokens', 'loss_mask' [B, length] and 'prompt', 'prompt_mask'
                  [B, prompt_length] (left-padded question prompt, for generation evals)
                  pack = k > 1: k examples per row, + 'segment_ids', others [B, k, ...] (train only)
                  instruction_length = L > 0: + 'instruction', 'prompt_instruction' [B, L] (the
                  user's instruction for an instruction-aware image encoder)
                  image_row_break (a special marker) + image_rows = R: the placeholders in R rows,
                  each closed by the marker (Fuyu's |NEWLINE| after every row of patches)
    grounding     None, or a block adding grounding question/answer pairs built from the boxes
                  (vlm.data.grounding: tasks from ('refer', 'region', 'grounded'), boxes as text in
                  0-1000 coordinates; only=True keeps only those questions); needs box_labels
    cm3           None, or the CM3 objective's span transform of every document (vlm.data.cm3:
                  sentinel_ids, num_spans / poisson_lambda / max_spans, max_span_len, protected_ids;
                  needs conversation tasks=('text',))
    with_boxes, max_boxes, with_frames
    frames_as_images  a clip's frames (after the pp ops, e.g. sample_frames) become the example's images
                  [T, H, W, 3], one '<image>' each at the start of the user's turn (a multi-image VLM;
                  MiniGPT4-Video); subtitles=True puts each frame's subtitle after its '<image>' (the
                  records' 'subtitles', one per frame; the clips of data.builder.video_events have
                  them). Neither is in the defaults (False when absent)
    worker_count  grain worker processes: 0 = in the main process; -1 (default) = 'auto': 0 on the CPU
                  backend (tests, demos), else min(16, cpu_count // 2), a start for accelerator hosts
                  (decode + pp of 224 px JPEGs runs ~200 examples/s per core: BENCHMARKS.md)
    prefetch      batches made ahead on a background thread and already put on the devices
                  (default 2; 0: made on the caller's thread when asked for)
    read_threads  threads preprocessing examples ahead inside each process (grain.ReadOptions;
                  default 0: examples are made one after another on the thread that batches them,
                  the prefetch thread above). grain's own default, 16 threads with 500 examples
                  buffered, polls its whole buffer for every example: on the 2-core CPU it cost 57-74%
                  more CPU per batch of the SigLIP demo (222-245 vs 141 ms per 128 examples)
    strict        raise on a bad example instead of skipping it
    image_root    jsonl:/csv:/docs: manifests: the directory image paths are relative to (None, default:
                  the manifest's directory); a path must stay inside it (absolute, or '..' out of it: a
                  ValueError naming file, line and path when the source is opened)
    allow_absolute_paths   True: read manifest image paths as written, absolute or '..' (default False)
    max_image_pixels   images with more pixels are bad examples 'too_large', checked on the image header
                  before any decode (default 64_000_000: every camera image up to 8000 x 8000, at most
                  192 MB of RGB per decode, below PIL's own ~89 MP bomb warning; None: no limit)
    max_video_frames   manifest clips (a `video` path per line, vlm.data.video) with more frames are bad
                  examples 'too_large' (not in the defaults; 1024 when absent)
    max_consecutive_bad   bad examples in a row beyond this raise TooManyBadExamples (default 1000; None:
                  off): a wrong image root or a broken shard set fails in seconds instead of the filter
                  skipping forever through the repeated stream
    max_bad_fraction, bad_window   TooManyBadExamples when more than max_bad_fraction (default 0.5) of
                  the last bad_window (default 10000) examples of this process were bad (None: off); the
                  error names data.source, the reasons counted and one bad example (file:line). Both
                  caps count this process's examples since the iterator was made or `set_state`
"""

from __future__ import annotations

import collections
import os
import queue
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from vlm import parallel
from vlm.data import conversation, example_ops, sources
from vlm.data.tokenizer import HFTokenizer, Tokenizer, load_tokenizer

# Caps on bad examples (data.max_consecutive_bad, data.max_bad_fraction over data.bad_window): past them
# the iterator raises TooManyBadExamples instead of filtering a broken source forever.
MAX_CONSECUTIVE_BAD = 1000
MAX_BAD_FRACTION = 0.5
BAD_WINDOW = 10000
# The key of DataIterator.get_state() that holds the counters of stats() (the rest is grain's state).
STATS_STATE_KEY = "vlm_stats"


class TooManyBadExamples(RuntimeError):
  """More bad examples than data.max_consecutive_bad / data.max_bad_fraction allow: the source is
  broken (e.g. a wrong image root), and skipping on would yield few or no batches, or hang."""


def get_default_config() -> ml_collections.ConfigDict:
  """`config.data` for the embedded scenes dataset at 64 px."""
  c = ml_collections.ConfigDict()
  c.source = "embedded"
  c.data_dir = ml_collections.config_dict.placeholder(str)
  c.builder = ml_collections.ConfigDict(
    dict(
      num_train=20000,
      num_validation=1000,
      num_test=2000,
      image_size=64,
      num_frames=0,
      seed=0,
      vocab_size=1000,
      text_rich=0,
      noise_shuffled=0,
      noise_duplicates=0,
      documents=0,
    )
  )
  c.image_size = 64
  c.pp_train = "decode|random_resized_crop(64, scale=(0.8, 1))|flip_lr|value_range(-1, 1)"
  c.pp_eval = "decode|resize(64)|value_range(-1, 1)"
  c.text_length = 32
  c.detailed_text_length = 64
  c.caption_key = "caption"
  c.tokenizer = ml_collections.config_dict.placeholder(str)
  c.tokenizer_family = ml_collections.config_dict.placeholder(str)
  c.add_bos = False
  c.add_eos = True
  c.extra_text_keys = ()
  c.question_regex = ml_collections.config_dict.placeholder(str)
  c.interleaved_images = 1
  c.max_images = 4
  c.mixgen = 0.0
  c.with_boxes = False
  c.max_boxes = 8
  c.with_frames = False
  c.worker_count = -1
  c.prefetch = 2
  c.read_threads = 0
  c.strict = False
  c.image_root = ml_collections.config_dict.placeholder(str)
  c.allow_absolute_paths = False
  c.max_image_pixels = sources.MAX_IMAGE_PIXELS
  c.max_consecutive_bad = MAX_CONSECUTIVE_BAD
  c.max_bad_fraction = MAX_BAD_FRACTION
  c.bad_window = BAD_WINDOW
  return c


def check_config(data: ml_collections.ConfigDict) -> None:
  """Validates `config.data`; ValueError names the bad key, op or argument.

  The source and the pipeline's own keys here; every per-example step's keys (pp strings, texts,
  conversation, grounding, CM3, MixGen, documents, ...) by that example op's check
  (vlm.data.example_ops.check_ops)."""
  kind = str(data.source).split(":", 1)[0]
  if kind not in ("embedded", "digits", "tfds", "jsonl", "csv", "wds", "docs"):
    raise ValueError(
      f"data.source: unknown source {data.source!r}; expected 'embedded', 'digits', "
      "'tfds:NAME', 'jsonl:PATH', 'csv:PATH', 'wds:GLOB' or 'docs:PATH'"
    )
  if kind in ("tfds", "jsonl", "csv", "wds", "docs") and not str(data.source).partition(":")[2]:
    raise ValueError(f"data.source: {data.source!r} needs a name or path after ':'")
  example_ops.check_ops(data)
  if int(data.get("worker_count", 0)) < -1:
    raise ValueError(f"data.worker_count: must be >= 0, or -1 for 'auto', got {data.worker_count}")
  if int(data.get("prefetch", 0)) < 0:
    raise ValueError(f"data.prefetch: must be >= 0, got {data.prefetch}")
  if int(data.get("read_threads", 0)) < 0:
    raise ValueError(f"data.read_threads: must be >= 0, got {data.read_threads}")
  for key in ("max_consecutive_bad", "bad_window"):
    v = data.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
      raise ValueError(f"data.{key}: must be a positive int or None, got {v!r}")
  v = data.get("max_bad_fraction")
  if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1):
    raise ValueError(f"data.max_bad_fraction: must be in (0, 1] or None, got {v!r}")
  if data.get("image_root") is not None and not isinstance(data.image_root, str):
    raise ValueError(f"data.image_root: must be a directory path or None, got {data.image_root!r}")


def worker_count(data: ml_collections.ConfigDict) -> int:
  """grain worker processes for data.worker_count (-1: 0 on the CPU backend, else min(16, cpus // 2))."""
  n = int(data.get("worker_count", 0))
  if n >= 0:
    return n
  return 0 if jax.default_backend() == "cpu" else min(16, (os.cpu_count() or 2) // 2)


def _builder_kwargs(data) -> dict:
  return dict(data.builder) if "builder" in data and data.builder is not None else {}


def make_source(data: ml_collections.ConfigDict, split: str):
  """The random-access source of `split` named by `data.source`."""
  kind, _, arg = str(data.source).partition(":")
  arg = arg.replace("{split}", split)
  if kind == "embedded":
    from vlm.data import embedded

    embedded.build(data.get("data_dir"), **_builder_kwargs(data))
    return sources.TfdsSource(
      embedded.tfds_name(**_builder_kwargs(data)), split, data.get("data_dir") or embedded.default_data_dir()
    )
  if kind == "digits":
    from vlm.data.digits import DigitsSource

    return DigitsSource(split, int(data.get("image_size", 64)))
  if kind == "tfds":
    return sources.TfdsSource(arg, split, data.get("data_dir"))
  paths = dict(image_root=data.get("image_root"), allow_absolute_paths=bool(data.get("allow_absolute_paths", False)))
  if kind in ("jsonl", "csv", "docs") and paths["image_root"] and not os.path.isdir(paths["image_root"]):
    raise ValueError(f"data.image_root: {paths['image_root']!r} is not a directory")
  if kind in ("jsonl", "csv"):
    return sources.ManifestSource(arg, data.get("caption_key", "caption"), **paths)
  if kind == "wds":
    return sources.WebDatasetSource(arg)
  if kind == "docs":
    return sources.DocumentSource(arg, **paths)
  raise ValueError(f"data.source: unknown source {data.source!r}")


def get_tokenizer(data: ml_collections.ConfigDict) -> Tokenizer | HFTokenizer:
  """`data.tokenizer` if set (a .model, a tokenizer.json or a directory), else the tokenizer of the
  embedded dataset that `data.builder` describes (built on first use; its corpus also covers the
  digits captions); with the conventions of `data.tokenizer_family` (None: vlm's)."""
  family = data.get("tokenizer_family")
  if data.get("tokenizer"):
    return load_tokenizer(data.tokenizer, family)
  from vlm.data import embedded

  return load_tokenizer(embedded.tokenizer_path(data.get("data_dir"), **_builder_kwargs(data)), family)


def get_metadata(data: ml_collections.ConfigDict, split: str = "train") -> dict:
  """Class names, prompt templates, held-out classes (where the source has them)."""
  return dict(make_source(data, split).metadata)


class _Process:
  """(global position, source index) -> model-ready example through the example ops (runs in grain
  workers); a bad record (sources.BadExample) -> {'_bad': reason, '_where', '_detail'}, or with
  data.strict a ValueError naming it."""

  def __init__(self, source, ops: list[example_ops.ExampleOp], seed: int, strict: bool = False):
    self.source, self.ops, self.seed, self.strict = source, ops, seed, strict

  def __call__(self, item: tuple[int, int]) -> dict:
    position, source_index = item  # global stream position, index into the source
    try:
      return example_ops.run_ops(self.ops, self.source[source_index], position, self.seed)
    except sources.BadExample as e:
      where = self.source.describe(source_index)
      if self.strict:
        raise ValueError(f"bad example {where}: {e} (data.strict=True)") from None
      return {"_bad": e.reason, "_where": where, "_detail": e.detail}


class _ProcessRows:
  """Local index i -> (global position, source index) of this process's i-th element.

  The global stream is cut into global batches of `global_batch`; this process owns rows
  [process_index * local_batch, (process_index + 1) * local_batch) of each.
  """

  def __init__(self, order: grain.MapDataset, global_batch: int, local_batch: int, process_index: int):
    self.order, self.global_batch, self.local_batch = order, global_batch, local_batch
    self.offset = process_index * local_batch

  def position(self, i: int) -> int:
    s, r = divmod(i, self.local_batch)
    return s * self.global_batch + self.offset + r

  def __call__(self, i: int) -> tuple[int, int]:
    g = self.position(int(i))
    return g, int(self.order[g])

  @staticmethod
  def local_length(stream_length: int, global_batch: int, local_batch: int, process_index: int) -> int:
    """How many elements of a stream of `stream_length` fall in this process's rows."""
    full, rest = divmod(stream_length, global_batch)
    return full * local_batch + min(max(rest - process_index * local_batch, 0), local_batch)


class _BadExampleFilter:
  """The grain filter that drops bad examples ({'_bad': reason}, from _Process), counting each as
  counts['skipped/<reason>'], and raises TooManyBadExamples past the caps: more than max_consecutive
  bad examples in a row, or more than max_fraction of the last `window` examples. Runs in the main
  process (after any grain workers), so the counts are complete and the error reaches `next()`."""

  def __init__(
    self,
    counts: collections.Counter,
    source_name: str,
    max_consecutive: int | None,
    max_fraction: float | None,
    window: int | None,
  ):
    self.counts, self.source_name = counts, source_name
    self.max_consecutive, self.max_fraction = max_consecutive, max_fraction
    self.window = int(window or BAD_WINDOW)
    self.reset()

  def reset(self) -> None:
    """Forgets the run of consecutive bad examples and the window (a new position in the stream)."""
    self.run: collections.Counter = collections.Counter()  # reasons of the current run of bad examples
    self.recent: collections.deque = collections.deque(maxlen=self.window)  # reason or None per example
    self.recent_bad: collections.Counter = collections.Counter()

  def __call__(self, ex: dict) -> bool:
    reason = ex.get("_bad")
    if self.max_fraction is not None:
      if len(self.recent) == self.window:
        old = self.recent[0]
        if old is not None:
          self.recent_bad[old] -= 1
      self.recent.append(reason)
      if reason is not None:
        self.recent_bad[reason] += 1
    if reason is None:
      self.run.clear()
      return True
    self.counts[f"skipped/{reason}"] += 1
    self.run[reason] += 1
    n = sum(self.run.values())
    if self.max_consecutive is not None and n > self.max_consecutive:
      raise self._error(f"{n} bad examples in a row (data.max_consecutive_bad={self.max_consecutive})", self.run, ex)
    if self.max_fraction is not None and len(self.recent) == self.window:
      bad = sum(self.recent_bad.values())
      if bad > self.max_fraction * self.window:
        share = 100 * bad / self.window
        raise self._error(
          f"{bad} of the last {self.window} examples were bad ({share:.1f}% > "
          f"data.max_bad_fraction={self.max_fraction} of data.bad_window={self.window})",
          self.recent_bad,
          ex,
        )
    return False

  def _error(self, what: str, reasons: collections.Counter, ex: dict) -> TooManyBadExamples:
    counted = ", ".join(f"{r}: {n}" for r, n in reasons.most_common() if n > 0)
    total = sum(v for k, v in self.counts.items() if k.startswith("skipped/"))
    return TooManyBadExamples(
      f"{what} from data.source {self.source_name!r}; reasons: {counted}. One of them: {ex.get('_where')}: "
      f"{ex['_bad']}: {ex.get('_detail', '')}. Skipped so far: {total}. Check the source (image paths, "
      "data.image_root, the files), or raise data.max_consecutive_bad / data.max_bad_fraction (None: off)."
    )


def _ensure_absl_flags_parsed() -> None:
  """grain workers read absl flags; outside an absl app (pytest, notebooks) mark them parsed."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class DataIterator(Iterator[dict[str, Any]]):
  """Yields batches (global jax.Arrays on `mesh`, numpy without); checkpointable.

  prefetch > 0: a background thread makes up to that many batches ahead, device transfer
  included, so the train step never waits for the host while the pipeline keeps up. The
  checkpointable state stays the caller's: `get_state()` is the state after the last batch
  handed out (not after the ones made ahead), so a resumed run sees exactly the batches it
  did not train on. An error in the pipeline is raised by the `next()` that would have
  returned that batch. `stats()` is likewise the caller's: the counters as of the last batch handed
  out, never the ones made ahead (which a thread race would make nondeterministic).
  """

  def __init__(
    self,
    dataset: grain.IterDataset,
    counts: collections.Counter,
    mesh,
    global_batch: int,
    prefetch: int = 0,
    bad_filter: _BadExampleFilter | None = None,
  ):
    self._it = iter(dataset)
    self._counts = counts
    self._bad_filter = bad_filter
    self._mesh, self._global_batch = mesh, global_batch
    self._prefetch = int(prefetch)
    self._worker: _Prefetcher | None = None
    self._state: dict | None = None  # with prefetch: the state after the last batch handed out
    self._counted: dict | None = None  # with prefetch: the counters after the last batch handed out

  def _make(self) -> tuple[dict[str, Any], Any, dict | None]:
    """The next batch (on the mesh), and with prefetch the iterator state and counters after it."""
    batch = next(self._it)
    self._counts["examples"] += int(np.size(batch["label"]))  # packed: label [rows, k]
    self._counts["batches"] += 1
    state = self._it.get_state() if self._prefetch else None
    counted = dict(self._counts) if self._prefetch else None
    if self._mesh is not None:
      batch = parallel.shard_batch(batch, self._mesh, self._global_batch)
    return batch, state, counted

  def __next__(self) -> dict[str, Any]:
    if not self._prefetch:
      return self._make()[0]
    if self._worker is None:
      self._state, self._counted = self._it.get_state(), dict(self._counts)
      self._worker = _Prefetcher(weakref.WeakMethod(self._make), self._prefetch)
      weakref.finalize(self, self._worker.stop_event.set)  # an abandoned iterator stops its thread
    try:
      batch, self._state, self._counted = self._worker.get()
    except StopIteration:
      self._counted = None  # the stream is exhausted: the producer's counts are final
      raise
    return batch

  def get_state(self) -> dict:
    """grain's state plus, under STATS_STATE_KEY, the counters of `stats()` (JSON-able ints)."""
    state = self._state if self._state is not None else self._it.get_state()
    counts = self._counts if self._counted is None else self._counted
    return {**state, STATS_STATE_KEY: {k: int(v) for k, v in counts.items()}}

  def set_state(self, state: dict) -> None:
    """Continues at `state` (from get_state), its counters included, so stats() go on from there;
    a state without counters (written before they were saved) keeps the current ones."""
    self.close()
    state = dict(state)
    counts = state.pop(STATS_STATE_KEY, None)
    self._it.set_state(state)
    if counts is not None:
      self._counts.clear()
      self._counts.update({str(k): int(v) for k, v in counts.items()})
    if self._bad_filter is not None:
      self._bad_filter.reset()
    self._state = self._counted = None

  def close(self) -> None:
    """Stops the prefetch thread (batches made ahead are dropped; the state is kept)."""
    if self._worker is not None:
      self._worker.stop()
      self._worker = None

  def stats(self) -> dict[str, int]:
    """Counters since this iterator was made: examples, batches, skipped[/reason] and, when
    packing, packed_dropped / packed_truncated (see conversation.pack_examples)."""
    counts = self._counts if self._counted is None else self._counted
    out = {k: int(v) for k, v in counts.items()}
    out["skipped"] = sum(v for k, v in out.items() if k.startswith("skipped/"))
    return out


class _Prefetcher:
  """Runs `make()` on a daemon thread, up to `depth` results ahead; `get()` returns them in order.

  `make` is a weakref.WeakMethod, so the thread does not keep its iterator alive. StopIteration
  and errors of `make()` are re-raised by the `get()` at their place in the stream.
  """

  def __init__(self, make: weakref.WeakMethod, depth: int):
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self.stop_event = threading.Event()
    self._done = False
    self._thread = threading.Thread(
      target=self._run, args=(make, self._queue, self.stop_event), daemon=True, name="vlm-data-prefetch"
    )
    self._thread.start()

  @staticmethod
  def _run(make: weakref.WeakMethod, out: queue.Queue, stop: threading.Event) -> None:
    while not stop.is_set():
      fn = make()
      if fn is None:  # the iterator is gone
        return
      try:
        item = ("ok", fn())
      except StopIteration:
        item = ("end", None)
      except BaseException as e:  # re-raised on the consumer's thread
        item = ("error", e)
      del fn
      while not stop.is_set():
        try:
          out.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if item[0] != "ok":
        return

  def get(self):
    if self._done:
      raise StopIteration
    while True:
      try:
        kind, value = self._queue.get(timeout=1.0)
        break
      except queue.Empty:
        if not self._thread.is_alive() and self._queue.empty():
          raise RuntimeError("vlm data prefetch thread stopped without a result") from None
    if kind == "ok":
      return value
    self._done = True
    if kind == "end":
      raise StopIteration
    raise value

  def stop(self) -> None:
    self.stop_event.set()
    if self._thread is not threading.current_thread():
      self._thread.join(timeout=60)


def make_pipeline(
  config: ml_collections.ConfigDict,
  *,
  split: str,
  batch_size: int,
  mesh: jax.sharding.Mesh | None,
  seed: int,
  tokenizer: Tokenizer | None = None,
  shuffle: bool = True,
  num_epochs: int | None = None,
  drop_remainder: bool = True,
  pp: str | list[str] | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  pack: int | None = None,
) -> DataIterator:
  """Batches of `split`: 'image' [B, H, W, 3] f32, 'text' [B, L] i32, 'label' [B] i32, 'seen' [B] bool.

  `config` is `config.data` (or a config holding it as `.data`); `batch_size` is
  GLOBAL: each process yields its batch_size / process_count contiguous rows of each global
  batch, so concatenating the processes' batches in process order gives the 1-process batch.
  `process_index` / `process_count` default to JAX's (set them to simulate processes).
  With drop_remainder, a finite stream is cut to whole global batches, so every process
  yields the same number of batches (bad examples aside).
  `pp` defaults to data.pp_train for split 'train', else data.pp_eval.
  `pack` (default: data.conversation.pack for split 'train', else 1): k > 1 packs k consecutive
  examples into each row (conversation.pack_examples): batch_size stays the number of rows, each
  of k examples, so a batch holds batch_size * k examples.
  """
  data = config.data if "data" in config else config
  check_config(data)
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} is not divisible by process_count {process_count}")
  tokenizer = tokenizer or get_tokenizer(data)
  if pp is None:
    pp = data.pp_train if split == "train" else data.pp_eval
  source = make_source(data, split)
  where = "data.pp_train" if split == "train" else "data.pp_eval"
  ops = example_ops.make_ops(data, pp, tokenizer=tokenizer, source=source, where=where)

  # The global stream of source indices: identical for every process and process count.
  order = grain.MapDataset.range(len(source))
  if shuffle:
    order = order.shuffle(seed=seed)  # shuffle before repeat: a new permutation each epoch
  if num_epochs != 1:
    order = order.repeat(num_epochs)
  local_batch = batch_size // process_count
  conv = data.get("conversation")
  if pack is None:
    pack = int(conv.get("pack", 1)) if conv is not None and split == "train" else 1
  if not (isinstance(pack, int) and pack > 0):
    raise ValueError(f"make_pipeline: pack must be a positive int, got {pack!r}")
  if pack > 1 and conv is None:
    raise ValueError(f"make_pipeline: pack={pack} needs data.conversation (it packs conversations)")
  # Packing: a global batch of batch_size rows reads batch_size * pack stream elements, row r
  # elements [r * pack, (r + 1) * pack) of them, so processes still split it into contiguous rows.
  ex_batch, ex_local = batch_size * pack, local_batch * pack
  stream_length = len(order)
  if drop_remainder:
    stream_length -= stream_length % ex_batch
  n_local = _ProcessRows.local_length(stream_length, ex_batch, ex_local, process_index)
  rows = _ProcessRows(order, ex_batch, ex_local, process_index)
  ds = grain.MapDataset.range(n_local).map(rows).map(_Process(source, ops, seed, bool(data.get("strict", False))))
  threads = int(data.get("read_threads", 0))
  ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * ex_local if threads else 0))
  workers = worker_count(data)
  if workers > 0:
    _ensure_absl_flags_parsed()
    ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))

  counts: collections.Counter = collections.Counter()
  keep = _BadExampleFilter(
    counts,
    str(data.source).replace("{split}", split),
    data.get("max_consecutive_bad", MAX_CONSECUTIVE_BAD),
    data.get("max_bad_fraction", MAX_BAD_FRACTION),
    data.get("bad_window", BAD_WINDOW),
  )
  ids = ids.filter(keep)  # runs in the main process, so counts are complete
  if pack > 1:
    packer = _Packer(
      pack,
      int(conv.get("length", 64)),
      tokenizer.pad_id,
      conversation.chat_tokenizer_from_config(conv, tokenizer).image_id,
      counts,
    )
    ids = ids.batch(ex_local, drop_remainder=drop_remainder).map(packer)
  else:
    ids = ids.batch(local_batch, drop_remainder=drop_remainder)
  return DataIterator(ids, counts, mesh, batch_size, prefetch=int(data.get("prefetch", 0)), bad_filter=keep)


class _Packer:
  """A batch of rows * k examples -> rows packed rows (conversation.pack_examples), counting
  dropped / truncated examples. Runs in the main process. A short final batch (drop_remainder
  False) fills its last row's missing examples with empty (all-zero, all-padding) ones."""

  def __init__(self, k: int, length: int, pad_id: int, image_id: int, counts: collections.Counter):
    self.k, self.length, self.pad_id, self.image_id, self.counts = k, length, pad_id, image_id, counts

  def __call__(self, batch: dict) -> dict:
    n = len(batch["tokens"])
    rows = []
    for start in range(0, n, self.k):
      examples = [{key: v[i] for key, v in batch.items()} for i in range(start, min(start + self.k, n))]
      while len(examples) < self.k:
        empty = {key: np.zeros_like(v) for key, v in examples[0].items()}
        empty["tokens"] = np.full_like(examples[0]["tokens"], self.pad_id)
        examples.append(empty)
      row = conversation.pack_examples(examples, self.length, self.pad_id, self.image_id)
      self.counts["packed_dropped"] += row.pop("packed_dropped")
      self.counts["packed_truncated"] += row.pop("packed_truncated")
      rows.append(row)
    return {key: np.stack([r[key] for r in rows]) for key in rows[0]}


def load_split_numpy(
  config: ml_collections.ConfigDict,
  split: str,
  tokenizer: Tokenizer | None = None,
  max_examples: int | None = None,
  chunk: int = 256,
) -> tuple[dict[str, np.ndarray], dict]:
  """A whole (small) split as numpy arrays with data.pp_eval, in source order, plus metadata.

  Returns (arrays, meta): arrays as make_pipeline's batches with N rows (bad examples
  skipped); meta holds the source metadata ('class_names', 'templates', ...) and 'stats'.
  """
  data = config.data if "data" in config else config
  it = make_pipeline(
    data,
    split=split,
    batch_size=chunk,
    mesh=None,
    seed=0,
    tokenizer=tokenizer,
    shuffle=False,
    num_epochs=1,
    drop_remainder=False,
    pp=data.pp_eval,
    process_index=0,
    process_count=1,
    pack=1,
  )  # never packed: evals read examples
  parts: list[dict] = []
  total = 0
  for batch in it:
    parts.append(batch)
    total += len(batch["label"])
    if max_examples is not None and total >= max_examples:
      break
  arrays = {k: np.concatenate([p[k] for p in parts])[:max_examples] for k in parts[0]} if parts else {}
  meta = get_metadata(data, split)
  meta["stats"] = it.stats()
  return arrays, meta
