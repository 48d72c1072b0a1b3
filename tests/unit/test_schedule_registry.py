"""The schedule registry, interleaved 1F1B, schedule files and the offline list checks.

References are hand-written: Megatron's interleaved order worked out from its rules
(warm-up 2(P-s-1) + (v-1)P, chunk (k mod Pv) // P, micro-batch (k // Pv) P + k mod P),
and Megatron's bubble analysis ((P-1)/(v M) of the ideal time with equal chunk costs).
"""

from __future__ import annotations

import pytest

from megatron_paci.pipeline.actions import STEP, B, F, format_actions, parse_action
from megatron_paci.pipeline.registry import (
    ScheduleSpec,
    get_schedule,
    register,
    schedule_names,
    unregister,
)
from megatron_paci.pipeline.schedule_file import ScheduleFileError, load_schedule_file
from megatron_paci.pipeline.simulate import Costs, bubble_fraction, simulate, summary
from megatron_paci.pipeline.validate import ScheduleListError, check_lists, check_schedule


def gpipe(stages, stage, window, num_windows, first_window, chunks):
    out = []
    for k in range(first_window, first_window + num_windows):
        js = range((k - 1) * window + 1, k * window + 1)
        out += [F(j) for j in js] + [B(j) for j in js] + [STEP(k)]
    return out


@pytest.fixture
def toy():
    spec = register(ScheduleSpec(name="toy_gpipe", title="GPipe", build=gpipe,
                                 global_step=True, tied_embeddings_across_stages=True))
    yield spec
    unregister("toy_gpipe")


def test_a_toy_declared_here_is_a_schedule_everywhere(toy):
    assert "toy_gpipe" in schedule_names() and get_schedule("toy_gpipe") is toy
    check_schedule(toy, 4, 8)
    tl = simulate("toy_gpipe", 4, 8, 2, Costs(1.0, 2.0))
    # GPipe's bubble equals 1F1B's, (P-1)/(M+P-1) per flushed window, at M in flight.
    assert bubble_fraction(tl) == pytest.approx(3 / 11)
    assert summary(tl)["peak_in_flight"] == [8, 8, 8, 8]
    assert summary(tl)["max_drift"] == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="registered already"):
        register(ScheduleSpec(name="toy_gpipe", title="again", build=gpipe,
                              global_step=True, tied_embeddings_across_stages=True))


def test_unregistered_toy_is_gone_and_unknown_names_list_the_registry():
    assert "toy_gpipe" not in schedule_names()
    with pytest.raises(ValueError, match="'gpipe'.*1f1b_flush, pipedream_2bw, paci.*file:"):
        get_schedule("gpipe")


def test_specs_declare_what_the_rest_of_the_system_asks():
    flush, two_bw, paci = (get_schedule(n) for n in ("1f1b_flush", "pipedream_2bw", "paci"))
    assert (flush.global_step, two_bw.global_step, paci.global_step) == (True, False, False)
    assert (flush.weights.copies, two_bw.weights.copies, paci.weights.copies) == (1, 2, 1)
    assert flush.max_chunks is two_bw.max_chunks is paci.max_chunks is None
    assert two_bw.problem(4, 2) and not two_bw.problem(4, 3)
    assert paci.problem(4, 8, 2) is None  # each chunk steps after its own window
    assert "multiple of parallel.pipeline=4" in paci.problem(4, 6, 2)
    assert "use m >= 8 (docs/schedules/virtual_stages.md)" in two_bw.problem(4, 4, 2)
    assert two_bw.problem(4, 8, 2) is None


# Megatron's interleaved 1F1B, P=2, v=2, M=4, worked out by hand from its rules.
INTERLEAVED_P2_V2_M4 = {
    0: "F1 F2 F1c1 F2c1 F3 B1c1 F4 B2c1 F3c1 B1 F4c1 B2 B3c1 B4c1 B3 B4 S1",
    1: "F1 F2 F1c1 B1c1 F2c1 B2c1 F3 B1 F4 B2 F3c1 B3c1 F4c1 B4c1 B3 B4 S1",
}


