"""Pretrain a GPT: ``python pretrain_gpt.py --config configs/tiny.yaml [section.key=value ...]``.

Thin on purpose: config -> build -> train. Relaunching the same command resumes
from the newest complete checkpoint in ``run.dir/checkpoints``.
"""

from __future__ import annotations

import sys

from megatron_paci.config import ConfigError, format_config, parse_args


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, print_only = parse_args(argv)
        if print_only:
            print(format_config(cfg))
            return 0
        from megatron_paci.training.trainer import Trainer

        trainer = Trainer(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trainer.train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
