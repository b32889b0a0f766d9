"""Tokenizer families and tokenizer.json files match transformers id for id.

Small SentencePiece models are trained here with the special-id layouts and options each family's
published model has (T5 / SigLIP: unigram, pad=0 eos=1 unk=2, no bos, nmt_nfkc; Llama: BPE,
unk=0 bos=1 eos=2, no pad, byte fallback, identity normalisation, dummy prefix; Gemma: BPE,
pad=0 eos=1 bos=2 unk=3, byte fallback, no dummy prefix), and the transformers classes of those
families are built from the same `.model` files (in transformers 5: SiglipTokenizer is
SentencePiece-backed; T5Tokenizer, LlamaTokenizer and GemmaTokenizer are tokenizers-backed
conversions of the .model). A byte-level BPE tokenizer.json (Qwen2 / Llama-3 style) is trained
with `tokenizers` and compared with AutoTokenizer / PreTrainedTokenizerFast / Qwen2Tokenizer.
"""

import io
import json
import os
import pickle
import random
import warnings

import ml_collections
import numpy as np
import pytest
import sentencepiece as spm

from vlm.data import pipeline
from vlm.data.tokenizer import FAMILIES, HFTokenizer, Tokenizer, load_tokenizer, siglip_canonicalize

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

STRINGS = [
  "",
  " ",
  "  ",
  "a",
  "A photo of a cat.",
  "Hello, World!",
  "HELLO world",
  "  leading spaces",
  "trailing spaces   ",
  "multiple   inner    spaces",
  "tab\tseparated\tvalues",
  "new\nline",
  "\n\nleading newlines",
  "trailing newline\n",
  "mixed \t \n whitespace",
  "café naïve résumé über",
  "Ångström façade",
  "東京の猫の写真",
  "猫 and 犬",
  "emoji 😀🐶!",
  "😀",
  "digits 0123456789",
  "year 2024, pi 3.14159",
  "100% sure",
  "it's don't can't",
  "e-mail U.S.A. (note) [tag]",
  "\"quoted\" 'single'",
  "#hashtag @user http://example.com/a?b=c&d=e",
  "a/b\\c|d~e^f",
  "ALL CAPS SENTENCE!!!",
  "MiXeD CaSe WoRdS",
  "punctuation...!?;:",
  "—em dash– en dash",
  "«guillemets» „quotes“",
  "non\u00a0breaking space",
  "zero\u200bwidth",
  "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
  "ﬁ ligature",
  "x² ½ ℃",
  "Привет мир",
  "مرحبا بالعالم",
  "नमस्ते",
  "한국어 텍스트",
  "the red dog on the street",
  "The Quick Brown Fox Jumps Over The Lazy Dog.",
  "a" * 40,
  "word " * 30,
  "▁underline▁char",
  " ▁ leading underline",
  "▁",
  "under_score snake_case",
  "$5.00 €3 ¥100",
  " a photo of a dog ",
  "New York, Paris & 東京",
]
SPECIAL_TEXT = ["<s> literal", "</s>", "<unk>", "<pad>", "a </s> b", "<bos>x<eos>"]
LENGTHS = (4, 9, 16)


def _corpus(n=500, seed=0):
  rng = random.Random(seed)
  words = (
    "the a an of to in on with red blue green small large dog cat bird photo picture image man "
    "woman child street city tree car house water sky Hello World New York Paris café naïve résumé "
    "über 東京 猫 写真 犬 😀 🐶 year 2024 3.14 100% it's don't e-mail U.S.A. (note) [tag] \"quote\" "
    "#1 @user"
  ).split()
  out = []
  for _ in range(n):
    s = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
    if rng.random() < 0.3:
      s = s.capitalize()
    if rng.random() < 0.3:
      s += rng.choice([".", "!", "?", ",", ";", ":"])
    if rng.random() < 0.1:
      s = s.replace(" ", "  ", 1)
    if rng.random() < 0.05:
      s = s + "\n" + s
    out.append(s)
  return out


