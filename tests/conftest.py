"""Session-wide test setup.

Triton reads TRITON_INTERPRET when it is first imported, so it is set here,
before any test module can import it: on a machine without CUDA the kernel
tests run through Triton's CPU interpreter.
"""

import os

try:
    import torch

    _cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _cuda = False

if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
