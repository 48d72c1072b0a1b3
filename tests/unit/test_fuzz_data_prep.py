"""Random input files through data preparation: a dataset, or one error naming file and line.

Hypothesis assembles JSON lines and plain text from good and bad pieces (empty documents,
missing keys, values of the wrong type, invalid UTF-8, lone surrogates, broken JSON, text the
tokenizer cannot read, very long documents). The expected outcome is worked out from the
pieces, not from the code: the first bad line is the one the error names, otherwise every
non-empty document is in the dataset in order. A failed run leaves no new output, and an
earlier dataset at the same prefix as it was.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_prep import build_corpus, preprocess, train_tokenizer
from megatron_paci.data.indexed_dataset import IndexedDataset

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
VOCAB = 1000  # null:1000: text is ids below 1000, eod is 999
TOKENIZER = f"null:{VOCAB}"

ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8)


# One JSON line each: (kind, bytes of the line without its newline, token ids or None).
# kind "doc" is written, "skip" is not a document, anything else is the error the line causes.
def _line(kind: str, raw: bytes, tokens: list[int] | None = None):
    return kind, raw, tokens


def _j(obj) -> bytes:
    return json.dumps(obj).encode()


json_lines = st.one_of(
    ids.map(lambda t: _line("doc", _j({"text": " ".join(map(str, t)), "id": 1}), t)),
    ids.map(lambda t: _line("doc", _j({"text": "  ".join(map(str, t)) + " \n"}), t)),
    st.integers(0, VOCAB - 1).map(lambda i: _line("doc", _j({"text": i}), [i])),
    st.just(_line("doc", b'{"text": "' + b"7 " * 30000 + b'"}', [7] * 30000)),  # a long one
    st.sampled_from([
        _line("skip", b""), _line("skip", b"   "), _line("skip", b"\t\r"),
        _line("skip", _j({"text": ""})), _line("skip", _j({"text": " \n "})),
        _line("skip", _j({"text": None})),
        _line("key", _j({"txt": "1 2"})), _line("key", b"{}"),
        _line("object", b"[1, 2]"), _line("object", b'"1 2"'), _line("object", b"3"),
        _line("object", b"null"),
        _line("type", _j({"text": [1, 2]})), _line("type", _j({"text": {"a": 1}})),
        _line("type", _j({"text": True})),
        _line("json", b'{"text": "1 2"'), _line("json", b"{text: 1}"), _line("json", b"\x00"),
        _line("json", b'{"text": "1"} x'), _line("json", b"[" * 5000 + b"]" * 5000),
        _line("utf8", b'{"text": "\xff 1"}'), _line("utf8", b'{"text": "1 \xc3"}'),
        _line("utf8", b"\xef\xbb\xbf" + _j({"text": "1"})[:-1] + b"\xed\xa0\x80}"),
        _line("surrogate", b'{"text": "1 \\ud800 2"}'),
        _line("tokenize", _j({"text": "one two"})), _line("tokenize", _j({"text": "1 2.5"})),
        _line("tokenize", _j({"text": f"1 {VOCAB}"})), _line("tokenize", _j({"text": "-1"})),
        _line("tokenize", _j({"text": 1.5})),
    ]),
)
ERROR_WORDS = {  # what the error line must say besides FILE:LINE
    "key": "'text'", "object": "object", "type": "string", "json": "JSON", "utf8": "UTF-8",
    "surrogate": "surrogate", "tokenize": "tokenize",
}


def _run(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = preprocess.main(args)
    return rc, err.getvalue()


def _snapshot(prefix: str) -> dict[str, bytes]:
    out = {}
    for ext in (".bin", ".idx", ".tokenizer_info.json"):
        if os.path.exists(prefix + ext):
            with open(prefix + ext, "rb") as f:
                out[ext] = f.read()
    return out


def _check(lines, data: bytes, suffix: str, expected_where, old: bool) -> None:
    """Run preprocess on ``data``; ``expected_where`` is (lineno, kind) of the first fault."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "in" + suffix)
        with open(path, "wb") as f:
            f.write(data)
        prefix = os.path.join(d, "out")
        if old:  # an earlier dataset at the same prefix
            with open(os.path.join(d, "old.jsonl"), "w") as f:
                f.write('{"text": "5 6"}\n')
            assert _run(["--input", os.path.join(d, "old.jsonl"), "--tokenizer", TOKENIZER,
                         "--output-prefix", prefix, "--workers", "1"])[0] == 0
        before = _snapshot(prefix)
        rc, err = _run(["--input", path, "--tokenizer", TOKENIZER, "--output-prefix", prefix,
                        "--workers", "1", "--append-eod"])
        docs = [t for kind, _, t in lines if kind == "doc"]
        assert not [n for n in os.listdir(d) if n.endswith(".tmp")], "a temporary file left"
        if expected_where is None and docs:
            assert rc == 0, err
            ds = IndexedDataset(prefix)
            assert [ds[i].tolist() for i in range(len(ds))] == [t + [VOCAB - 1] for t in docs]
            return
        assert rc == 2
        err_lines = err.splitlines()
        assert len(err_lines) == 1 and err_lines[0].startswith("error: "), err
        if expected_where is None:
            assert "no documents" in err and path in err
        else:
            lineno, kind = expected_where
            assert f"{path}:{lineno}:" in err and ERROR_WORDS[kind] in err, (kind, err)
        assert _snapshot(prefix) == before, "a failed run changed the output"


