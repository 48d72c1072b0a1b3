"""Byte-level BPE and Hugging Face tokenizer.json forms, checked against independent references.

The tokenizer is trained here by ``data_prep.train_tokenizer --type bpe`` on a few KB of real
English (stdlib docstrings); nothing is downloaded. GPT-2 BPE ids are compared with
transformers' GPT2TokenizerFast and with a plain-Python BPE written below from GPT-2's
published algorithm (byte -> printable character map, GPT-2's pre-tokenizer regex, merges
applied by rank).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import pickle

import pytest

from data_prep import preprocess, train_tokenizer
from megatron_paci.data.tokenizer import (
    CONVENTIONAL_EOD_TOKENS,
    GPT2BPETokenizer,
    HFJsonTokenizer,
    Tokenizer,
    build_tokenizer,
)

VOCAB = 500

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Return a new dictionary initialized from an optional positional argument.",
    "  Leading spaces, trailing spaces  ",
    "Tabs\tand\nnewlines\r\nare kept, as are  double  spaces.\n\n\n",
    "Numbers like 3.14159 and 2024-01-31, contractions: it's, we'll, they'd.",
    "Unicode: café, naïve, Ångström, 東京 and 日本語, emoji 😀🚀.",
    "",
]


def _training_documents() -> list[str]:
    import collections
    import functools
    import pathlib
    import textwrap

    docs = []
    for mod in (argparse, collections, functools, json, pathlib, textwrap):
        docs.append(inspect.getdoc(mod) or "")
        for name in sorted(vars(mod)):
            obj = getattr(mod, name)
            if not name.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj)):
                docs.append(inspect.getdoc(obj) or "")
    return [d for d in docs if d.strip()]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("bpe")
    corpus = d / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in _training_documents()))
    assert 5_000 < corpus.stat().st_size < 500_000
    out = d / "tok"
    assert train_tokenizer.main(["--type", "bpe", "--input", str(corpus), "--vocab-size",
                                 str(VOCAB), "--output", str(out)]) == 0
    return str(out)


def test_train_cli_writes_the_three_files(bpe_dir):
    assert sorted(os.listdir(bpe_dir)) == ["merges.txt", "tokenizer.json", "vocab.json"]
    vocab = json.load(open(os.path.join(bpe_dir, "vocab.json"), encoding="utf-8"))
    assert len(vocab) == VOCAB and sorted(vocab.values()) == list(range(VOCAB))
    assert vocab["<|endoftext|>"] == 0
    # all 256 byte symbols are in the vocabulary, so no text is unknown
    assert all(ch in vocab for ch in _byte_to_char().values())
    spec = json.load(open(os.path.join(bpe_dir, "tokenizer.json"), encoding="utf-8"))
    assert spec["model"]["type"] == "BPE"
    assert spec["pre_tokenizer"]["type"] == "ByteLevel"
    assert spec["decoder"]["type"] == "ByteLevel"
    assert [t["content"] for t in spec["added_tokens"]] == ["<|endoftext|>"]


def test_train_cli_bad_inputs(tmp_path, capsys):
    missing = str(tmp_path / "absent.jsonl")
    assert train_tokenizer.main(["--type", "bpe", "--input", missing, "--vocab-size", "400",
                                 "--output", str(tmp_path / "t")]) == 2
    assert missing in capsys.readouterr().err
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text\n")
    assert train_tokenizer.main(["--type", "bpe", "--input", str(corpus), "--vocab-size", "200",
                                 "--output", str(tmp_path / "t")]) == 2
    assert "--vocab-size 200 is too small" in capsys.readouterr().err


@pytest.mark.parametrize("parser", [train_tokenizer.build_parser, preprocess.build_parser])
def test_every_cli_option_has_help(parser):
    actions = [a for a in parser()._actions if not isinstance(a, argparse._HelpAction)]
    assert actions
    for a in actions:
        assert a.help and len(a.help) > 10, a.option_strings


def _forms(bpe_dir: str) -> dict[str, str]:
    vocab, merges = os.path.join(bpe_dir, "vocab.json"), os.path.join(bpe_dir, "merges.txt")
    return {"dir": bpe_dir, "gpt2-bpe": f"gpt2-bpe:{vocab},{merges}",
            "tokenizer.json": os.path.join(bpe_dir, "tokenizer.json")}


@pytest.mark.parametrize("form", ["dir", "gpt2-bpe", "tokenizer.json"])
@pytest.mark.parametrize("text", SENTENCES)
def test_round_trip(bpe_dir, form, text):
    tok = build_tokenizer(_forms(bpe_dir)[form])
    assert isinstance(tok, Tokenizer)
    assert isinstance(tok, HFJsonTokenizer if form == "tokenizer.json" else GPT2BPETokenizer)
    assert (tok.vocab_size, tok.eod) == (VOCAB, 0)
    ids = tok.tokenize(text)
    assert all(isinstance(i, int) and 0 <= i < VOCAB for i in ids)
    assert tok.eod not in ids
    assert tok.detokenize(ids) == text


def test_merges_learned_from_training_text(bpe_dir):
    tok = build_tokenizer(bpe_dir)
    text = "Return the object of the function."
    assert len(tok.tokenize(text)) < 0.6 * len(text)


# -------------------------------------------------------------------- independent references


def _byte_to_char() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class ReferenceBPE:
    """GPT-2's encoder, step by step, with no tokenizers library underneath."""

    PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def __init__(self, vocab_file: str, merges_file: str) -> None:
        import regex

        self.vocab = json.load(open(vocab_file, encoding="utf-8"))
        lines = open(merges_file, encoding="utf-8").read().splitlines()
        pairs = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#")]
        self.ranks = {p: r for r, p in enumerate(pairs)}
        self.pattern = regex.compile(self.PATTERN)
        self.chars = _byte_to_char()

    def _merge(self, word: list[str]) -> list[str]:
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:], strict=False)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.pattern.findall(text):
            word = [self.chars[b] for b in piece.encode("utf-8")]
            ids += [self.vocab[s] for s in self._merge(word)]
        return ids


