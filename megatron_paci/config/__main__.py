"""``python -m megatron_paci.config --config X [overrides] --print``."""

from __future__ import annotations

import sys

from megatron_paci.config.cli import parse_args
from megatron_paci.config.loader import ConfigError, to_yaml


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, _ = parse_args(argv, prog="python -m megatron_paci.config")
    except ConfigError as e:
        print("\n".join(f"error: {line}" for line in str(e).splitlines()), file=sys.stderr)
        return 2
    print(to_yaml(cfg), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