@FUZZ
@given(st.lists(json_lines, max_size=8), st.sampled_from([b"\n", b"\r\n"]), st.booleans(),
       st.booleans())
def test_random_json_lines(lines, newline, last_newline, old):
    data = newline.join(raw for _, raw, _ in lines) + (newline if last_newline else b"")
    bad = [(i + 1, k) for i, (k, _, _) in enumerate(lines) if k not in ("doc", "skip")]
    _check(lines, data, ".jsonl", bad[0] if bad else None, old)


paragraph = ids.flatmap(lambda t: st.sampled_from([
    _line("doc", " ".join(map(str, t)).encode(), t),
    _line("doc", "\n".join(map(str, t)).encode(), t),  # one id per line, one document
]))
text_pieces = st.one_of(paragraph, st.sampled_from([
    _line("utf8", b"1 2 \xff"), _line("utf8", b"\x80"), _line("tokenize", b"1 x 2"),
    _line("skip", b"   "),
]))


@FUZZ
@given(st.lists(text_pieces, max_size=6), st.booleans())
def test_random_plain_text(pieces, old):
    # Documents are separated by blank lines; count the line each piece starts on.
    data, lineno, bad = b"", 1, []
    for kind, raw, _ in pieces:
        if kind not in ("doc", "skip") and not bad:
            bad.append((lineno, kind))
        data += raw + b"\n\n"
        lineno += raw.count(b"\n") + 2
    _check(pieces, data, ".txt", bad[0] if bad else None, old)