_SPM = dict(
  t5=("spiece.model", dict(model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1)),
  siglip=("spiece.model", dict(model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1)),
  llama=(
    "tokenizer.model",
    dict(
      model_type="bpe",
      unk_id=0,
      bos_id=1,
      eos_id=2,
      pad_id=-1,
      byte_fallback=True,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      split_digits=True,
      allow_whitespace_only_pieces=True,
    ),
  ),
  gemma=(
    "tokenizer.model",
    dict(
      model_type="bpe",
      pad_id=0,
      eos_id=1,
      bos_id=2,
      unk_id=3,
      byte_fallback=True,
      pad_piece="<pad>",
      eos_piece="<eos>",
      bos_piece="<bos>",
      unk_piece="<unk>",
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      split_digits=True,
      allow_whitespace_only_pieces=True,
      add_dummy_prefix=False,
    ),
  ),
)


def _train_spm(path, **kw):
  buf = io.BytesIO()
  spm.SentencePieceTrainer.Train(
    sentence_iterator=iter(_corpus()),
    model_writer=buf,
    vocab_size=700,
    hard_vocab_limit=False,
    num_threads=1,
    shuffle_input_sentence=False,
    character_coverage=0.9995,
    minloglevel=2,
    **kw,
  )
  with open(path, "wb") as f:
    f.write(buf.getvalue())
  return str(path)


@pytest.fixture(scope="module")
def spm_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("spm")
  out = {}
  for fam, (name, kw) in _SPM.items():
    d = root / fam
    d.mkdir()
    _train_spm(d / name, **kw)
    out[fam] = d
  return out


def _hf(fam, d, **kw):
  """The transformers tokenizer of `fam` for the .model in `d`, with its published tokenizer_config
  settings (Llama / Gemma: add_bos_token=True, add_eos_token=False; Llama pads with unk here)."""
  t = transformers
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    if fam == "t5":
      return t.T5Tokenizer.from_pretrained(str(d), **kw)
    if fam == "siglip":
      return t.SiglipTokenizer.from_pretrained(str(d), **kw)
    if fam == "llama":
      return t.LlamaTokenizer.from_pretrained(str(d), add_bos_token=True, add_eos_token=False, pad_token="<unk>", **kw)
    return t.GemmaTokenizer.from_pretrained(str(d), add_bos_token=True, add_eos_token=False, **kw)


@pytest.fixture(scope="module")
def hf_sp(spm_dirs):
  return {fam: _hf(fam, d) for fam, d in spm_dirs.items()}


def _vlm(spm_dirs, fam, family=None):
  return load_tokenizer(spm_dirs[fam], fam if family is None else family)


def _hf_ids(t, texts, length=None):
  if length is None:
    return [t(s)["input_ids"] for s in texts]
  return t(list(texts), padding="max_length", max_length=length, truncation=True, padding_side="right")["input_ids"]


@pytest.mark.parametrize("fam", ["t5", "siglip", "llama", "gemma"])
def test_family_matches_transformers(spm_dirs, hf_sp, fam):
  tok, ref = _vlm(spm_dirs, fam), hf_sp[fam]
  assert isinstance(tok, Tokenizer) and tok.family.name == fam
  assert (
    type(ref).__name__
    == {"t5": "T5Tokenizer", "siglip": "SiglipTokenizer", "llama": "LlamaTokenizer", "gemma": "GemmaTokenizer"}[fam]
  )
  assert (tok.eos_id, tok.unk_id, tok.pad_id) == (ref.eos_token_id, ref.unk_token_id, ref.pad_token_id)
  assert tok.bos_id == (-1 if ref.bos_token_id is None else ref.bos_token_id)
  want = _hf_ids(ref, STRINGS)
  got = [tok.encode(s).tolist() for s in STRINGS]
  bad = [(s, w, g) for s, w, g in zip(STRINGS, want, got) if w != g]
  assert not bad, f"{len(bad)}/{len(STRINGS)} differ, first: {bad[:3]}"
  for length in LENGTHS:  # fixed length: padding id, truncation (specials kept), right padding
    np.testing.assert_array_equal(
      tok.encode_batch(STRINGS, length), np.asarray(_hf_ids(ref, STRINGS, length)), err_msg=f"{fam} length {length}"
    )


