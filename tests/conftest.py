"""Session-wide test setup.

Triton reads TRITON_INTERPRET when it is first imported, so it is set here,
before any test module can import it: the kernel tests build CPU tensors and
run the kernels through Triton's interpreter, on a machine with or without a
GPU (compiled kernels on a GPU are exercised by scripts/bench_kernels.py).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
