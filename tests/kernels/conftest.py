"""The device the kernel tests run on: the CPU through Triton's interpreter (default),
or a GPU with compiled kernels when ``MEGATRON_PACI_TEST_DEVICE=cuda``.

Tests still draw their inputs on the CPU from seeded generators and move them with
``.to(kernel_device)``, so both devices see the same values. tests/conftest.py leaves
TRITON_INTERPRET unset in the CUDA mode; if it is set anyway, the "GPU" run would only
interpret the kernels, so the fixture refuses it.
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE_VAR = "MEGATRON_PACI_TEST_DEVICE"


def requested_device() -> str:
    """``cpu`` or ``cuda``, from ``MEGATRON_PACI_TEST_DEVICE`` (default ``cpu``)."""
    return os.environ.get(DEVICE_VAR, "cpu")


@pytest.fixture(scope="session")
def kernel_device() -> torch.device:
    """Where kernel-test tensors and modules live; fails loudly if that cannot be honoured."""
    name = requested_device()
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda":
        pytest.fail(f"{DEVICE_VAR}={name!r}: expected 'cpu' (default) or 'cuda'", pytrace=False)
    if not torch.cuda.is_available():
        pytest.fail(f"{DEVICE_VAR}=cuda but torch.cuda.is_available() is False "
                    f"(torch {torch.__version__}); unset it to test on the CPU", pytrace=False)
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.fail(f"{DEVICE_VAR}=cuda tests the compiled kernels, but TRITON_INTERPRET=1 "
                    f"is set: unset it", pytrace=False)
    return torch.device("cuda")
