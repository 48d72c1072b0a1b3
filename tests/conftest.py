"""Session-wide test setup.

Triton reads TRITON_INTERPRET when a kernel is defined (at import), so it is set
here, before any test module can import Triton. By default
(``MEGATRON_PACI_TEST_DEVICE`` unset or ``cpu``) the kernel tests build CPU
tensors and run the kernels through Triton's interpreter, on a machine with or
without a GPU. With ``MEGATRON_PACI_TEST_DEVICE=cuda`` the interpreter is left
off, so ``tests/kernels`` runs the compiled kernels on the GPU
(``tests/kernels/conftest.py``; ``scripts/gpu_check.sh`` does this); the
benchmark-sized launches are exercised by ``scripts/bench_kernels.py``.
"""

import os

if os.environ.get("MEGATRON_PACI_TEST_DEVICE", "cpu") != "cuda":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