def test_two_workers_name_the_same_line(tmp_path):
    path = tmp_path / "in.jsonl"
    rows = [{"text": str(i)} for i in range(300)] + [{"txt": "1"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, err = _run(["--input", str(path), "--tokenizer", TOKENIZER, "--output-prefix",
                    str(tmp_path / "out"), "--workers", "2", "--chunksize", "4"])
    assert rc == 2 and f"{path}:301:" in err and "--json-key" in err
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


@pytest.mark.parametrize("stop_at", [1, 2, 3])
def test_a_run_stopped_while_renaming_leaves_no_mismatched_pair(tmp_path, monkeypatch, stop_at):
    """The .idx is renamed last and the old one removed first: an .idx is always its .bin's."""
    prefix = str(tmp_path / "out")
    (tmp_path / "old.jsonl").write_text('{"text": "5 6"}\n')
    (tmp_path / "new.jsonl").write_text('{"text": "1 2 3"}\n{"text": "4"}\n')
    base = ["--tokenizer", TOKENIZER, "--output-prefix", prefix, "--workers", "1"]
    assert _run(["--input", str(tmp_path / "old.jsonl"), *base])[0] == 0
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(preprocess.os, "replace", replace)
    rc, err = _run(["--input", str(tmp_path / "new.jsonl"), *base])
    monkeypatch.undo()
    assert rc == 130 and err.startswith("error: interrupted")
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert not os.path.exists(prefix + ".idx"), "an .idx left beside a .bin it may not match"


@pytest.mark.parametrize("name", ["in.jsonl", "in.txt"])
def test_a_byte_order_mark_is_not_text(tmp_path, name):
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + (b'{"text": "4 5"}\n' if "json" in name
                                                   else b"4 5\n"))
    rc, err = _run(["--input", str(tmp_path / name), "--tokenizer", TOKENIZER,
                    "--output-prefix", str(tmp_path / "out"), "--workers", "1"])
    assert rc == 0, err
    assert IndexedDataset(str(tmp_path / "out"))[0].tolist() == [4, 5]


def test_empty_input_writes_nothing(tmp_path):
    (tmp_path / "in.jsonl").write_bytes(b"")
    rc, err = _run(["--input", str(tmp_path / "in.jsonl"), "--tokenizer", TOKENIZER,
                    "--output-prefix", str(tmp_path / "out"), "--workers", "1"])
    assert rc == 2 and "no documents" in err
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


@pytest.mark.parametrize("case", ["dir-input", "dir-prefix", "bin-is-dir", "bad-tokenizer"])
def test_bad_paths_are_one_error_line(tmp_path, case):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"text": "1"}\n')
    prefix, tok = str(tmp_path / "out"), TOKENIZER
    if case == "dir-input":
        inp = tmp_path
    elif case == "dir-prefix":
        prefix = str(tmp_path) + os.sep
    elif case == "bin-is-dir":
        os.mkdir(prefix + ".bin")
    else:
        tok = str(tmp_path / "in.jsonl") + ".json"
    rc, err = _run(["--input", str(inp), "--tokenizer", tok, "--output-prefix", prefix])
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err


# --------------------------------------------------------------------------- the other tools


def _train(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = train_tokenizer.main(args)
    return rc, err.getvalue()


@pytest.mark.parametrize("kind", ["sentencepiece", "bpe"])
@pytest.mark.parametrize("data,needle", [
    (b"good text\n\nbad \xff text\n", "in.txt:3: not valid UTF-8"),
    (b"\n\n   \n", "no text to train on"),
])
def test_train_tokenizer_bad_text(tmp_path, kind, data, needle):
    (tmp_path / "in.txt").write_bytes(data)
    out = tmp_path / "tok"
    rc, err = _train(["--type", kind, "--input", str(tmp_path / "in.txt"), "--vocab-size",
                      "300", "--output", str(out)])
    assert rc == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not os.path.exists(str(out) + ".model")
    assert not os.path.exists(out / "tokenizer.json")


def test_train_tokenizer_names_the_missing_key(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    rc, err = _train(["--type", "bpe", "--input", str(tmp_path / "in.jsonl"), "--vocab-size",
                      "300", "--output", str(tmp_path / "bpe")])
    assert rc == 2 and "in.jsonl:2: no 'text' key" in err and "'body'" in err, err
    assert not os.path.exists(tmp_path / "bpe" / "tokenizer.json")


@pytest.mark.parametrize("args,needle", [
    (["--max-mb", "nan"], "--max-mb"), (["--max-mb", "-1"], "--max-mb"),
    (["--max-mb", "inf"], "--max-mb"), (["--output-is-file"], "is a file"),
])
def test_build_corpus_checks_its_arguments_before_any_work(tmp_path, args, needle):
    out = tmp_path / "corpus"
    if args == ["--output-is-file"]:
        out.write_text("x")
        args = []
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as so:
        rc = build_corpus.main(["--output", str(out), "--sources", "pydoc", *args])
    assert rc != 0 and len(err.getvalue().splitlines()) == 1 and needle in err.getvalue()
    assert "pydoc: module" not in so.getvalue(), "work started before the check"


def test_long_document_round_trips(tmp_path):
    doc = np.random.default_rng(0).integers(0, VOCAB - 1, size=200_000)
    (tmp_path / "in.txt").write_text(" ".join(map(str, doc)) + "\n")
    rc, err = _run(["--input", str(tmp_path / "in.txt"), "--tokenizer", TOKENIZER,
                    "--output-prefix", str(tmp_path / "out"), "--workers", "1"])
    assert rc == 0, err
    np.testing.assert_array_equal(IndexedDataset(str(tmp_path / "out"))[0], doc)
