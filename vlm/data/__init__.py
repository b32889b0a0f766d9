"""Data: embedded scenes dataset, digits, sources, preprocessing, tokenizer, grain pipeline.

Entry points for the trainer:
    get_default_config() -> ConfigDict for `config.data`; check_config(config.data)
    make_pipeline(config.data, split=..., batch_size=..., mesh=..., seed=..., tokenizer=...)
    load_split_numpy(config.data, split) -> (arrays, metadata)
    get_tokenizer(config.data) -> Tokenizer | HFTokenizer (vlm.data.tokenizer.load_tokenizer)

The per-example steps the pipeline runs are the registered ops of vlm.data.example_ops
(`known_ops()`, `make_ops(config.data, pp, tokenizer=..., source=...)`); the image pp ops inside
them are vlm.data.preprocess's (`parse_pp`, `known_ops`).
"""

from vlm.data.pipeline import (
  DataIterator,
  check_config,
  get_default_config,
  get_metadata,
  get_tokenizer,
  load_split_numpy,
  make_pipeline,
  make_source,
)
from vlm.data.preprocess import known_ops, parse_pp
from vlm.data.tokenizer import HFTokenizer, Tokenizer, load_tokenizer, train_tokenizer

__all__ = [
  "DataIterator",
  "HFTokenizer",
  "Tokenizer",
  "check_config",
  "get_default_config",
  "get_metadata",
  "get_tokenizer",
  "known_ops",
  "load_split_numpy",
  "load_tokenizer",
  "make_pipeline",
  "make_source",
  "parse_pp",
  "train_tokenizer",
]
