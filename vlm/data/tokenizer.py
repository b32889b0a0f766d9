"""SentencePiece tokenizer with fixed-length padding, truncation and BOS/EOS.

`Tokenizer(path)` loads any SentencePiece `.model` file (the published SigLIP,
T5 and Gemma tokenizers are SentencePiece). `train_tokenizer` trains the small
tokenizer of the embedded dataset.

Ids of a tokenizer trained here: pad=0, eos=1, unk=2, bos=3 (the first three
as in T5), byte fallback on, so any text encodes. For a loaded model the
special ids are the model's own; a model without a pad piece pads with 0.
"""
from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm


class Tokenizer:
    """Wraps a SentencePiece model. Encodings are int32 numpy arrays."""

    def __init__(self, model_path: str | os.PathLike):
        self.path = os.fspath(model_path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"SentencePiece model not found: {self.path}")
        self._sp = spm.SentencePieceProcessor()
        self._sp.Load(self.path)

    def __reduce__(self):  # picklable for grain worker processes (re-loads from path)
        return (Tokenizer, (self.path,))

    @property
    def vocab_size(self) -> int:
        return int(self._sp.GetPieceSize())

    @property
    def pad_id(self) -> int:
        pad = self._sp.pad_id()
        return int(pad) if pad >= 0 else 0

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    @property
    def bos_id(self) -> int:
        return int(self._sp.bos_id())

    @property
    def unk_id(self) -> int:
        return int(self._sp.unk_id())

    def _ids(self, text: str, add_bos: bool, add_eos: bool) -> list[int]:
        ids = list(self._sp.EncodeAsIds(text))
        if add_bos:
            if self.bos_id < 0:
                raise ValueError(f"{self.path} has no BOS piece; use add_bos=False")
            ids = [self.bos_id] + ids
        if add_eos:
            if self.eos_id < 0:
                raise ValueError(f"{self.path} has no EOS piece; use add_eos=False")
            ids = ids + [self.eos_id]
        return ids

    def encode(self, text: str, length: int | None = None, add_bos: bool = False,
               add_eos: bool = True) -> np.ndarray:
        """Encodes to [n] int32 (or [length]: padded with pad_id / truncated, EOS kept last)."""
        ids = self._ids(text, add_bos, add_eos)
        if length is None:
            return np.asarray(ids, np.int32)
        if len(ids) > length:
            ids = ids[: length - 1] + [self.eos_id] if add_eos else ids[:length]
        out = np.full((length,), self.pad_id, np.int32)
        out[: len(ids)] = ids
        return out

    def encode_batch(self, texts: Sequence[str], length: int, add_bos: bool = False,
                     add_eos: bool = True) -> np.ndarray:
        """Encodes to [N, length] int32."""
        out = np.full((len(texts), length), self.pad_id, np.int32)
        for i, text in enumerate(texts):
            out[i] = self.encode(text, length, add_bos, add_eos)
        return out

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Decodes up to the first EOS; pad and BOS are ignored, and so are ids past the
        vocabulary (a model's output layer is often padded beyond the tokenizer's size)."""
        keep = []
        vocab = self.vocab_size
        for i in np.asarray(ids).reshape(-1).tolist():
            if i == self.eos_id:
                break
            if i == self.pad_id or i == self.bos_id or not 0 <= i < vocab:
                continue
            keep.append(int(i))
        return self._sp.DecodeIds(keep)

    def decode_batch(self, ids: np.ndarray) -> list[str]:
        return [self.decode(row) for row in np.asarray(ids)]


def train_tokenizer(sentences: Iterable[str], model_path: str | os.PathLike, vocab_size: int = 1000) -> str:
    """Trains a unigram SentencePiece model (deterministic: one thread, input order kept)."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(list(sentences)), model_writer=buf, vocab_size=vocab_size,
        model_type="unigram", hard_vocab_limit=False, byte_fallback=True,
        pad_id=0, eos_id=1, unk_id=2, bos_id=3, num_threads=1,
        shuffle_input_sentence=False, character_coverage=1.0, minloglevel=2,
    )
    path = os.fspath(model_path)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return path