@pytest.mark.parametrize("stage", [0, 1])
def test_interleaved_order_is_megatrons(stage):
    got = get_schedule("1f1b_flush").actions(2, stage, 4, 1, 1, chunks=2)
    assert format_actions(got) == INTERLEAVED_P2_V2_M4[stage]


def test_interleaved_second_window_is_renumbered_and_flushed():
    got = get_schedule("1f1b_flush").actions(2, 0, 4, 2, 1, chunks=2)
    second = format_actions(got[17:])
    assert second == ("F5 F6 F5c1 F6c1 F7 B5c1 F8 B6c1 F7c1 B5 F8c1 B6 B7c1 B8c1 B7 B8 S2")


def test_interleaving_with_m_equal_p_warms_up_everything():
    acts = get_schedule("1f1b_flush").actions(4, 3, 4, 1, 1, chunks=2)
    kinds = "".join(a.kind[0] for a in acts)
    assert kinds == "F" * 8 + "B" * 8 + "S"


@pytest.mark.parametrize("p,m,v", [(2, 4, 2), (4, 8, 2), (4, 8, 4), (3, 6, 3), (8, 16, 2)])
@pytest.mark.parametrize("windows", [1, 3])
def test_interleaved_bubble_matches_megatrons_analysis(p, m, v, windows):
    """Bubble time / ideal time = (P-1)/(v M) with equal chunk costs, so the idle share
    of wall time is x / (1 + x) with x = (P-1)/(v M)."""
    tl = simulate("1f1b_flush", p, m, windows, Costs(1.0 / v, 2.0 / v), chunks=v)
    x = (p - 1) / (v * m)
    assert bubble_fraction(tl) == pytest.approx(x / (1 + x))
    flat = simulate("1f1b_flush", p, m, windows, Costs(1.0, 2.0))
    assert bubble_fraction(flat) == pytest.approx((p - 1) / (m + p - 1))


def test_interleaving_sizes_are_refused_with_megatrons_rule():
    flush = get_schedule("1f1b_flush")
    assert "multiple of parallel.pipeline=4" in flush.problem(4, 6, 2)
    assert "parallel.pipeline >= 2" in flush.problem(1, 4, 2)
    with pytest.raises(ValueError, match="multiple of parallel.pipeline"):
        flush.actions(4, 0, 6, 1, 1, chunks=2)


def test_every_builtin_size_passes_the_offline_checks():
    for name in ("1f1b_flush", "pipedream_2bw", "paci"):
        spec = get_schedule(name)
        for p in (1, 2, 3, 4, 8):
            for m in (1, 2, 3, 4, 8):
                for v in (1, 2, 3):
                    if spec.problem(p, m, v) is None:
                        check_schedule(spec, p, m, v, num_windows=3)


def test_every_registered_schedule_passes_the_nccl_check():
    """Every registered schedule at P 2..4, v 1..3 and every window M from P to 3P
    that it accepts (interleaving included): the executor's calls complete under NCCL's
    rules with one stream per direction (nccl_model.py). 113 layouts when written."""
    checked = 0
    for name in schedule_names():
        spec = get_schedule(name)
        for p in (2, 3, 4):
            for v in (1, 2, 3):
                for m in range(p, 3 * p + 1):
                    if spec.problem(p, m, v) is None:
                        check_schedule(spec, p, m, v, num_windows=3, nccl=True)
                        checked += 1
    assert checked >= 100
    for name in ("1f1b_flush", "pipedream_2bw", "paci"):
        check_schedule(get_schedule(name), 8, 8, nccl=True)


# --- offline list checks ---------------------------------------------------------------

def lists_of(*texts):
    return [[parse_action(t) for t in text.split()] for text in texts]