def _comparison_texts() -> list[str]:
    return [s for s in SENTENCES if s] + _training_documents()[:40]


def test_gpt2_bpe_ids_equal_transformers_gpt2_tokenizer(bpe_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import GPT2TokenizerFast

    # transformers 5 ignores vocab_file=/merges_file= keywords (an empty vocabulary comes
    # back), so the reference reads the same two files the way it loads a saved tokenizer.
    ref = GPT2TokenizerFast.from_pretrained(bpe_dir, local_files_only=True)
    assert len(ref) == VOCAB and ref.eos_token_id == 0
    ours = build_tokenizer(bpe_dir)
    for text in _comparison_texts():
        assert ours.tokenize(text) == ref.encode(text), text


def test_gpt2_bpe_ids_equal_plain_python_bpe(bpe_dir):
    ref = ReferenceBPE(os.path.join(bpe_dir, "vocab.json"), os.path.join(bpe_dir, "merges.txt"))
    forms = _forms(bpe_dir)
    gpt2, hf = build_tokenizer(forms["gpt2-bpe"]), build_tokenizer(forms["tokenizer.json"])
    merged_somewhere = False
    for text in _comparison_texts():
        want = ref.encode(text)
        assert gpt2.tokenize(text) == want, text
        assert hf.tokenize(text) == want, text
        merged_somewhere |= len(want) < len(text.encode("utf-8"))
    assert merged_somewhere


def test_literal_endoftext_is_text_for_gpt2_special_for_tokenizer_json(bpe_dir):
    # Megatron's GPT2BPETokenizer encodes "<|endoftext|>" in a document as plain text;
    # a tokenizer.json treats its added tokens as special, as Hugging Face does.
    text = "a<|endoftext|>b"
    ref = ReferenceBPE(os.path.join(bpe_dir, "vocab.json"), os.path.join(bpe_dir, "merges.txt"))
    assert build_tokenizer(bpe_dir).tokenize(text) == ref.encode(text)
    hf = build_tokenizer(os.path.join(bpe_dir, "tokenizer.json")).tokenize(text)
    assert hf == ref.encode("a") + [0] + ref.encode("b")


# -------------------------------------------------------------------- end of document


def _tiny_tokenizer_json(path, special: list[str]) -> str:
    from tokenizers import Tokenizer as Lib
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Lib(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(
        vocab_size=300, special_tokens=special, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return str(path)


def test_tokenizer_json_conventional_eod(tmp_path):
    path = _tiny_tokenizer_json(tmp_path / "t.json", ["<unk>", "<s>", "</s>"])
    tok = build_tokenizer(path)
    assert tok.eod == 2 and tok.detokenize([tok.eod]) == "</s>"
    assert build_tokenizer(path + "#eod=<s>").eod == 1


def test_tokenizer_json_without_eod_lists_what_was_looked_for(tmp_path):
    path = _tiny_tokenizer_json(tmp_path / "t.json", ["<pad>", "<|im_end|>"])
    with pytest.raises(ValueError) as e:
        build_tokenizer(path)
    msg = str(e.value)
    assert path in msg and "#eod=" in msg
    for name in CONVENTIONAL_EOD_TOKENS:
        assert name in msg
    assert build_tokenizer(path + "#eod=<|im_end|>").eod == 1
    with pytest.raises(ValueError, match="looked for <nope>"):
        build_tokenizer(path + "#eod=<nope>")


def test_gpt2_vocab_without_endoftext(bpe_dir, tmp_path):
    vocab = json.load(open(os.path.join(bpe_dir, "vocab.json"), encoding="utf-8"))
    del vocab["<|endoftext|>"]
    vocab_file = tmp_path / "vocab.json"
    vocab_file.write_text(json.dumps(vocab))
    merges = os.path.join(bpe_dir, "merges.txt")
    spec = f"gpt2-bpe:{vocab_file},{merges}"
    with pytest.raises(ValueError) as e:
        build_tokenizer(spec)
    assert str(vocab_file) in str(e.value) and "<|endoftext|>" in str(e.value)
    assert "#eod=" in str(e.value)
    nl = "Ċ"  # the byte-level symbol of "\n"
    assert build_tokenizer(f"{spec}#eod={nl}").eod == vocab[nl]


# -------------------------------------------------------------------- bad specs, records


def test_bad_specs_name_the_path_and_the_forms(bpe_dir, tmp_path):
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    (empty_dir / "vocab.json").write_text("{}")
    text_file = tmp_path / "notes.txt"
    text_file.write_text("x")
    cases = [
        (str(tmp_path / "missing"), FileNotFoundError),
        (str(tmp_path / "missing.json"), FileNotFoundError),
        (str(empty_dir), FileNotFoundError),
        (str(text_file), ValueError),
        (os.path.join(bpe_dir, "vocab.json"), ValueError),  # GPT-2 vocab is not a tokenizer.json
        (f"gpt2-bpe:{tmp_path / 'v.json'},{tmp_path / 'm.txt'}", FileNotFoundError),
    ]
    for spec, error in cases:
        with pytest.raises(error) as e:
            build_tokenizer(spec)
        msg = str(e.value)
        path = spec.split(":", 1)[1].split(",")[0] if spec.startswith("gpt2-bpe:") else spec
        assert path in msg and "accepted forms" in msg, msg
    with pytest.raises(FileNotFoundError, match="has no merges.txt"):
        build_tokenizer(str(empty_dir))
    with pytest.raises(ValueError, match="accepted forms"):
        build_tokenizer("gpt2-bpe:only_one_file.json")
    with pytest.raises(ValueError, match="takes no #eod="):
        build_tokenizer(str(tmp_path / "x.model") + "#eod=</s>")


@pytest.mark.parametrize("form", ["dir", "tokenizer.json"])
def test_pickles(bpe_dir, form):
    tok = build_tokenizer(_forms(bpe_dir)[form])
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.tokenize(SENTENCES[5]) == tok.tokenize(SENTENCES[5])
    assert clone.eod == tok.eod


def test_describe_fingerprints_the_files(bpe_dir):
    def sha(path):
        return hashlib.sha256(open(path, "rb").read()).digest()

    vocab, merges = os.path.join(bpe_dir, "vocab.json"), os.path.join(bpe_dir, "merges.txt")
    d = build_tokenizer(bpe_dir).describe()
    assert d == {"kind": "gpt2-bpe", "files": [vocab, merges], "vocab_size": VOCAB, "eod": 0,
                 "sha256": hashlib.sha256(sha(vocab) + sha(merges)).hexdigest()}
    tj = os.path.join(bpe_dir, "tokenizer.json")
    d = build_tokenizer(tj).describe()
    assert d["kind"] == "hf-tokenizer-json" and d["files"] == [tj]
    assert d["sha256"] == hashlib.sha256(sha(tj)).hexdigest()
    assert build_tokenizer("null:7").describe() == {
        "kind": "null", "files": [], "vocab_size": 7, "eod": 6, "sha256": None}
