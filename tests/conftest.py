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


# Longest first, so two xdist workers (scripts/test.sh: ``--dist load --maxschedchunk 1``,
# one test at a time to whichever worker is free) end together instead of one running a
# minutes-long test alone at the end: ``slow``-marked tests, then the command-line runs,
# the multi-process tests, the kernels, and the unit tests last to fill the gaps. Stable
# within a tier, so a file's tests still run in order.
_TIERS = ("integration", "distributed", "kernels", "unit")


def _tier(item) -> tuple[int, int]:
    parts = item.nodeid.split("/")
    where = _TIERS.index(parts[1]) if len(parts) > 2 and parts[1] in _TIERS else len(_TIERS)
    return (0 if item.get_closest_marker("slow") else 1, where)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_tier)
