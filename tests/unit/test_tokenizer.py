"""Tokenizer wrappers and the sentencepiece training CLI, checked against references."""

from __future__ import annotations

import inspect
import json
import pickle

import pytest

from data_prep import train_tokenizer
from megatron_paci.data.tokenizer import (
    NullTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    build_tokenizer,
)

VOCAB = 400

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Return a new dictionary initialized from an optional positional argument.",
    "  Leading spaces, trailing spaces  ",
    "Tabs\tand\nnewlines\r\nare kept, as are  double  spaces.",
    "Numbers like 3.14159 and 2024-01-31 split into digits.",
    "Unicode: café, naïve, Ångström, 東京 and 日本語, emoji 😀🚀.",
    "",
]


def _training_documents() -> list[str]:
    """A few KB of real English: docstrings of well-known stdlib modules."""
    import argparse
    import collections
    import json as json_mod
    import pathlib
    import textwrap

    docs = []
    for mod in (argparse, collections, json_mod, pathlib, textwrap):
        docs.append(inspect.getdoc(mod) or "")
        for name in sorted(vars(mod)):
            obj = getattr(mod, name)
            if not name.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj)):
                doc = inspect.getdoc(obj)
                if doc:
                    docs.append(doc)
    return [d for d in docs if d.strip()]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("tok")
    docs = _training_documents()
    half = len(docs) // 2
    jsonl = d / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:half]))
    txt = d / "b.txt"
    txt.write_text("\n\n".join(docs[half:]) + "\n")
    assert 3_000 < jsonl.stat().st_size + txt.stat().st_size < 200_000
    rc = train_tokenizer.main(
        ["--input", str(jsonl), str(txt), "--vocab-size", str(VOCAB), "--output", str(d / "tok")]
    )
    assert rc == 0
    assert (d / "tok.vocab").is_file()
    return str(d / "tok.model")


def test_special_ids_and_byte_pieces(sp_model):
    tok = SentencePieceTokenizer(sp_model)
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == VOCAB
    assert (tok.unk, tok.bos, tok.eod, tok.pad) == (0, 1, 2, -1)
    sp = tok._sp
    assert [sp.id_to_piece(i) for i in (0, 1, 2)] == ["<unk>", "<s>", "</s>"]
    # byte fallback pieces <0x00>..<0xFF> sit at ids 3..258
    assert sp.id_to_piece(3) == "<0x00>" and sp.id_to_piece(258) == "<0xFF>"
    vocab_lines = open(sp_model[: -len(".model")] + ".vocab", encoding="utf-8").read().splitlines()
    assert len(vocab_lines) == VOCAB


@pytest.mark.parametrize("text", SENTENCES)
def test_round_trip_and_range(sp_model, text):
    tok = build_tokenizer(sp_model)
    ids = tok.tokenize(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert 0 not in ids  # byte fallback means nothing is unknown
    assert tok.detokenize(ids) == text


def test_byte_fallback_encodes_utf8_bytes(sp_model):
    tok = build_tokenizer(sp_model)
    for ch in ["😀", "東", "ß"]:  # characters absent from the training text
        ids = tok.tokenize("x" + ch)
        expected = [3 + b for b in ch.encode("utf-8")]
        assert ids[-len(expected):] == expected
        assert tok.detokenize(ids) == "x" + ch


def test_merges_learned_from_training_text(sp_model):
    tok = build_tokenizer(sp_model)
    text = "Return the object of the function."
    # a trained BPE model needs fewer tokens than characters on text like its training text
    assert len(tok.tokenize(text)) < 0.6 * len(text)


def test_sentencepiece_tokenizer_pickles(sp_model):
    tok = SentencePieceTokenizer(sp_model)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.tokenize(SENTENCES[1]) == tok.tokenize(SENTENCES[1])


def test_null_tokenizer():
    tok = NullTokenizer(1000)
    assert (tok.vocab_size, tok.eod) == (1000, 999)
    assert tok.tokenize(" 5 17\n 999\t0 ") == [5, 17, 999, 0]
    assert tok.tokenize("") == []
    assert tok.detokenize([5, 17, 999]) == "5 17 999"
    with pytest.raises(ValueError):
        tok.tokenize("1000")
    built = build_tokenizer("null:1000")
    assert isinstance(built, NullTokenizer) and built.vocab_size == 1000
    assert isinstance(built, Tokenizer)
    with pytest.raises(ValueError):
        build_tokenizer("null:abc")


def test_missing_model_names_path_and_fix(tmp_path):
    missing = str(tmp_path / "nope" / "tok.model")
    with pytest.raises(FileNotFoundError) as e:
        build_tokenizer(missing)
    assert missing in str(e.value)
    assert "python -m data_prep.train_tokenizer" in str(e.value)


def test_train_missing_input_names_path(tmp_path, capsys):
    missing = str(tmp_path / "absent.jsonl")
    rc = train_tokenizer.main(
        ["--input", missing, "--vocab-size", "400", "--output", str(tmp_path / "t")]
    )
    assert rc != 0
    assert missing in capsys.readouterr().err


def test_long_lines_are_split_not_dropped():
    words = ["lorem", "ipsum", "東京", "dolor"] * 2000
    line = " ".join(words)
    pieces = list(train_tokenizer.split_long_line(line, max_bytes=1000))
    assert len(pieces) > 1
    assert "".join(pieces) == line
    assert all(len(p.encode("utf-8")) <= 1000 for p in pieces)


def test_iter_sentences_splits_documents_into_lines(tmp_path):
    path = tmp_path / "docs.jsonl"
    docs = ["first line\nsecond line\n\nthird", "only one"]
    path.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    got = list(train_tokenizer.iter_sentences([str(path)], json_key="body"))
    assert got == ["first line", "second line", "third", "only one"]
