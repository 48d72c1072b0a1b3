"""scripts/trace_stages.py's arithmetic on hand-built traces: waits pair with the sends
they waited for (first in, first out per edge) and split at the send's post time."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture(scope="module")
def trace():
    sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location("_trace_stages", SCRIPTS / "trace_stages.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_waits_pair_with_sends_in_order_per_edge(trace):
    rank0 = [("send", 1.0, 1.0, 1), ("send", 2.0, 2.0, 1)]
    rank1 = [("wait", 0.0, 1.5, 0), ("wait", 1.6, 2.4, 0)]
    assert trace.pair_waits([rank0, rank1]) == {0: [], 1: [(0.0, 1.5, 1.0), (1.6, 2.4, 2.0)]}


def test_breakdown_by_hand(trace):
    # Rank 0 forwards, sends, waits for the gradient rank 1 sends at 2.5; rank 1 waits for
    # the activation rank 0 sends at 1.0. Window: 0 to 6 (both stages' last STEP end).
    rank0 = [("F", 0, 1, -1), ("send", 1, 1.01, 1), ("wait", 1.01, 3, 1), ("B", 3, 5, -1),
             ("S", 5, 6, -1)]
    rank1 = [("F", 0, 0.5, -1), ("wait", 0.5, 1.5, 0), ("B", 1.5, 2.5, -1),
             ("send", 2.5, 2.5, 0), ("S", 2.5, 6, -1)]
    r0, r1 = trace.breakdown([rank0, rank1], skip=0.0)
    span = 6.0
    want0 = {"F": 1 / span, "B": 2 / span, "S": 1 / span,
             "wait: neighbour late": (2.5 - 1.01) / span, "wait: transport": (3 - 2.5) / span}
    want1 = {"F": 0.5 / span, "B": 1 / span, "S": 3.5 / span,
             "wait: neighbour late": (1.0 - 0.5) / span, "wait: transport": 0.5 / span}
    for row, want in ((r0, want0), (r1, want1)):
        for k, v in want.items():
            assert row[k] == pytest.approx(v), k
        assert row["other"] == pytest.approx(1 - sum(want.values()), abs=1e-9)
        assert row["ms per iteration"] == pytest.approx(6000.0)
    assert r1["compute ms per action"] == pytest.approx({"F": 500.0, "B": 1000.0, "S": 3500.0})
    text = trace.table([r0, r1])
    assert text.splitlines()[2].startswith("| 0 | 6000.0 |")


def test_unpaired_waits_are_one_column(trace):
    peer = [("F", 0, 1, -1), ("wait", 1, 2, -1), ("S", 2, 4, -1)]
    (row,) = trace.breakdown([peer], skip=0.0, paired=False)
    assert row["wait"] == pytest.approx(0.25)
    assert row["other"] == pytest.approx(0.0, abs=1e-9)
