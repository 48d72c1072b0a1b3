"""scripts/trace_stages.py on a real P=2 run: its traces share one clock (every receive
ends after the send it was paired with was posted), every action is there, and the flush's
bubble shows up as stage 0 waiting for its neighbour."""

from __future__ import annotations

import json

from conftest import run_cli


def test_a_flush_run_traced_on_one_clock(tmp_path):
    out = run_cli(["scripts/trace_stages.py", "--schedule", "1f1b_flush", "--micro-batches",
                   "2", "--iters", "8", "--trace-dir", str(tmp_path)], timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith(("| 0 |", "| 1 |"))]
    assert len(rows) == 2
    traces = [json.loads((tmp_path / f"trace_{r}.json").read_text()) for r in (0, 1)]
    for log in traces:
        assert sum(e[0] == "F" for e in log) == sum(e[0] == "B" for e in log) == 8 * 2
        assert sum(e[0] == "S" for e in log) == 8
    for dst, log in enumerate(traces):
        waits = [e for e in log if e[0] == "wait"]
        posted = [e[1] for e in traces[1 - dst] if e[0] == "send" and e[3] == dst]
        assert len(waits) == len(posted) == 8 * 2
        assert all(w[2] >= s for w, s in zip(waits, posted, strict=True))
    header = out.stdout.splitlines()[1].split(" | ")
    late = header.index("wait: neighbour late")
    assert float(rows[0].split(" | ")[late].rstrip("%")) > 0
