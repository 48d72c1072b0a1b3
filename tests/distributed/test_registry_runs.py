"""Schedules added without touching the engine: a toy declared here, files, interleaving.

Every flushing schedule trains exactly what one process trains, so each run here is
checked against plain one-process training (1e-5 relative over 10 iterations, fp32):
- GPipe (all forwards, all backwards, then the flush step), declared in this file only
  and registered at run time: nothing else in the repository names it;
- 1F1B-flush from a hand-written schedule file, YAML and CSV, equal to the built-in;
- Megatron's interleaved 1F1B (parallel.virtual_pipeline=2) at P=2, P=4 and P=2 x dp=2,
  and a checkpoint of an interleaved run resumed in one process.
Every run's point-to-point calls, replayed under NCCL's blocking rules, complete.
"""

import os
import textwrap

import numpy as np
import pytest
from launcher import spawn
from parallel_equality import config, losses, make_dataset, train

from megatron_paci.pipeline.actions import STEP, B, F
from megatron_paci.pipeline.nccl_model import executor_calls, stuck_calls
from megatron_paci.pipeline.registry import ScheduleSpec, get_schedule, register, unregister

ITERS = 10


def gpipe(stages, stage, window, num_windows, first_window, chunks):
    """GPipe: every forward of the window, every backward, then the flush."""
    out = []
    for k in range(first_window, first_window + num_windows):
        js = range((k - 1) * window + 1, k * window + 1)
        out += [F(j) for j in js] + [B(j) for j in js] + [STEP(k)]
    return out


GPIPE = ScheduleSpec(name="toy_gpipe", title="GPipe (test toy)", build=gpipe,
                     global_step=True, tied_embeddings_across_stages=True)

FLUSH_P2_M4 = {0: "F1 F2 B1 F3 B2 F4 B3 B4 STEP1", 1: "F1 B1 F2 B2 F3 B3 F4 B4 STEP1"}


def write_schedule_files(directory: str) -> tuple[str, str]:
    yaml_path = os.path.join(directory, "flush_p2.yaml")
    with open(yaml_path, "w") as f:
        f.write(textwrap.dedent(f"""\
            title: hand-written 1F1B-flush
            stages: 2
            microbatches: 4
            steps: global
            ranks:
              0: [{", ".join(FLUSH_P2_M4[0].split())}]
              1: [{", ".join(FLUSH_P2_M4[1].split())}]
            """))
    csv_path = os.path.join(directory, "flush_p2.csv")
    with open(csv_path, "w") as f:
        f.write("# steps: global\nrank,action\n")
        for rank, text in FLUSH_P2_M4.items():
            f.writelines(f"{rank},{a}\n" for a in text.split())
    return yaml_path, csv_path


def cfg_for(prefix, run_dir, **extra):
    return config(prefix, run_dir, ITERS, **{
        "model.num_layers": 4, "parallel.pipeline": 2, "optim.lr": 3e-3, **extra})


def _run(rank, world, prefix, root, tp, stages, runs):
    from megatron_paci.parallel import comm
    from megatron_paci.parallel.state import initialize

    register(GPIPE)  # this process's registry: the spec lives in this file only
    pstate = initialize(tp, stages)
    out = {}
    for name, extra in runs:
        cfg = cfg_for(prefix, os.path.join(root, name), **{"parallel.pipeline": stages,
                                                           "parallel.tensor": tp, **extra})
        comm.P2P_CALLS = []
        trainer = train(cfg, pstate)
        calls, comm.P2P_CALLS = comm.P2P_CALLS, None
        out[name] = {"losses": losses(cfg.run.dir) if trainer.log_enabled else None,
                     "p2p": calls, "stage": pstate.pipeline_rank,
                     "layers": sorted({int(n.split(".")[1]) for n, _ in
                                       trainer.model.named_parameters()
                                       if n.startswith("layers.")}),
                     "peak_in_flight": trainer.executor.telemetry.peak_in_flight}
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("registry")))


def _one_process(prefix, run_dir, **extra):
    return np.array(losses(train(cfg_for(prefix, run_dir, **{"parallel.pipeline": 1,
                                                              **extra})).cfg.run.dir))


def _logged(results, name):
    rows = [r[name]["losses"] for r in results if r[name]["losses"] is not None]
    assert len(rows) == 1
    return np.array(rows[0])


def _recorded(results, name):
    calls = {rank: r[name]["p2p"] for rank, r in enumerate(results)}
    assert sum(map(len, calls.values())) > 0
    return calls


