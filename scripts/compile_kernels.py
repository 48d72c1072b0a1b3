"""Compile every Triton kernel for a Hopper GPU on a machine without one.

Why this exists: the kernel tests run Triton's interpreter, which never lowers a
kernel to GPU code, so a kernel can pass every CPU test and still fail to compile, or
compile into register spills that cost bandwidth. Triton's compiler and ptxas need no
GPU, so this script checks the compiled path on any machine:

1. record: the ops run forward and backward through the dispatcher's Triton kernels at
   the benchmark shapes (``scripts/bench_kernels.py``), in a child process with
   ``TRITON_INTERPRET=1`` whose launches are recorded and not executed; each launch
   gives the kernel, its argument types, its compile-time constants and ``num_warps``
   exactly as the wrappers choose them for those shapes;
2. compile: each distinct launch is lowered to an ``sm_90a`` cubin (what an H100/H200
   runs) and ``cuobjdump --dump-resource-usage`` reads its registers, stack and local
   memory (stack/local bytes above zero mean spills).

    python scripts/compile_kernels.py                     # both shapes, bf16: ~1 min
    python scripts/compile_kernels.py --shapes gpt2-medium --output kernels_sm90.md

Pointer arguments are compiled as 16-byte aligned (torch allocations are); integer
arguments are left unspecialised, so the code may differ slightly from what the JIT
builds for a particular launch.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGET_ARCH = 90
# Hopper (sm_90) per-SM limits, for the occupancy the registers and shared memory allow.
SM_REGISTERS = 65536
SM_SHARED_BYTES = 228 * 1024
SM_MAX_WARPS = 64
SM_MAX_PROGRAMS = 32
REGISTER_GRANULE = 256  # registers are allocated per warp in blocks of this many
_DTYPES = {"torch.bfloat16": "bf16", "torch.float32": "fp32", "torch.float16": "fp16",
           "torch.int64": "i64", "torch.int32": "i32", "torch.bool": "i1"}


# ------------------------------------------------------------------------------ record


def _arg_type(value: object) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        return "*" + _DTYPES[str(value.dtype)]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unsupported kernel argument {type(value).__name__}")


def _record(shape_names: Sequence[str], dtype_name: str) -> list[dict]:
    """Run every op at the shapes with launches recorded instead of executed."""
    import torch
    from triton.runtime import interpreter

    from megatron_paci.kernels.dispatch import COVERS, select_kernels

    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_kernels

    launches: list[dict] = []

    def record(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        names = list(params)
        values = dict(zip(names, args, strict=False))
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        values.update(kwargs)
        signature, constexprs = {}, {}
        for name in names:
            if "constexpr" in str(params[name].annotation) or values[name] is None:
                signature[name] = "constexpr"
                constexprs[name] = values[name]
            else:
                signature[name] = _arg_type(values[name])
        launches.append({"module": self.fn.__module__, "kernel": self.fn.__name__,
                         "signature": signature, "constexprs": constexprs,
                         "options": options})

    interpreter.InterpretedFunction.run = record
    device = torch.device("cpu")
    dtype = getattr(torch, dtype_name)
    kernels = select_kernels("triton", [], device)
    shapes = {s.name: s for s in bench_kernels.SHAPES + bench_kernels.SMOKE_SHAPES}
    for name in shape_names:
        for op in COVERS["triton"]:
            case = bench_kernels.make_case(op, shapes[name], device, dtype)
            out = getattr(kernels, op)(*case.args, **case.kwargs)
            torch.autograd.grad(out, case.leaves(), torch.ones_like(out))
    return launches


# ------------------------------------------------------------------------------ compile


@dataclass
class Compiled:
    kernel: str
    constexprs: dict
    num_warps: int
    seconds: float
    usage: dict[str, int]
    error: str = ""

    @property
    def spills(self) -> bool:
        return self.usage.get("STACK", 0) > 0 or self.usage.get("LOCAL", 0) > 0

    def resident_warps(self) -> int:
        """Warps one SM holds at once, as registers and shared memory allow."""
        per_warp = -(-self.usage.get("REG", 0) * 32 // REGISTER_GRANULE) * REGISTER_GRANULE
        programs = min(SM_MAX_PROGRAMS, SM_MAX_WARPS // self.num_warps)
        if per_warp:
            programs = min(programs, SM_REGISTERS // (per_warp * self.num_warps))
        if self.usage.get("SHARED", 0):
            programs = min(programs, SM_SHARED_BYTES // self.usage["SHARED"])
        return programs * self.num_warps


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if "REG:" in ln)
    usage = {}
    for item in line.split():
        key, _, value = item.partition(":")
        if value.isdigit():
            usage[key] = int(value)
    return usage


def compile_launch(launch: dict) -> Compiled:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    signature = launch["signature"]
    pointers = [i for i, t in enumerate(signature.values()) if t.startswith("*")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in pointers}
    warps = launch["options"].get("num_warps", 4)
    start = time.perf_counter()
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=launch["constexprs"],
                        attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", TARGET_ARCH, 32),
                           options={"num_warps": warps})
        usage = _resource_usage(k.asm["cubin"])
        error = ""
    except Exception as e:  # report it in the table; the next kernel still compiles
        usage, error = {}, f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
    return Compiled(launch["kernel"], launch["constexprs"], warps,
                    time.perf_counter() - start, usage, error)


def distinct(launches: list[dict]) -> list[dict]:
    seen, out = set(), []
    for launch in launches:
        key = json.dumps(launch, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(launch)
    return out


def report(results: list[Compiled], shapes: Sequence[str], dtype: str) -> str:
    import triton

    lines = [f"## Triton kernels compiled for sm_{TARGET_ARCH}a (no GPU needed)", "",
             f"Launches of every op, forward and backward, at {', '.join(shapes)} in {dtype}; "
             f"triton {triton.__version__}. Registers per thread, and stack/local bytes "
             "per thread (above zero: spills); warps/SM: how many warps of the kernel one "
             f"SM holds at once by its registers and shared memory (of {SM_MAX_WARPS}).", "",
             "| kernel | compile-time constants | warps | registers | stack | local | "
             "shared | warps/SM | compile s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        consts = ", ".join(f"{k}={v}" for k, v in r.constexprs.items())
        if r.error:
            lines.append(f"| {r.kernel} | {consts} | {r.num_warps} | {r.error} | | | | | |")
            continue
        u = r.usage
        lines.append(f"| {r.kernel} | {consts} | {r.num_warps} | {u.get('REG', 0)} | "
                     f"{u.get('STACK', 0)} | {u.get('LOCAL', 0)} | {u.get('SHARED', 0)} | "
                     f"{r.resident_warps()} | {r.seconds:.1f} |")
    failed = sum(bool(r.error) for r in results)
    spilled = sum(r.spills for r in results if not r.error)
    lines += ["", f"{len(results)} distinct launches: {len(results) - failed} compiled, "
              f"{failed} failed; {spilled} with spills.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["gpt2-medium", "gpt3-1.3b"],
                   help="bench_kernels shape names (smoke, gpt2-medium, gpt3-1.3b)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--output", help="also write the markdown table here")
    p.add_argument("--json", help="also write the results as JSON here")
    p.add_argument("--record-to", help=argparse.SUPPRESS)  # the child process's job
    args = p.parse_args(argv)

    if args.record_to:
        launches = distinct(_record(args.shapes, args.dtype))
        Path(args.record_to).write_text(json.dumps(launches))
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_kernels: unset TRITON_INTERPRET (the kernels must be compiled, not "
              "interpreted)", file=sys.stderr)
        return 2
    if not Path(_tool("cuobjdump")).exists():
        print(f"compile_kernels: {_tool('cuobjdump')} is missing from this triton install",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        record_file = Path(tmp) / "launches.json"
        env = dict(os.environ, TRITON_INTERPRET="1")
        child = subprocess.run([sys.executable, __file__, "--record-to", str(record_file),
                                "--shapes", *args.shapes, "--dtype", args.dtype], env=env)
        if child.returncode != 0:
            print("compile_kernels: recording the launches failed", file=sys.stderr)
            return 1
        launches = json.loads(record_file.read_text())
    results = []
    for i, launch in enumerate(launches, 1):
        results.append(compile_launch(launch))
        r = results[-1]
        print(f"compile_kernels: [{i}/{len(launches)}] {r.kernel} {r.constexprs} "
              f"-> {r.error or r.usage}", file=sys.stderr, flush=True)
    text = report(results, args.shapes, args.dtype)
    print(text, end="")
    if args.output:
        Path(args.output).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(
            [{"kernel": r.kernel, "constexprs": r.constexprs, "num_warps": r.num_warps,
              "usage": r.usage, "error": r.error} for r in results]))
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
