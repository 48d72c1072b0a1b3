"""build_corpus's output: a source that is simply not installed (the Bible) is skipped
without a note unless asked for; a wiki stand-in keeps these runs off the network."""

import json

import pytest

from data_prep import build_corpus as bc

WIKI = [f"Article {i}. " + "Some lead section text. " * 20 for i in range(30)]


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(bc, "wiki_documents", lambda cache_dir: iter(WIKI))
    monkeypatch.setattr(bc, "find_bible", lambda: None)


def _run(capsys, tmp_path, *extra):
    assert bc.main(["--output", str(tmp_path), "--max-mb", "0.005", *extra]) == 0
    return capsys.readouterr().out


def test_missing_bible_is_quiet_by_default(offline, tmp_path, capsys):
    out = _run(capsys, tmp_path, "--sources", "wiki")  # named, but not the Bible
    assert "bible:" not in out and "wiki: 9 documents" in out
    out = _run(capsys, tmp_path)  # the default list includes the Bible
    assert "bible:" not in out and "apt-get" not in out
    assert "wiki: " in out and "pydoc: " in out
    rows = [json.loads(line) for line in (tmp_path / "corpus.jsonl").open()]
    assert any(r["text"] in WIKI for r in rows) and any(r["text"] not in WIKI for r in rows)


@pytest.mark.parametrize("extra", [["--verbose"], ["--sources", "wiki,bible"]])
def test_missing_bible_is_reported_when_asked(offline, tmp_path, capsys, extra):
    out = _run(capsys, tmp_path, *extra)
    assert "bible: skipped (bible-kjv is not installed" in out


def test_nothing_collected_names_each_source(offline, tmp_path, capsys):
    assert bc.main(["--output", str(tmp_path), "--sources", "bible"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no documents collected from any source (bible: skipped: ")