def test_old_default_differs_where_the_family_matters(spm_dirs, hf_sp):
  """Without the family the ids differ from each reference: the option is what makes them match."""
  for fam in ("siglip", "llama", "gemma"):
    old = _vlm(spm_dirs, fam, "vlm")
    want = _hf_ids(hf_sp[fam], STRINGS, 16)
    assert sum(w != g for w, g in zip(want, old.encode_batch(STRINGS, 16).tolist())) > len(STRINGS) // 2, fam
  # SigLIP: canonicalisation alone (same specials, same EOS) and padding alone each change the ids
  old, ref = _vlm(spm_dirs, "siglip", "vlm"), hf_sp["siglip"]
  assert old.encode("Hello, World!").tolist() != ref("Hello, World!")["input_ids"]
  assert old.encode(siglip_canonicalize("Hello, World!")).tolist() == ref("Hello, World!")["input_ids"]
  assert old.pad_id == 0 and ref.pad_token_id == 1 == _vlm(spm_dirs, "siglip").pad_id
  # Llama: with BOS on / EOS off, only the leading-space handling remains, and it matters
  old, ref = _vlm(spm_dirs, "llama", "vlm"), hf_sp["llama"]
  for s in ("  leading spaces", " a photo of a dog ", "▁underline▁char", " "):
    assert old.encode(s, add_bos=True, add_eos=False).tolist() != ref(s)["input_ids"], s
    assert _vlm(spm_dirs, "llama").encode(s).tolist() == ref(s)["input_ids"], s


def test_siglip_canonicalize_is_transformers(hf_sp):
  ref = hf_sp["siglip"]
  for s in STRINGS + SPECIAL_TEXT + ["  A\u3000B\x0bC  ", "{}-{}", "tab\t\tend\t", "▁x▁"]:
    assert siglip_canonicalize(s) == ref.canonicalize_text(s), s
  assert siglip_canonicalize("  Hello,   World!\n") == "hello world"
  assert siglip_canonicalize("Don't", lower=False) == "Dont"


def test_explicit_bos_eos_are_honoured(spm_dirs, spm_dirs_hf_eos):
  sig, llama = _vlm(spm_dirs, "siglip"), _vlm(spm_dirs, "llama")
  assert sig.encode("a cat", add_eos=False).tolist()[-1] != sig.eos_id
  assert llama.encode("a cat").tolist()[0] == llama.bos_id and llama.encode("a cat")[-1] != llama.eos_id
  ref = spm_dirs_hf_eos  # LlamaTokenizer with add_eos_token=True, add_bos_token=False
  for s in STRINGS[:20]:
    assert llama.encode(s, add_bos=False, add_eos=True).tolist() == ref(s)["input_ids"], s
  with pytest.raises(ValueError, match="no BOS"):
    _vlm(spm_dirs, "t5").encode("a", add_bos=True)
  # the old default family keeps the old defaults (EOS on, BOS off) for callers that pass none
  old = load_tokenizer(spm_dirs["t5"])
  assert old.family.name == "vlm" and old.encode("a").tolist()[-1] == old.eos_id


@pytest.fixture(scope="module")
def spm_dirs_hf_eos(spm_dirs):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return transformers.LlamaTokenizer.from_pretrained(str(spm_dirs["llama"]), add_bos_token=False, add_eos_token=True)


def test_special_token_text_is_text(spm_dirs):
  """ "</s>" inside a text is text (as big_vision, t5x, Meta's Llama, gemma_pytorch encode it); that is
  transformers with split_special_tokens=True, except T5Tokenizer, whose Unigram vocabulary still
  matches "</s>" (measured: '</s>' -> [▁, </s>, </s>] with either setting)."""
  for fam in ("siglip", "llama", "gemma"):
    tok, ref = _vlm(spm_dirs, fam), _hf(fam, spm_dirs[fam], split_special_tokens=True)
    for s in SPECIAL_TEXT:
      assert tok.encode(s).tolist() == ref(s)["input_ids"], (fam, s)
  for fam in ("t5", "siglip", "llama", "gemma"):
    tok = _vlm(spm_dirs, fam)
    for s in SPECIAL_TEXT:
      ids = tok.encode(s, add_bos=False, add_eos=False).tolist()
      assert {tok.eos_id, tok.bos_id, tok.pad_id} & set(ids) <= {tok.unk_id}, (fam, s, ids)