@pytest.mark.parametrize("texts, match", [
    (("F1 F2 B1", "F1 B1 F2 B2 S1"), "rank 0: F2 is never backwarded"),
    (("F1 B1 S1 F2 B2", "F1 B1 F2 B2 S1"), r"rank 0, action 2 \(S1\): steps before B2"),
    (("F1 F2 B1 B2 S1", "F1 B1 F2 B2"), "rank 1: ends after STEP0, expected STEP1"),
    (("B1 F1 F2 B2 S1", "F1 B1 F2 B2 S1"), "rank 0, action 0 \\(B1\\): backward before"),
    (("F1 F2 B1 B2 S1", "F1 F1 B1 B2 S1"), "rank 1, action 1 \\(F1\\): forwarded twice"),
    (("F1 F2 B1 B2 S1", "F1 B1 F2 B2 S1 F3"), "outside 1..2"),
    (("F1 B1 F2 B2 S1", "F1 F2 B2 B1 S1"), "deadlocks; ranks waiting at"),
    (("F1 F2 B1 B2 S1", "F1 F2 B2 B1 S1"), "rank 1 -> rank 0: message 0 is sent for gradients "
                                           "of micro-batch 2 .* received as gradients of "
                                           "micro-batch 1"),
])
def test_bad_lists_are_refused_naming_the_first_bad_action(texts, match):
    with pytest.raises(ScheduleListError, match=match):
        check_lists(get_schedule("1f1b_flush"), lists_of(*texts), 2, 1)


def test_a_step_between_forward_and_backward_is_refused_for_a_global_schedule():
    texts = ("F1 F2 F3 F4 B1 B2 S1 B3 B4 S2", "F1 B1 F2 B2 S1 F3 B3 F4 B4 S2")
    with pytest.raises(ScheduleListError, match="does not allow"):
        check_lists(get_schedule("1f1b_flush"), lists_of(*texts), 2, 2)
    check_lists(get_schedule("paci"), lists_of(*texts), 2, 2)  # local steps: fine


# --- schedule files ------------------------------------------------------------------

def test_yaml_and_csv_files_give_the_builtin_lists(tmp_path):
    flush = get_schedule("1f1b_flush")
    one = {s: format_actions(flush.actions(2, s, 4, 1)) for s in range(2)}
    y = tmp_path / "f.yaml"
    y.write_text("stages: 2\nmicrobatches: 4\nranks:\n"
                 + "".join(f"  {s}: [{', '.join(t.split())}]\n" for s, t in one.items()))
    c = tmp_path / "f.csv"
    c.write_text("# steps: global\nrank,action\n"
                 + "".join(f"{s},{a}\n" for s, t in one.items() for a in t.split()))
    for path in (y, c):
        spec = get_schedule(f"file:{path}")
        assert spec.global_step and spec.weights.copies == 1
        for s in range(2):
            assert spec.actions(2, s, 4, 3, 2) == flush.actions(2, s, 4, 3, 2)
        assert "8 micro-batches per window" in spec.problem(2, 8)
        assert spec.problem(2, 4) is None


@pytest.mark.parametrize("text, match", [
    ("rank,action\n0,F1\n0,X2\n", r"f.csv:3: cannot read action 'X2'"),
    ("rank,action\n0,F1,extra\n", r"f.csv:2: expected 'rank,action'"),
    ("rank,action\n0,F1\n0,F2\n0,B1\n", "rank 0: F2 is never backwarded"),
    ("rank,action\n0,F1\n0,S1\n0,B1\n", r"steps before B1"),
    ("rank,action\n0,F1\n0,B1\n0,S1\n2,F1\n", r"ranks \[0, 2\] given, expected 0..1"),
])
def test_bad_schedule_files_name_the_file_and_the_row(tmp_path, text, match):
    path = tmp_path / "f.csv"
    path.write_text(text)
    with pytest.raises(ScheduleFileError, match=match) as e:
        load_schedule_file(str(path))
    assert str(path) in str(e.value)


def test_missing_and_malformed_yaml_files(tmp_path):
    with pytest.raises(ScheduleFileError, match="not found"):
        get_schedule(f"file:{tmp_path / 'nope.yaml'}")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ranks: {0: [F1, B1, S1]}\nwindows: 3\n")
    with pytest.raises(ScheduleFileError, match="unknown key.*windows"):
        load_schedule_file(str(bad))
    bad.write_text("ranks: [F1, B1]\n")
    with pytest.raises(ScheduleFileError, match="'ranks' must map"):
        load_schedule_file(str(bad))


