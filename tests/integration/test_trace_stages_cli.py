"""scripts/trace_stages.py on a real P=2 run: its traces share one clock (every receive
ends after the send it was paired with was posted), every action is there, and each
stage's row splits its whole wall time (how the waits split between the neighbour being
late and the transport depends on the machine's load, so tests/unit/test_trace_stages.py
checks that split on hand-built traces)."""

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
    shares = slice(2, len(header) - 1)  # after stage and ms/iter, before the F / B / S ms
    assert "wait: neighbour late" in header[shares] and "wait: transport" in header[shares]
    for row in rows:
        pct = [float(c.rstrip("%")) for c in row.split(" | ")[shares]]
        assert abs(sum(pct) - 100.0) <= 0.05 * len(pct) + 1e-9, row
        assert min(pct[:-1]) >= 0.0, row  # only "other" (the last) may be negative
