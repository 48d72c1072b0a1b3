"""preprocess CLI: every input kind yields exactly tokenizer.tokenize(doc) per document."""

from __future__ import annotations

import inspect
import json
import os

import numpy as np
import pytest

from data_prep import build_corpus, preprocess, train_tokenizer
from megatron_paci.data.indexed_dataset import IndexedDataset
from megatron_paci.data.tokenizer import build_tokenizer


def _real_documents() -> list[str]:
    """Real English documents (stdlib docstrings), plus edge cases an input may hold."""
    import collections
    import functools
    import itertools
    import string
    import textwrap

    docs = [inspect.getdoc(m) or "" for m in (collections, functools, itertools, string, textwrap)]
    docs += [inspect.getdoc(f) or "" for f in (textwrap.wrap, functools.reduce, sorted, zip)]
    docs = [d.strip() for d in docs if d.strip()]
    docs.insert(3, "Unicode survives: naïve café, 東京, emoji 😀.")
    docs.insert(5, "short")
    return docs


DOCS = _real_documents()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("tok")
    src = d / "train.txt"
    src.write_text("\n\n".join(DOCS) + "\n")
    assert train_tokenizer.main(
        ["--input", str(src), "--vocab-size", "400", "--output", str(d / "tok")]
    ) == 0
    return str(d / "tok.model")


@pytest.fixture(scope="module")
def jsonl_input(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("in") / "docs.jsonl"
    rows = [{"text": t, "id": i} for i, t in enumerate(DOCS)]
    rows.insert(2, {"text": ""})  # empty document: skipped, not written
    rows.insert(4, {"text": "  \n "})  # whitespace only: skipped too
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.write("\n")  # a trailing blank line is not a document
    return str(path)


def _run(inp: str, model: str, out: str, *extra: str) -> int:
    return preprocess.main(
        ["--input", inp, "--tokenizer", model, "--output-prefix", out, "--log-interval", "3",
         *extra]
    )


def _check_dataset(prefix: str, model: str, docs: list[str], append_eod: bool) -> None:
    tok = build_tokenizer(model)
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.uint16
    assert len(ds) == len(docs)
    np.testing.assert_array_equal(ds.document_indices, np.arange(len(docs) + 1))
    for i, doc in enumerate(docs):
        want = tok.tokenize(doc) + ([tok.eod] if append_eod else [])
        assert ds[i].tolist() == want, f"document {i}"


def _same_files(a: str, b: str) -> None:
    for ext in (".bin", ".idx"):
        with open(a + ext, "rb") as fa, open(b + ext, "rb") as fb:
            assert fa.read() == fb.read(), ext


@pytest.mark.parametrize("append_eod", [False, True])
def test_jsonl_workers_1_and_2_identical(tmp_path, model, jsonl_input, append_eod, capsys):
    eod = ["--append-eod"] if append_eod else []
    assert _run(jsonl_input, model, str(tmp_path / "w1"), "--workers", "1", *eod) == 0
    assert "2 empty skipped" in capsys.readouterr().out
    # chunksize 2 so several tasks and the feeding window are exercised
    assert _run(jsonl_input, model, str(tmp_path / "w2"), "--workers", "2", "--chunksize", "2",
                *eod) == 0
    _check_dataset(str(tmp_path / "w1"), model, DOCS, append_eod)
    _same_files(str(tmp_path / "w1"), str(tmp_path / "w2"))
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_plain_text_documents_split_on_blank_lines(tmp_path, model):
    # documents hold single newlines; runs of blank (or whitespace-only) lines separate them
    docs = ["\n".join(line for line in d.splitlines() if line.strip()) for d in DOCS]
    assert sum("\n" in d for d in docs) > 3
    text = ""
    for i, doc in enumerate(docs):
        text += doc + ("\n\n" if i % 2 else "\n \n\n\n")
    path = tmp_path / "docs.txt"
    path.write_text("\n" + text, encoding="utf-8")
    for workers in ("1", "2"):
        assert _run(str(path), model, str(tmp_path / f"t{workers}"), "--workers", workers,
                    "--append-eod") == 0
    _check_dataset(str(tmp_path / "t1"), model, docs, append_eod=True)
    _same_files(str(tmp_path / "t1"), str(tmp_path / "t2"))


def test_hf_local_inputs_match_jsonl(tmp_path, model, jsonl_input):
    assert _run(jsonl_input, model, str(tmp_path / "ref"), "--workers", "1") == 0
    assert _run("hf:json", model, str(tmp_path / "hf"), "--hf-data-files", jsonl_input,
                "--workers", "2") == 0
    _same_files(str(tmp_path / "ref"), str(tmp_path / "hf"))

    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": [""] + DOCS}).save_to_disk(str(saved))
    assert _run(f"hf:{saved}", model, str(tmp_path / "disk"), "--workers", "1") == 0
    _same_files(str(tmp_path / "ref"), str(tmp_path / "disk"))


def test_null_tokenizer_and_json_key(tmp_path):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 999, size=n).tolist() for n in (5, 1, 40, 7)]
    path = tmp_path / "ids.jsonl"
    path.write_text("".join(json.dumps({"ids": " ".join(map(str, s))}) + "\n" for s in seqs))
    assert _run(str(path), "null:1000", str(tmp_path / "n"), "--json-key", "ids",
                "--append-eod", "--workers", "1") == 0
    ds = IndexedDataset(str(tmp_path / "n"))
    assert [ds[i].tolist() for i in range(len(ds))] == [s + [999] for s in seqs]