def test_decode_matches_transformers(spm_dirs, hf_sp):
  for fam in ("t5", "siglip", "llama", "gemma"):
    tok, ref = _vlm(spm_dirs, fam), hf_sp[fam]
    n = 0
    for s in STRINGS:
      ids = tok.encode(s, 256)  # untruncated (a cut byte sequence renders differently)
      if tok.unk_id in tok.encode(s).tolist():  # HF drops <unk> when skipping specials; SP writes " ⁇ "
        continue
      assert tok.decode(ids) == ref.decode(ids.tolist(), skip_special_tokens=True), (fam, s)
      n += 1
    assert n >= 20, fam
  llama = _vlm(spm_dirs, "llama")  # byte fallback: any text without edge spaces comes back
  for s in ("A photo of a cat.", "東京の猫の写真", "emoji 😀🐶!", "Привет мир", "tab\tnew\nline"):
    assert llama.decode(llama.encode(s, 64)) == s
  sig = _vlm(spm_dirs, "siglip")
  assert sig.decode(sig.encode("A Photo, of a CAT!", 16)) == "a photo of a cat"


def test_pickle_keeps_family(spm_dirs, tmp_path):
  for fam in FAMILIES:
    tok = load_tokenizer(spm_dirs["siglip" if fam == "vlm" else fam], fam)
    back = pickle.loads(pickle.dumps(tok))
    assert back.family == tok.family
    np.testing.assert_array_equal(back.encode_batch(STRINGS, 12), tok.encode_batch(STRINGS, 12))


def test_family_errors(spm_dirs):
  with pytest.raises(ValueError, match=r"'bert'.*known: \['gemma', 'llama', 'siglip', 't5', 'vlm'\]"):
    load_tokenizer(spm_dirs["t5"], "bert")
  with pytest.raises(ValueError, match=r"'t5' pads with the pad piece but .*tokenizer.model has none"):
    load_tokenizer(spm_dirs["llama"], "t5")  # Llama's layout has no pad piece
  with pytest.raises(ValueError, match=r"'gemma' expects .*without add_dummy_prefix; .*spiece.model adds one"):
    load_tokenizer(spm_dirs["t5"], "gemma")
  with pytest.raises(ValueError, match=r"'llama' expects .*with add_dummy_prefix"):
    load_tokenizer(spm_dirs["gemma"], "llama")


# ---- HF tokenizer.json ----------------------------------------------------------------------------

_QWEN2_SPLIT = (
  r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
  r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_JSON_STRINGS = STRINGS + ["<|im_start|>user\nhi<|im_end|>", "x<|endoftext|>y", "<|begin_of_text|>hi", "a <|eot_id|>"]


def _train_bpe_json(d, style):
  from tokenizers import Regex, Tokenizer as Tk, decoders, models, pre_tokenizers, processors, trainers

  d.mkdir()
  tk = Tk(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.Sequence(
    [  # Qwen2's: regex split, then bytes -> unicode
      pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
  )
  tk.decoder = decoders.ByteLevel()
  tk.train_from_iterator(
    _corpus(),
    trainers.BpeTrainer(vocab_size=600, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
  )
  if style == "qwen2":
    tk.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
  else:  # Llama-3: a template post-processor adds BOS
    tk.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])
    bos = "<|begin_of_text|>"
    tk.post_processor = processors.TemplateProcessing(
      single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tk.token_to_id(bos))]
    )
  tk.save(str(d / "tokenizer.json"))
  return d


def _write(path, obj):
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f)


