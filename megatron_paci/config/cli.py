"""Command-line front end shared by ``pretrain_gpt.py`` and ``python -m megatron_paci.config``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from megatron_paci.config.loader import load_config
from megatron_paci.config.schema import Config

USAGE_EPILOG = """\
overrides are section.key=value, parsed by the key's type, e.g.
  optim.lr=3e-4 train.iters=200 model.tie_embeddings=false data.path=[0.7,a,0.3,b]
"""


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        epilog=USAGE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML file (may inherit from another via 'inherit:')")
    p.add_argument("--print", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    return p


def parse_args(argv: Sequence[str] | None, prog: str = "pretrain_gpt.py") -> tuple[Config, bool]:
    """Returns the resolved config and whether ``--print`` was asked for."""
    args = build_parser(prog).parse_args(argv)
    return load_config(args.config, args.overrides), args.print