def _derived(stages, window, chunks, segments):
    """The calls executor_calls predicts from the action lists, segment by segment."""
    spec, out, first = get_schedule("1f1b_flush"), {r: [] for r in range(stages)}, 1
    for n in segments:
        lists = [spec.actions(stages, s, window, n, first, chunks) for s in range(stages)]
        for rank, calls in executor_calls(lists, chunks).items():
            out[rank] += calls
        first += n
    return out


def _no_nccl_deadlock(results, name):
    calls = _recorded(results, name)
    assert stuck_calls(calls) is None, (name, stuck_calls(calls))


def test_toy_files_and_interleaving_on_two_ranks_equal_one_process(dataset, tmp_path):
    register(GPIPE)
    try:
        yaml_path, csv_path = write_schedule_files(str(tmp_path))
        runs = [
            ("builtin", {"pipeline.schedule": "1f1b_flush"}),
            ("toy", {"pipeline.schedule": "toy_gpipe"}),
            ("yaml", {"pipeline.schedule": f"file:{yaml_path}"}),
            ("csv", {"pipeline.schedule": f"file:{csv_path}"}),
            ("interleaved", {"parallel.virtual_pipeline": 2, "checkpoint.interval": 5}),
        ]
        res = spawn(_run, 2, args=(dataset, str(tmp_path), 1, 2, runs), timeout=400)
        one = _one_process(dataset, str(tmp_path / "one"))
        assert len(one) == ITERS
        for name, _ in runs:
            got = _logged(res, name)
            assert np.abs(got - one).max() / one.min() < 1e-5, (name, got, one)
            _no_nccl_deadlock(res, name)
        # Interleaving at P=2 sends both ways between the same two ranks (rank 1's
        # chunk 0 feeds rank 0's chunk 1): the calls it made are the ones the offline
        # model derives, and they complete because each direction has its own group;
        # on one stream per pair of ranks the same calls deadlock.
        recorded = _recorded(res, "interleaved")
        assert recorded == _derived(2, 4, 2, [5, 5])
        assert stuck_calls(recorded, per_direction=False).startswith("deadlock")
        # The file runs exactly the built-in's actions: bit-identical losses.
        assert (_logged(res, "yaml") == _logged(res, "builtin")).all()
        assert (_logged(res, "csv") == _logged(res, "builtin")).all()
        # GPipe keeps every micro-batch of the window in flight on every stage.
        assert all(r["toy"]["peak_in_flight"] == 4 for r in res)
        # Round-robin chunks: rank 0 holds virtual stages 0 and 2 (layers 0 and 2).
        assert [r["interleaved"]["layers"] for r in res] == [[0, 2], [1, 3]]
    finally:
        unregister("toy_gpipe")

    # The interleaved run's checkpoint at iteration 5, resumed in one process without
    # interleaving: layer names are global, so iterations 6..10 continue one process.
    resumed = train(cfg_for(dataset, str(tmp_path / "interleaved"), **{
        "parallel.pipeline": 1, "checkpoint.load": True}))
    assert resumed.progress.iteration == ITERS
    tail = np.array(losses(resumed.cfg.run.dir))[-5:]
    assert np.abs(tail - one[5:]).max() / one.min() < 1e-5


def test_interleaved_on_four_stages_equals_one_process(dataset, tmp_path):
    """P=4, v=2 (8 layers, one per virtual stage), M=4: Megatron's warm-up of
    2(P-s-1) + (v-1)P forwards differs on every rank."""
    extra = {"model.num_layers": 8, "parallel.virtual_pipeline": 2}
    res = spawn(_run, 4, args=(dataset, str(tmp_path), 1, 4, [("v2", extra)]), timeout=400)
    one = _one_process(dataset, str(tmp_path / "one"), **{"model.num_layers": 8})
    got = _logged(res, "v2")
    assert np.abs(got - one).max() / one.min() < 1e-5, (got, one)
    _no_nccl_deadlock(res, "v2")
    assert _recorded(res, "v2") == _derived(4, 4, 2, [ITERS])
    assert sorted(r["v2"]["layers"] for r in res) == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_interleaved_with_data_parallel_equals_one_process(dataset, tmp_path):
    """P=2 x dp=2, v=2: gradients of both chunks reduce over dp once per window."""
    extra = {"parallel.virtual_pipeline": 2, "train.global_batch_size": 16}
    res = spawn(_run, 4, args=(dataset, str(tmp_path), 1, 2, [("v2dp2", extra)]),
                timeout=400)
    one = _one_process(dataset, str(tmp_path / "one"), **{"train.global_batch_size": 16})
    got = _logged(res, "v2dp2")
    assert np.abs(got - one).max() / one.min() < 1e-5, (got, one)