@pytest.fixture(scope="module")
def json_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("hfjson")
  qwen, llama3 = _train_bpe_json(root / "qwen2", "qwen2"), _train_bpe_json(root / "llama3", "llama3")
  _write(
    qwen / "tokenizer_config.json",
    {
      "tokenizer_class": "Qwen2Tokenizer",
      "bos_token": None,
      "eos_token": "<|endoftext|>",
      "pad_token": "<|endoftext|>",
      "unk_token": None,
      "add_prefix_space": False,
    },
  )
  _write(
    llama3 / "tokenizer_config.json",
    {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
  )
  _write(
    llama3 / "special_tokens_map.json",
    {"bos_token": {"content": "<|begin_of_text|>", "lstrip": False}, "eos_token": "<|end_of_text|>"},
  )
  return dict(qwen2=qwen, llama3=llama3)


def _auto(d, cls=None, **kw):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    if cls is not None:
      return cls.from_pretrained(str(d), **kw)
    return transformers.AutoTokenizer.from_pretrained(str(d), **kw)


@pytest.mark.parametrize("style", ["qwen2", "llama3"])
def test_tokenizer_json_matches_transformers(json_dirs, style):
  d = json_dirs[style]
  tok = load_tokenizer(d)
  assert isinstance(tok, HFTokenizer) and load_tokenizer(d / "tokenizer.json").path == tok.path
  refs = [
    _auto(d),
    transformers.PreTrainedTokenizerFast(
      tokenizer_file=str(d / "tokenizer.json"),
      **{k: v for k, v in json.loads((d / "tokenizer_config.json").read_text()).items() if k.endswith("_token")},
    ),
  ]
  if style == "qwen2":
    refs.append(_auto(d, transformers.Qwen2Tokenizer))
  assert type(refs[0]).__name__ == {"qwen2": "Qwen2Tokenizer", "llama3": "TokenizersBackend"}[style]
  for ref in refs:
    assert tok.vocab_size == len(ref)
    for mine, theirs in (
      (tok.bos_id, ref.bos_token_id),
      (tok.eos_id, ref.eos_token_id),
      (tok.unk_id, ref.unk_token_id),
    ):
      assert mine == (-1 if theirs is None else theirs)
    got = [tok.encode(s).tolist() for s in _JSON_STRINGS]
    assert got == [ref(s)["input_ids"] for s in _JSON_STRINGS]
    if style == "qwen2":
      assert tok.pad_id == ref.pad_token_id
      for length in LENGTHS:
        np.testing.assert_array_equal(
          tok.encode_batch(_JSON_STRINGS, length), np.asarray(_hf_ids(ref, _JSON_STRINGS, length))
        )
  if style == "llama3":
    assert tok.default_prefix == [tok.bos_id] and tok.encode("hi").tolist()[0] == tok.bos_id
    with pytest.raises(ValueError, match=r"no pad_token in .*tokenizer_config.json"):
      tok.encode("hi", 8)
  else:
    assert tok.default_prefix == [] == tok.default_suffix
  for s in STRINGS:  # byte-level BPE: lossless
    assert tok.decode(tok.encode(s, add_bos=False, add_eos=False)) == s
  assert tok.decode(tok.encode("a cat", add_eos=True).tolist() + [5, 6]) == "a cat"  # stops at EOS
  back = pickle.loads(pickle.dumps(tok))
  assert [back.encode(s).tolist() for s in _JSON_STRINGS] == [tok.encode(s).tolist() for s in _JSON_STRINGS]


def test_tokenizer_json_ignores_add_bos_eos_in_config(json_dirs, tmp_path):
  """Beside a tokenizer.json, transformers 5 drops tokenizer_config's `add_bos_token` / `add_eos_token`
  (the post-processor decides); so does vlm. An explicit add_bos / add_eos still wins."""
  d = tmp_path / "l3eos"
  d.mkdir()
  (d / "tokenizer.json").write_text((json_dirs["llama3"] / "tokenizer.json").read_text())
  _write(
    d / "tokenizer_config.json",
    {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": "<|begin_of_text|>",
      "eos_token": "<|end_of_text|>",
      "pad_token": "<|eot_id|>",
      "add_bos_token": False,
      "add_eos_token": True,
    },
  )
  tok, ref = load_tokenizer(d), _auto(d)
  assert tok.default_prefix == [tok.bos_id] and tok.default_suffix == []
  assert [tok.encode(s).tolist() for s in _JSON_STRINGS] == [ref(s)["input_ids"] for s in _JSON_STRINGS]
  np.testing.assert_array_equal(tok.encode_batch(_JSON_STRINGS, 9), np.asarray(_hf_ids(ref, _JSON_STRINGS, 9)))
  ids = tok.encode("a cat", 9, add_bos=False, add_eos=True).tolist()  # explicit wins
  assert ids[0] != tok.bos_id and ids[ids.index(tok.eos_id) + 1 :] == [tok.pad_id] * (8 - ids.index(tok.eos_id))
  explicit = transformers.PreTrainedTokenizerFast(
    tokenizer_file=str(d / "tokenizer.json"),
    add_bos_token=False,
    add_eos_token=True,
    bos_token="<|begin_of_text|>",
    eos_token="<|end_of_text|>",
  )
  for s in _JSON_STRINGS:
    assert tok.encode(s, add_bos=False, add_eos=True).tolist() == explicit(s)["input_ids"], s


def test_tokenizer_json_errors(json_dirs, tmp_path):
  src = (json_dirs["llama3"] / "tokenizer.json").read_text()

  def case(name, config=None, smap=None):
    d = tmp_path / name
    d.mkdir()
    (d / "tokenizer.json").write_text(src)
    if config is not None:
      _write(d / "tokenizer_config.json", config)
    if smap is not None:
      _write(d / "special_tokens_map.json", smap)
    return d

  d = case("contra", {"eos_token": "<|end_of_text|>"}, {"eos_token": "<|eot_id|>"})
  with pytest.raises(
    ValueError,
    match=r"contradictory eos_token: .*tokenizer_config.json says '<\|end_of_text\|>', "
    r".*special_tokens_map.json says '<\|eot_id\|>'",
  ):
    load_tokenizer(d)
  with pytest.raises(ValueError, match=r"tokenizer_config.json: pad_token '<pad>' is not in .*vocabulary"):
    load_tokenizer(case("unknown", {"pad_token": "<pad>"}))
  with pytest.raises(ValueError, match=r"tokenizer_config.json: bos_token: not a token: 5"):
    load_tokenizer(case("notatoken", {"bos_token": 5}))
  with pytest.raises(ValueError, match=r"contradictory pad_token"):
    load_tokenizer(case("contra2", {"pad_token": "<|eot_id|>"}, {"pad_token": {"content": "<|end_of_text|>"}}))
  d = case("bare")
  tok = load_tokenizer(d)  # no config: no specials named, as AutoTokenizer gives for it
  assert (tok.bos_id, tok.eos_id) == (-1, -1)
  with pytest.raises(ValueError, match="has no EOS token"):
    tok.encode("a", add_eos=True)
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "tokenizer.json").write_text("{}")
  with pytest.raises(ValueError, match=r"bad.tokenizer.json is not a `tokenizers` tokenizer.json"):
    load_tokenizer(bad)
  with pytest.raises(ValueError, match=r"family 'llama' applies to SentencePiece models, but .*tokenizer.json"):
    load_tokenizer(json_dirs["qwen2"] / "tokenizer.json", "llama")