def test_missing_input_and_tokenizer_name_the_path(tmp_path, model, jsonl_input, capsys):
    missing = str(tmp_path / "no_such.jsonl")
    assert _run(missing, model, str(tmp_path / "o")) != 0
    assert missing in capsys.readouterr().err

    missing_tok = str(tmp_path / "no_tok.model")
    assert _run(jsonl_input, missing_tok, str(tmp_path / "o")) != 0
    err = capsys.readouterr().err
    assert missing_tok in err and "data_prep.train_tokenizer" in err

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert _run(jsonl_input, model, str(blocker / "sub" / "o")) != 0
    assert "output directory" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o.bin")


def test_bad_json_line_fails_cleanly_with_workers(tmp_path, model, capsys):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": d}) for d in DOCS] * 20
    lines.insert(150, "{not json")
    path.write_text("\n".join(lines) + "\n")
    rc = _run(str(path), model, str(tmp_path / "bad"), "--workers", "2", "--chunksize", "1")
    assert rc != 0
    assert f"{path}:151" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "bad.bin")
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_build_corpus_pydoc_source(tmp_path):
    out = tmp_path / "corpus"
    assert build_corpus.main(["--output", str(out), "--max-mb", "0.05", "--sources", "pydoc"]) == 0
    path = out / "corpus.jsonl"
    data = path.read_bytes()
    assert 0 < len(data) <= 50_000
    texts = [json.loads(line)["text"] for line in data.decode("utf-8").splitlines()]
    assert len(texts) >= 2
    assert texts[0].startswith("Module abc")  # modules in sorted order
    import abc

    assert inspect.cleandoc(abc.__doc__) in texts[0]
    # deterministic: a second build is byte-identical
    assert build_corpus.main(["--output", str(tmp_path / "c2"), "--max-mb", "0.05",
                              "--sources", "pydoc"]) == 0
    assert (tmp_path / "c2" / "corpus.jsonl").read_bytes() == data


def test_build_corpus_fails_only_when_nothing_collected(tmp_path, monkeypatch, capsys):
    def broken():
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(build_corpus, "bible_documents", broken)
    assert build_corpus.main(["--output", str(tmp_path), "--sources", "bible"]) != 0
    assert "simulated failure" in capsys.readouterr().out


# --------------------------------------------------------------------------- byte-level BPE


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("bpe")
    src = d / "train.txt"
    src.write_text("\n\n".join(DOCS) + "\n")
    assert train_tokenizer.main(
        ["--type", "bpe", "--input", str(src), "--vocab-size", "400", "--output", str(d / "tok")]
    ) == 0
    return str(d / "tok")


def _sha256_of_files(*paths: str) -> str:
    import hashlib

    inner = b"".join(hashlib.sha256(open(p, "rb").read()).digest() for p in paths)
    return hashlib.sha256(inner).hexdigest()


