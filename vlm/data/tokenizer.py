"""Tokenizers with fixed-length padding, truncation and BOS/EOS that match the published families.

`load_tokenizer(path, family=None)` is the entry point (`data.tokenizer`, `data.tokenizer_family`):

- a SentencePiece `.model` file, or a directory holding only `spiece.model` / `tokenizer.model`
  -> `Tokenizer` (SentencePiece), with the conventions of `family`;
- an HF `tokenizer.json`, or a directory holding one -> `HFTokenizer` (through `tokenizers`; the
  BPE files of Qwen2 / Llama-3 style LMs), special tokens from `tokenizer_config.json` /
  `special_tokens_map.json` beside it as `AutoTokenizer` reads them.

Why families: the same `.model` file gives different ids under each model's reference tokenizer,
and a model only works on the ids it was trained with. A family is a named preset of the
conventions (`FAMILIES`), checked id for id against transformers (tests/test_tokenizer_parity.py):

  None/'vlm'  the original vlm behaviour: text as SentencePiece encodes it, EOS appended, no BOS,
              pads with the model's pad piece (else 0).
  'siglip'    SiglipTokenizer: canonicalised text (lower-case, `string.punctuation` removed,
              whitespace runs -> one space, stripped), EOS appended, pads with EOS (id 1), as
              big_vision does; SigLIP's last-token pooling reads that padding.
  't5'        T5Tokenizer: text as SentencePiece encodes it, EOS appended, pads with <pad> (0).
  'llama'     LlamaTokenizer (legacy=False): BOS prepended, no EOS; a text that already starts
              with a space gets no extra dummy-prefix space; pads with <unk> (0; Llama has no pad
              piece, and LLaVA / FastChat pad with unk).
  'gemma'     GemmaTokenizer: BOS prepended, no EOS, no dummy prefix, pads with <pad> (0).

An `add_bos` / `add_eos` a caller passes is honoured; the family only sets the defaults (None).
Padding is on the right (HF's Llama / Gemma classes default to the left). Special-token *text*
inside a SentencePiece input (a caption containing "</s>") is encoded as text, as the reference
implementations (big_vision, t5x/seqio, Meta's Llama, gemma_pytorch) do; transformers matches
this with `split_special_tokens=True`. A tokenizer.json's added tokens are matched in the text,
as `tokenizers` does by default.

`train_tokenizer` trains the small tokenizer of the embedded dataset. Ids of a tokenizer trained
here: pad=0, eos=1, unk=2, bos=3 (the first three as in T5), byte fallback on, so any text encodes.
For a loaded model the special ids are the model's own.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import string
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

SPIECE_UNDERLINE = "\u2581"


@dataclasses.dataclass(frozen=True)
class Family:
  """The encoding conventions of one published tokenizer family (see the module docstring).

  add_bos / add_eos: defaults of `encode`. pad: which id pads ('pad_or_0': the pad piece, else 0;
  'pad': the pad piece, required; 'eos': EOS; 'pad_or_unk': the pad piece, else unk).
  text: how text becomes pieces ('sentencepiece': as the model encodes it; 'siglip':
  SiglipTokenizer's canonicalisation; 'llama_metaspace': no dummy prefix before a leading space).
  dummy_prefix: whether the model must add SentencePiece's dummy prefix (None: either).
  """

  name: str
  add_bos: bool
  add_eos: bool
  pad: str
  text: str = "sentencepiece"
  dummy_prefix: bool | None = None


FAMILIES: dict[str, Family] = {
  "vlm": Family("vlm", add_bos=False, add_eos=True, pad="pad_or_0"),
  "siglip": Family("siglip", add_bos=False, add_eos=True, pad="eos", text="siglip"),
  "t5": Family("t5", add_bos=False, add_eos=True, pad="pad"),
  "llama": Family("llama", add_bos=True, add_eos=False, pad="pad_or_unk", text="llama_metaspace", dummy_prefix=True),
  "gemma": Family("gemma", add_bos=True, add_eos=False, pad="pad", dummy_prefix=False),
}


def get_family(family: str | Family | None) -> Family:
  """The `Family` named `family` (None: 'vlm'); ValueError names the known ones."""
  if isinstance(family, Family):
    return family
  name = "vlm" if family is None else str(family).lower()
  if name not in FAMILIES:
    raise ValueError(f"unknown tokenizer family {family!r}; known: {sorted(FAMILIES)} (or None)")
  return FAMILIES[name]


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def siglip_canonicalize(text: str, lower: bool = True) -> str:
  """SiglipTokenizer.canonicalize_text (from big_vision's prompt engineering): lower-case, drop the
  ASCII `string.punctuation`, collapse whitespace runs (`\\s+`, unicode) to one space, strip."""
  if lower:
    text = text.lower()
  text = text.translate(_PUNCTUATION)
  text = re.sub(r"\s+", " ", text)
  return text.strip()


class _Base:
  """Shared fixed-length logic. Subclasses give `_content(text)`, the special ids, `_decode(ids)`."""

  path: str

  def _content(self, text: str) -> list[int]:
    raise NotImplementedError

  def _decode(self, ids: list[int]) -> str:
    raise NotImplementedError

  def _affixes(self, add_bos: bool | None, add_eos: bool | None) -> tuple[list[int], list[int]]:
    raise NotImplementedError

  def _special(self, ok: bool, what: str) -> list[int]:
    if not ok:
      return []
    i = self.bos_id if what == "BOS" else self.eos_id
    if i < 0:
      raise ValueError(f"{self.path} has no {what} token; use add_{what.lower()}=False")
    return [i]

  def encode(
    self, text: str, length: int | None = None, add_bos: bool | None = None, add_eos: bool | None = None
  ) -> np.ndarray:
    """Encodes to [n] int32 (or [length]: padded with pad_id / truncated, EOS kept last).
    add_bos / add_eos None: the family's (or the tokenizer.json's) default."""
    prefix, suffix = self._affixes(add_bos, add_eos)
    head = prefix + self._content(text)
    ids = head + suffix
    if length is None:
      return np.asarray(ids, np.int32)
    if len(ids) > length:  # truncate the text, keep the specials (as HF's truncation=True does)
      keep = length - len(suffix)
      ids = head[:keep] + suffix if keep >= 0 else suffix[len(suffix) - length :]
    out = np.full((length,), self.pad_id, np.int32)
    out[: len(ids)] = ids
    return out

  def encode_batch(
    self, texts: Sequence[str], length: int, add_bos: bool | None = None, add_eos: bool | None = None
  ) -> np.ndarray:
    """Encodes to [N, length] int32."""
    out = np.full((len(texts), length), self.pad_id, np.int32)
    for i, text in enumerate(texts):
      out[i] = self.encode(text, length, add_bos, add_eos)
    return out

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Decodes up to the first EOS; pad and BOS are ignored, and so are ids past the
    vocabulary (a model's output layer is often padded beyond the tokenizer's size)."""
    keep = []
    vocab, eos, bos = self.vocab_size, self.eos_id, self.bos_id
    pad = self._pad_or_none()
    for i in np.asarray(ids).reshape(-1).tolist():
      if i == eos:
        break
      if i == pad or i == bos or not 0 <= i < vocab:
        continue
      keep.append(int(i))
    return self._decode(keep)

  def decode_batch(self, ids: np.ndarray) -> list[str]:
    return [self.decode(row) for row in np.asarray(ids)]

  def _pad_or_none(self) -> int | None:
    return self.pad_id


class Tokenizer(_Base):
  """A SentencePiece model with the conventions of `family` (FAMILIES). Encodings are int32 numpy."""

  def __init__(self, model_path: str | os.PathLike, family: str | Family | None = None):
    self.family = get_family(family)
    self.path = os.fspath(model_path)
    if not os.path.exists(self.path):
      raise FileNotFoundError(f"SentencePiece model not found: {self.path}")
    self._sp = spm.SentencePieceProcessor()
    self._sp.Load(self.path)
    self._pad = self._resolve_pad()
    fam = self.family
    if fam.dummy_prefix is not None:
      pieces = self._sp.EncodeAsPieces("a")
      has = bool(pieces) and pieces[0].startswith(SPIECE_UNDERLINE)
      if has != fam.dummy_prefix:
        raise ValueError(
          f"tokenizer family {fam.name!r} expects a SentencePiece model "
          f"{'with' if fam.dummy_prefix else 'without'} add_dummy_prefix; "
          f"{self.path} {'adds' if has else 'does not add'} one"
        )
    if fam.text == "siglip":  # SiglipTokenizer encodes "<unk>" + text and drops the "<unk>" pieces
      self._unk_len = len(self._sp.EncodeAsIds("<unk>"))

  def __reduce__(self):  # picklable for grain worker processes (re-loads from path)
    return (Tokenizer, (self.path, self.family))

  def _resolve_pad(self) -> int:
    pad, rule = int(self._sp.pad_id()), self.family.pad
    if rule == "eos":
      if self.eos_id < 0:
        raise ValueError(f"tokenizer family {self.family.name!r} pads with EOS but {self.path} has no EOS piece")
      return self.eos_id
    if pad >= 0:
      return pad
    if rule == "pad":
      raise ValueError(f"tokenizer family {self.family.name!r} pads with the pad piece but {self.path} has none")
    if rule == "pad_or_unk":
      return self.unk_id
    return 0

  @property
  def vocab_size(self) -> int:
    return int(self._sp.GetPieceSize())

  @property
  def pad_id(self) -> int:
    return self._pad

  @property
  def eos_id(self) -> int:
    return int(self._sp.eos_id())

  @property
  def bos_id(self) -> int:
    return int(self._sp.bos_id())

  @property
  def unk_id(self) -> int:
    return int(self._sp.unk_id())

  def _affixes(self, add_bos, add_eos):
    fam = self.family
    return (
      self._special(fam.add_bos if add_bos is None else add_bos, "BOS"),
      self._special(fam.add_eos if add_eos is None else add_eos, "EOS"),
    )

  def _content(self, text: str) -> list[int]:
    sp, kind = self._sp, self.family.text
    if kind == "siglip":  # SiglipTokenizer.tokenize -> _tokenize, step by step
      text = siglip_canonicalize(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "))
      ids = list(sp.EncodeAsIds("<unk>" + text))
      # (Its later "drop a leading ▁ before a special token" never fires here: the canonical
      # text has no "<", "/", ">", and special-token text is not parsed; see the docstring.)
      return ids[self._unk_len :] if len(ids) >= self._unk_len else ids
    if kind == "llama_metaspace" and text[:1] in (" ", SPIECE_UNDERLINE):
      # HF's Metaspace(prepend_scheme='first') prepends "▁" only to a text not already starting
      # with one; SentencePiece always does. Its dummy prefix stands in for the first space.
      if len(text) > 1:
        return list(sp.EncodeAsIds(text[1:]))
      return self._lone_underline()
    return list(sp.EncodeAsIds(text))

  def _lone_underline(self) -> list[int]:
    """BPE of the single symbol "▁": its piece, else its UTF-8 bytes (byte fallback), else unk."""
    sp = self._sp
    i = sp.PieceToId(SPIECE_UNDERLINE)
    if sp.IdToPiece(i) == SPIECE_UNDERLINE and not sp.IsUnknown(i):
      return [i]
    byte_ids = [sp.PieceToId(f"<0x{b:02X}>") for b in SPIECE_UNDERLINE.encode()]
    if all(sp.IsByte(b) for b in byte_ids):
      return byte_ids
    return [self.unk_id]

  def _decode(self, ids: list[int]) -> str:
    return self._sp.DecodeIds(ids)


def _token_content(value) -> str | None:
  """A special-token entry of tokenizer_config.json / special_tokens_map.json: str, AddedToken dict or null."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, dict) and isinstance(value.get("content"), str):
    return value["content"]
  raise TypeError(f"not a token: {value!r}")


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read {path}: {e}") from e


class HFTokenizer(_Base):
  """An HF `tokenizer.json` through `tokenizers` (tested: byte-level BPE); same interface as `Tokenizer`.

  Special tokens (bos/eos/pad/unk) come from `tokenizer_config.json` and `special_tokens_map.json`
  beside the file (the two must agree), the pad token else from the file's own padding section, as
  `AutoTokenizer` resolves them; a missing one is -1 (pad: an error when padding is needed). The
  default specials around a text (add_bos / add_eos None) are what the file's post-processor adds
  (e.g. Llama-3's BOS; none for Qwen2): transformers 5 ignores the config's `add_bos_token` /
  `add_eos_token` beside a tokenizer.json, and so does this. Explicit add_bos / add_eos replace them.
  """

  _KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")

  def __init__(self, path: str | os.PathLike):
    from tokenizers import Tokenizer as _TkTokenizer

    self.path = os.fspath(path)
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f"tokenizer.json not found: {self.path}")
    try:
      self._tk = _TkTokenizer.from_file(self.path)
    except Exception as e:  # noqa: BLE001 - the library raises a bare Exception
      raise ValueError(f"{self.path} is not a `tokenizers` tokenizer.json: {e}") from e
    self._tk.no_padding()  # padding / truncation baked into the file would change encode()
    self._tk.no_truncation()
    directory = os.path.dirname(os.path.abspath(self.path))
    cfg_path = os.path.join(directory, "tokenizer_config.json")
    map_path = os.path.join(directory, "special_tokens_map.json")
    cfg = _read_json(cfg_path) if os.path.isfile(cfg_path) else {}
    smap = _read_json(map_path) if os.path.isfile(map_path) else {}

    tokens: dict[str, tuple[str, str]] = {}  # key -> (token, where it came from)
    for key in self._KEYS:
      found = []
      for where, src in ((cfg_path, cfg), (map_path, smap)):
        if src.get(key) is not None:
          try:
            found.append((_token_content(src[key]), where))
          except TypeError as e:
            raise ValueError(f"{where}: {key}: {e}") from None
      if len({t for t, _ in found}) > 1:
        raise ValueError(f"contradictory {key}: {found[0][1]} says {found[0][0]!r}, {found[1][1]} says {found[1][0]!r}")
      if found:
        tokens[key] = found[0]
    with open(self.path, encoding="utf-8") as f:
      padding = json.load(f).get("padding") or {}
    if "pad_token" not in tokens and padding.get("pad_token"):
      tokens["pad_token"] = (padding["pad_token"], f"{self.path} (padding.pad_token)")

    self._ids: dict[str, int] = {}
    for key, (tok, where) in tokens.items():
      i = self._tk.token_to_id(tok)
      if i is None:
        raise ValueError(f"{where}: {key} {tok!r} is not in {self.path}'s vocabulary or added tokens")
      self._ids[key] = int(i)
    self._where = {key: where for key, (_, where) in tokens.items()}
    self._cfg_path, self._map_path = cfg_path, map_path

    # transformers 5 ignores tokenizer_config's add_bos_token / add_eos_token when a tokenizer.json
    # is present (PreTrainedTokenizerBase._from_pretrained pops them): the post-processor decides.
    self._prefix, self._suffix = self._probe_post_processor()

  def __reduce__(self):
    return (HFTokenizer, (self.path,))

  def _probe_post_processor(self) -> tuple[list[int], list[int]]:
    """The ids the file's post-processor puts before / after a single text."""
    if self._tk.post_processor is None:
      return [], []
    enc = self._tk.encode("a b c", add_special_tokens=False)
    content, full = enc.ids, self._tk.post_process(enc).ids
    for i in range(len(full) - len(content) + 1):
      if full[i : i + len(content)] == content:
        return full[:i], full[i + len(content) :]
    raise ValueError(f"{self.path}: cannot tell which ids its post_processor adds")

  @property
  def vocab_size(self) -> int:
    return int(self._tk.get_vocab_size(with_added_tokens=True))

  @property
  def pad_id(self) -> int:
    if "pad_token" not in self._ids:
      raise ValueError(
        f"{self.path}: no pad_token in {self._cfg_path} or {self._map_path} (nor a padding "
        "section in tokenizer.json); set pad_token there to pad to a fixed length"
      )
    return self._ids["pad_token"]

  def _pad_or_none(self) -> int | None:
    return self._ids.get("pad_token")

  @property
  def eos_id(self) -> int:
    return self._ids.get("eos_token", -1)

  @property
  def bos_id(self) -> int:
    return self._ids.get("bos_token", -1)

  @property
  def unk_id(self) -> int:
    return self._ids.get("unk_token", -1)

  @property
  def default_prefix(self) -> list[int]:
    return list(self._prefix)

  @property
  def default_suffix(self) -> list[int]:
    return list(self._suffix)

  def _affixes(self, add_bos, add_eos):
    return (
      list(self._prefix) if add_bos is None else self._special(add_bos, "BOS"),
      list(self._suffix) if add_eos is None else self._special(add_eos, "EOS"),
    )

  def _content(self, text: str) -> list[int]:
    return list(self._tk.encode(text, add_special_tokens=False).ids)

  def _decode(self, ids: list[int]) -> str:
    return self._tk.decode(ids, skip_special_tokens=False)


_SP_NAMES = ("spiece.model", "tokenizer.model")


def load_tokenizer(path: str | os.PathLike, family: str | Family | None = None) -> Tokenizer | HFTokenizer:
  """A `.model` file -> `Tokenizer(path, family)`; a `tokenizer.json` (any `.json`) file -> `HFTokenizer`;
  a directory -> its tokenizer.json, or its spiece.model / tokenizer.model when it has no tokenizer.json
  or a family is given (a family describes SentencePiece conventions; a tokenizer.json has its own)."""
  fam = None if family is None else get_family(family)
  p = os.fspath(path)
  if os.path.isdir(p):
    sp_files = [os.path.join(p, n) for n in _SP_NAMES if os.path.isfile(os.path.join(p, n))]
    hf_file = os.path.join(p, "tokenizer.json")
    if os.path.isfile(hf_file) and not (fam is not None and sp_files):
      p = hf_file
    elif sp_files:
      p = sp_files[0]
    else:
      raise FileNotFoundError(f"no tokenizer in directory {p}: expected tokenizer.json, {' or '.join(_SP_NAMES)}")
  elif not os.path.exists(p):
    raise FileNotFoundError(f"tokenizer not found: {p}")
  if p.endswith(".json"):
    if fam is not None and fam.name != "vlm":
      raise ValueError(
        f"tokenizer family {fam.name!r} applies to SentencePiece models, but {p} is a "
        "tokenizer.json (it carries its own conventions): drop the family"
      )
    return HFTokenizer(p)
  if p.endswith(".model"):
    return Tokenizer(p, fam)
  raise ValueError(
    f"unrecognised tokenizer file {p}: expected a SentencePiece .model, a tokenizer.json, or a directory holding one"
  )


def train_tokenizer(sentences: Iterable[str], model_path: str | os.PathLike, vocab_size: int = 1000) -> str:
  """Trains a unigram SentencePiece model (deterministic: one thread, input order kept)."""
  buf = io.BytesIO()
  spm.SentencePieceTrainer.Train(
    sentence_iterator=iter(list(sentences)),
    model_writer=buf,
    vocab_size=vocab_size,
    model_type="unigram",
    hard_vocab_limit=False,
    byte_fallback=True,
    pad_id=0,
    eos_id=1,
    unk_id=2,
    bos_id=3,
    num_threads=1,
    shuffle_input_sentence=False,
    character_coverage=1.0,
    minloglevel=2,
  )
  path = os.fspath(model_path)
  with open(path, "wb") as f:
    f.write(buf.getvalue())
  return path