def test_load_tokenizer_dispatch(spm_dirs, json_dirs, tmp_path):
  assert isinstance(load_tokenizer(spm_dirs["t5"] / "spiece.model"), Tokenizer)
  assert isinstance(load_tokenizer(spm_dirs["llama"]), Tokenizer)  # directory with only tokenizer.model
  both = tmp_path / "both"  # a Llama-2 style repo: tokenizer.json beside tokenizer.model
  both.mkdir()
  (both / "tokenizer.model").write_bytes((spm_dirs["llama"] / "tokenizer.model").read_bytes())
  (both / "tokenizer.json").write_text((json_dirs["llama3"] / "tokenizer.json").read_text())
  assert isinstance(load_tokenizer(both), HFTokenizer)
  assert load_tokenizer(both, "llama").family.name == "llama"  # a family selects the SentencePiece model
  with pytest.raises(FileNotFoundError, match="tokenizer not found: /nonexistent/x.model"):
    load_tokenizer("/nonexistent/x.model")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"no tokenizer in directory .*empty: expected tokenizer.json"):
    load_tokenizer(tmp_path / "empty")
  (tmp_path / "vocab.txt").write_text("a\n")
  with pytest.raises(ValueError, match=r"unrecognised tokenizer file .*vocab.txt"):
    load_tokenizer(tmp_path / "vocab.txt")


def test_pipeline_reads_tokenizer_family(spm_dirs, json_dirs):
  data = pipeline.get_default_config()
  assert data.tokenizer_family is None
  data.tokenizer = str(spm_dirs["siglip"] / "spiece.model")
  assert pipeline.get_tokenizer(data).family.name == "vlm"  # unchanged default
  data.tokenizer_family = "siglip"
  tok = pipeline.get_tokenizer(data)
  assert tok.family.name == "siglip" and tok.pad_id == tok.eos_id == 1
  data.tokenizer, data.tokenizer_family = str(json_dirs["qwen2"]), None
  assert isinstance(pipeline.get_tokenizer(data), HFTokenizer)
  old = ml_collections.ConfigDict(dict(tokenizer=str(spm_dirs["t5"])))  # a config without the key
  assert pipeline.get_tokenizer(old).family.name == "vlm"
  assert os.path.basename(pipeline.get_tokenizer(old).path) == "spiece.model"
