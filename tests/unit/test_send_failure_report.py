"""A failed send names the stage and rank it went to, gloo's first line without its
source location, and the liveness report on that peer, like a failed receive does; so does
a receive posted ahead that gloo refuses at once (the peer's connection already gone)."""

from types import SimpleNamespace

import pytest
import torch

from megatron_paci.parallel import comm, liveness
from megatron_paci.pipeline.actions import Action
from megatron_paci.pipeline.executor import PipelineError, PipelineExecutor


class FailedSend:
    def wait(self):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:598] Connection "
                           "closed by peer [127.0.0.1]:41234\nException raised from ...")


class Report:
    def report(self, ranks):
        return f"rank {ranks[0]} stopped beating 12 s ago (dead or frozen)"


def _stage(stage: int, rank: int, ranks: list[int]) -> PipelineExecutor:
    """Just what the point-to-point methods read: the stage, its rank, the pipeline's
    ranks, the agreed [2, 3] fp32 buffer on the CPU."""
    ex = PipelineExecutor.__new__(PipelineExecutor)
    ex.stage, ex.ranks, ex.shape, ex.device = stage, ranks, (2, 3), "cpu"
    ex.pstate = SimpleNamespace(rank=rank, p2p_group=lambda src, dst: None)
    return ex


def test_failed_send_names_peer_and_its_liveness(monkeypatch):
    stage1 = _stage(1, 3, [1, 3, 5])
    with pytest.raises(PipelineError) as e:
        stage1._wait_send(FailedSend(), 5)
    assert str(e.value) == ("stage 1 (rank 3): a send to stage 2 (rank 5) failed: Connection "
                            "closed by peer [127.0.0.1]:41234")
    monkeypatch.setattr(liveness, "_CURRENT", Report())
    with pytest.raises(PipelineError, match=r"failed: Connection closed by peer \S+; rank 5 "
                                            r"stopped beating 12 s ago \(dead or frozen\)$"):
        stage1._wait_send(FailedSend(), 5)


def test_a_receive_refused_when_posted_names_peer_and_its_liveness(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:598] Connection "
                           "closed by peer [127.0.0.1]:41234\nException raised from ...")

    monkeypatch.setattr(comm, "recv", refuse)
    monkeypatch.setattr(liveness, "_CURRENT", Report())
    stage0 = _stage(0, 0, [0, 1])
    with pytest.raises(PipelineError) as e:
        stage0._post_recv(1, Action("B", 3))
    assert str(e.value) == ("stage 0 (rank 0) was posting the receive for B3 from stage 1 "
                            "(rank 1): Connection closed by peer [127.0.0.1]:41234; rank 1 "
                            "stopped beating 12 s ago (dead or frozen)")


def test_a_send_refused_when_posted_names_peer(monkeypatch):
    def refuse(*args, **kwargs):
        raise FailedSend().wait()

    monkeypatch.setattr(comm, "send", refuse)
    stage0 = _stage(0, 0, [0, 1])
    with pytest.raises(PipelineError) as e:
        stage0._send(torch.zeros(2, 3), 1)
    assert str(e.value) == ("stage 0 (rank 0): a send to stage 1 (rank 1) failed: Connection "
                            "closed by peer [127.0.0.1]:41234")