@pytest.mark.parametrize("form", ["dir", "tokenizer.json"])
def test_bpe_dataset_loads_and_decodes_to_the_documents(tmp_path, bpe_dir, jsonl_input, form):
    spec = bpe_dir if form == "dir" else os.path.join(bpe_dir, "tokenizer.json")
    prefix = str(tmp_path / "bpe")
    assert _run(jsonl_input, spec, prefix, "--append-eod", "--workers", "2",
                "--chunksize", "2") == 0
    assert sorted(os.listdir(tmp_path)) == ["bpe.bin", "bpe.idx", "bpe.tokenizer_info.json"]
    eod = json.load(open(os.path.join(bpe_dir, "vocab.json"), encoding="utf-8"))["<|endoftext|>"]
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.uint16 and len(ds) == len(DOCS)
    tok = build_tokenizer(spec)
    for i, doc in enumerate(DOCS):
        ids = ds[i].tolist()
        assert ids[-1] == eod and eod not in ids[:-1]
        assert tok.detokenize(ids[:-1]) == doc, f"document {i}"

    record = json.load(open(prefix + ".tokenizer_info.json", encoding="utf-8"))
    files = ([os.path.join(bpe_dir, "vocab.json"), os.path.join(bpe_dir, "merges.txt")]
             if form == "dir" else [spec])
    assert record["kind"] == ("gpt2-bpe" if form == "dir" else "hf-tokenizer-json")
    assert (record["vocab_size"], record["eod"], record["spec"]) == (400, eod, spec)
    assert record["files"] == files
    assert record["sha256"] == _sha256_of_files(*files)


def test_tokenizer_record_check(tmp_path, bpe_dir, model, jsonl_input):
    from megatron_paci.data.indexed_dataset import IndexedDatasetBuilder
    from megatron_paci.data.tokenizer_record import check_dataset_tokenizers

    prefix = str(tmp_path / "bpe")
    assert _run(jsonl_input, bpe_dir, prefix, "--workers", "1") == 0
    assert check_dataset_tokenizers([prefix], build_tokenizer(bpe_dir), bpe_dir) == []

    with pytest.raises(ValueError) as e:
        check_dataset_tokenizers([prefix], build_tokenizer(model), model)
    msg = str(e.value)
    for needle in (f"dataset {prefix} ", prefix + ".tokenizer_info.json",
                   os.path.join(bpe_dir, "vocab.json"), f"data.tokenizer={model}",
                   "vocab 400", "eod 0", "eod 2", "differ in kind, eod, sha256"):
        assert needle in msg, (needle, msg)

    # same kind and size, other files: a retrained tokenizer is refused by its fingerprint
    other = tmp_path / "other"
    src = tmp_path / "other.txt"
    src.write_text("\n\n".join(reversed(DOCS)) + "\nextra words for other merges\n")
    assert train_tokenizer.main(["--type", "bpe", "--input", str(src), "--vocab-size", "400",
                                 "--output", str(other)]) == 0
    with pytest.raises(ValueError, match="differ in sha256"):
        check_dataset_tokenizers([prefix], build_tokenizer(str(other)), str(other))

    # a dataset without a record (as Megatron writes them) is returned unchecked
    bare = str(tmp_path / "megatron_made")
    builder = IndexedDatasetBuilder(bare + ".bin", np.uint16)
    builder.add_document([1, 2, 3])
    builder.finalize(bare + ".idx")
    got = check_dataset_tokenizers([0.5, prefix, 0.5, bare], build_tokenizer(bpe_dir), bpe_dir)
    assert got == [bare]

    with open(prefix + ".tokenizer_info.json", "w") as f:
        f.write("{broken")
    with pytest.raises(ValueError, match="tokenizer record .*bpe.tokenizer_info.json"):
        check_dataset_tokenizers([prefix], build_tokenizer(bpe_dir), bpe_dir)


def test_null_tokenizer_record_checks_the_vocabulary(tmp_path):
    from megatron_paci.data.tokenizer_record import check_dataset_tokenizers

    path = tmp_path / "ids.txt"
    path.write_text("1 2 3\n\n4 5\n")
    assert _run(str(path), "null:1000", str(tmp_path / "n"), "--workers", "1") == 0
    prefix = str(tmp_path / "n")
    assert check_dataset_tokenizers([prefix], build_tokenizer("null:1000"), "null:1000") == []
    with pytest.raises(ValueError, match="vocab 1000, eod 999.*vocab 1024, eod 1023"):
        check_dataset_tokenizers([prefix], build_tokenizer("null:1024"), "null:1024")
