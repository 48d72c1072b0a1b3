"""Every option of every command-line tool says what it does in --help."""

import argparse

import pytest

from data_prep import build_corpus, preprocess, train_tokenizer
from megatron_paci.config import cli as config_cli
from megatron_paci.pipeline import simulate
from megatron_paci.training import generate


class _Parsed(Exception):
    pass


def _parser_of(main) -> argparse.ArgumentParser:
    """The parser a tool's main() builds, caught when it parses."""
    seen = []

    def grab(self, *args, **kwargs):
        seen.append(self)
        raise _Parsed

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", grab)
        with pytest.raises(_Parsed):
            main([])
    return seen[0]


@pytest.mark.parametrize("name, parser", [
    ("generate", lambda: _parser_of(generate.main)),
    ("simulate", lambda: _parser_of(simulate.main)),
    ("build_corpus", lambda: _parser_of(build_corpus.main)),
    ("preprocess", preprocess.build_parser),
    ("train_tokenizer", train_tokenizer.build_parser),
    ("pretrain_gpt / config", lambda: config_cli.build_parser("pretrain_gpt.py")),
])
def test_every_option_has_help(name, parser):
    p = parser()
    silent = [a.option_strings[0] if a.option_strings else a.dest
              for a in p._actions if not a.help]
    assert not silent, f"{name}: options without help: {silent}"
    assert len(p._actions) > 2  # the parser was really the tool's