# n_{s,c}: the most earlier micro-batches of chunk c in flight at a forward of chunk c
# on rank s (rows: ranks; entries: chunks), docs/schedules/virtual_stages.md's table.
EARLIER_IN_FLIGHT = {(2, 2): [[3, 1], [2, 0]], (2, 3): [[3, 2, 1], [3, 1, 0]],
                     (4, 2): [[7, 3], [7, 3], [6, 2], [4, 0]],
                     (4, 3): [[7, 6, 3], [7, 4, 3], [7, 3, 2], [7, 3, 0]]}


def test_same_chunk_backwards_in_flight():
    """docs/schedules/virtual_stages.md's table: the most backwards of chunk c between
    F(j, c) and B(j, c) in Megatron's interleaved order, which sets PACI's bound there."""
    from megatron_paci.pipeline.orders import interleaved_one_f_one_b

    for (p, v), rows in EARLIER_IN_FLIGHT.items():
        n = 8 * p
        for s in range(p):
            acts = interleaved_one_f_one_b(p, s, v, n)
            at = {(a.kind, a.chunk, a.index): i for i, a in enumerate(acts)}
            got = [max(sum(1 for a in acts[at["F", c, j]:at["B", c, j]]
                           if a.kind == "B" and a.chunk == c) for j in range(1, n + 1))
                   for c in range(v)]
            assert got == rows[s], (p, v, s, got)


def test_layout_check_refuses_bad_virtual_pipelines_before_process_groups():
    from megatron_paci.config import load_config
    from megatron_paci.parallel.state import ParallelConfigError
    from megatron_paci.pipeline.partition import chunk_layers
    from megatron_paci.training.layout import validate_layout

    assert chunk_layers(8, 2, 2) == [[(0, 2), (4, 6)], [(2, 4), (6, 8)]]

    def refused(*overrides):
        cfg = load_config(None, ["parallel.pipeline=2", "model.num_layers=4",
                                 "train.micro_batch_size=1", "train.global_batch_size=4",
                                 "train.device=cpu", *overrides])
        with pytest.raises(ParallelConfigError) as e:
            validate_layout(cfg, 2)
        return str(e.value)

    assert "not divisible by parallel.pipeline x parallel.virtual_pipeline = 2 x 3 = 6" in \
        refused("parallel.virtual_pipeline=3")
    assert "multiple of parallel.pipeline=2" in refused("parallel.virtual_pipeline=2",
                                                        "train.global_batch_size=3")
    for schedule in ("paci", "pipedream_2bw"):  # each chunk steps on its own
        cfg = load_config(None, ["parallel.pipeline=2", "model.num_layers=4",
                                 "train.micro_batch_size=1", "train.global_batch_size=2",
                                 "train.device=cpu", "parallel.virtual_pipeline=2",
                                 f"pipeline.schedule={schedule}"])
        assert validate_layout(cfg, 2) == 1
    cuda = load_config(None, ["parallel.pipeline=2", "model.num_layers=4",
                              "train.micro_batch_size=1", "train.global_batch_size=4",
                              "train.device=cuda", "parallel.virtual_pipeline=2"])
    assert validate_layout(cuda, 2) == 1  # the NCCL check passes interleaving at P=2


def test_interleaved_paci_versions_follow_the_emulators_formula():
    """Each chunk steps after its own window: the versions the action lists give every
    (chunk, j) equal the emulator's, which are written from Megatron's index maps."""
    from megatron_paci.pipeline.emulator import interleaved_paci_versions

    paci = get_schedule("paci")
    for p, v in ((2, 2), (2, 3), (3, 2), (4, 2)):
        for a in (p, 2 * p, 3 * p):
            for windows, first in ((1, 1), (3, 1), (2, 4)):
                for s in range(p):
                    table = paci.versions(p, s, a, windows, first, v)
                    for c in range(v):
                        want = interleaved_paci_versions(p, s, a, windows, first, v, c)
                        assert {j: table[c, j] for j in want} == want, (p, v, a, s, c)


# The most updates a micro-batch crosses on chunk c of rank s (rows: ranks; entries:
# chunks), counted from the interleaved lists, as docs/schedules/virtual_stages.md
# tabulates them; never above ceil(n_{s,c} / a).
INTERLEAVED_DRIFT = {
    (2, 2, 2): [[1, 0], [1, 0]], (2, 2, 4): [[1, 0], [1, 0]],
    (2, 3, 2): [[1, 1, 0], [1, 0, 0]],
    (4, 2, 4): [[2, 1], [1, 0], [1, 0], [1, 0]], (4, 2, 8): [[1, 1], [1, 0], [1, 0], [1, 0]],
    (4, 3, 4): [[2, 1, 0], [1, 1, 0], [1, 1, 0], [1, 0, 0]],
}


def test_interleaved_paci_drift_table_and_bound():
    paci = get_schedule("paci")
    for (p, v, a), rows in INTERLEAVED_DRIFT.items():
        n = EARLIER_IN_FLIGHT[p, v]
        for s in range(p):
            table = paci.versions(p, s, a, 6, 1, v)
            got = [max(vb - vf for (c, _), (vf, vb) in table.items() if c == chunk)
                   for chunk in range(v)]
            assert got == rows[s], (p, v, a, s, got)
            assert all(d <= -(-n[s][c] // a) for c, d in enumerate(got))


def test_interleaved_2bw_needs_each_micro_batch_to_cross_at_most_one_update():
    """PipeDream-2BW keeps two versions of a chunk while F(j, c) finds the chunk at
    version two_bw_version(j, m) or one newer, i.e. while no micro-batch crosses more
    than one update of its chunk. Checked on the lists directly: the registry accepts
    exactly the windows where that holds (P=2: any; P>=3: m >= 2P), and without
    interleaving its old rule m >= P-1 is the same condition."""
    from megatron_paci.pipeline.orders import interleaved_one_f_one_b
    from megatron_paci.pipeline.schedules import local_steps
    from megatron_paci.pipeline.versions import two_bw_version

    def stash_holds(p, v, m):
        for s in range(p):
            acts = local_steps(interleaved_one_f_one_b(p, s, v, 8 * max(m, p)), m)
            steps = [0] * v
            for a in acts:
                if a.kind == "STEP":
                    steps[a.chunk] += 1
                elif a.kind == "F" and steps[a.chunk] - two_bw_version(a.index, m) not in (0, 1):
                    return False
        return True

    two_bw = get_schedule("pipedream_2bw")
    for p, v, want in ((2, 2, 2), (2, 3, 2), (3, 2, 6), (4, 2, 8), (4, 3, 8)):
        ok = [m for m in range(p, 4 * p + 1, p) if stash_holds(p, v, m)]
        assert ok == list(range(want, 4 * p + 1, p)), (p, v, ok)
        assert [m for m in range(p, 4 * p + 1, p) if two_bw.problem(p, m, v) is None] == ok
    for p in (2, 3, 4):
        ok = [m for m in range(1, 2 * p) if stash_holds(p, 1, m)]
        assert ok == list(range(p - 1 or 1, 2 * p))
        assert [m for m in range(1, 2 * p) if two_bw.problem(p, m, 1) is None] == ok


def test_validator_checks_each_chunks_own_step():
    from megatron_paci.pipeline.actions import parse_action
    from megatron_paci.pipeline.validate import ScheduleListError, check_rank

    def acts(text):
        return [parse_action(t) for t in text.split()]

    paci, flush = get_schedule("paci"), get_schedule("1f1b_flush")
    good = acts("F1 F1c1 B1c1 S1c1 B1 S1")
    check_rank(paci, 0, good, 1, 1, 1, 2)
    with pytest.raises(ScheduleListError, match=r"action 2 \(S1c1\): steps before B1c1"):
        check_rank(paci, 0, acts("F1 F1c1 S1c1 B1c1 B1 S1"), 1, 1, 1, 2)
    with pytest.raises(ScheduleListError, match="ends after STEP0 of chunk 1"):
        check_rank(paci, 0, acts("F1 F1c1 B1c1 B1 S1"), 1, 1, 1, 2)
    with pytest.raises(ScheduleListError, match="a global STEP updates every chunk"):
        check_rank(flush, 0, acts("F1 F1c1 B1c1 B1 S1c1"), 1, 1, 1, 2)
