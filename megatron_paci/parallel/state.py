"""Where this process sits in the world: tensor x pipeline x data, Megatron's order.

Rank layout (tensor ranks adjacent, so a tensor-parallel group stays inside a
node, then data, then pipeline outermost)::

    rank = tp_rank + tp * (dp_rank + dp * pp_rank)

Everything above this layer asks a ``ParallelState`` for ranks and groups
instead of reading the environment, so a one-process run is just the state
with every size 1 and every group ``None``.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_paci.parallel import liveness

FAIL_WAIT_S = 10.0  # fail_on_all_ranks: how long ranks > 0 under torchrun give rank 0


class ParallelConfigError(ValueError):
    """Sizes that do not divide; raised identically on every rank before any collective."""


@dataclass(frozen=True)
class ParallelState:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    tensor_rank: int = 0
    tensor_size: int = 1
    pipeline_rank: int = 0
    pipeline_size: int = 1
    data_rank: int = 0
    data_size: int = 1
    tensor_group: object | None = field(default=None, compare=False, repr=False)
    pipeline_group: object | None = field(default=None, compare=False, repr=False)
    data_group: object | None = field(default=None, compare=False, repr=False)
    # First and last pipeline stage of this (tp, dp) position, for tied embeddings.
    embedding_group: object | None = field(default=None, compare=False, repr=False)
    pipeline_ranks: tuple[int, ...] = (0,)
    # Point-to-point between pipeline stages: (to a higher rank, to a lower rank).
    p2p_groups: tuple[object, object] | None = field(default=None, compare=False,
                                                     repr=False)

    @property
    def is_logging_rank(self) -> bool:
        # The loss lives on the last pipeline stage; log from its first tp/dp rank.
        return (self.pipeline_rank == self.pipeline_size - 1 and self.tensor_rank == 0
                and self.data_rank == 0)

    @property
    def is_first_stage(self) -> bool:
        return self.pipeline_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pipeline_rank == self.pipeline_size - 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def p2p_group(self, src: int, dst: int) -> object | None:
        """The group a pipeline message from global rank ``src`` to ``dst`` travels on.

        NCCL runs one communicator, on one stream, per pair of ranks per group, and each
        send or receive holds that stream until its peer's op runs. With both directions
        between two stages on one group, a stage's send to a neighbour could queue behind
        its receive from that neighbour (interleaved 1F1B deadlocks so). One group per
        direction gives every directed edge its own stream, FIFO at both ends: what the
        schedule validator checks the messages against (pipeline/nccl_model.py)."""
        if self.p2p_groups is None:
            return None
        return self.p2p_groups[0 if src < dst else 1]


def world_from_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's or slurm's environment."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def single_process() -> ParallelState:
    return ParallelState()


def rank_coordinates(rank: int, tensor: int, data: int) -> tuple[int, int, int]:
    """(tp_rank, dp_rank, pp_rank) of a global rank."""
    return rank % tensor, (rank // tensor) % data, rank // (tensor * data)


def global_rank(tp_rank: int, dp_rank: int, pp_rank: int, tensor: int, data: int) -> int:
    return tp_rank + tensor * (dp_rank + data * pp_rank)


def layout_table(world: int, tensor: int, pipeline: int) -> list[dict[str, int]]:
    """Which rank holds what: one row per rank (used by docs and the start-up log)."""
    data = world // (tensor * pipeline)
    rows = []
    for r in range(world):
        tp, dp, pp = rank_coordinates(r, tensor, data)
        rows.append({"rank": r, "tp": tp, "dp": dp, "pp": pp})
    return rows


def check_sizes(world: int, tensor: int, pipeline: int) -> int:
    """Returns the data-parallel size; raises ParallelConfigError naming the sizes."""
    if tensor < 1 or pipeline < 1:
        raise ParallelConfigError(
            f"parallel.tensor={tensor} and parallel.pipeline={pipeline} must be >= 1")
    if world % (tensor * pipeline):
        raise ParallelConfigError(
            f"world size {world} is not divisible by parallel.tensor={tensor} x "
            f"parallel.pipeline={pipeline} = {tensor * pipeline}")
    return world // (tensor * pipeline)


def _backend() -> str:
    """NCCL for CUDA tensors, with gloo beside it for the few CPU tensors that cross
    ranks (checkpoint and RNG metadata): NCCL alone rejects a CPU tensor."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def cuda_device_index(local_rank: int) -> int:
    """This rank's GPU among those it sees. Under torchrun every rank sees the node's
    GPUs (index = local rank); slurm's --gpus-per-task binding shows each task only its
    own, as device 0. Megatron's rule, local rank modulo visible devices, covers both."""
    return local_rank % torch.cuda.device_count()


def check_gpus_for_ranks(local_world: int, visible: int) -> None:
    """NCCL needs a GPU of its own per process; refuse more processes on a node than
    the GPUs they see, before NCCL fails at the first collective."""
    if local_world > visible:
        raise ParallelConfigError(
            f"{local_world} processes on this node (LOCAL_WORLD_SIZE) but {visible} visible "
            f"GPU(s): NCCL needs one GPU per process. Start at most {visible} per node "
            f"(torchrun --nproc_per_node {visible}, NPROC={visible} for scripts/launch.sh) or "
            "train on the CPU with train.device=cpu")


def initialize(tensor: int, pipeline: int, timeout_s: float = 600.0,
               backend: str | None = None) -> ParallelState:
    """Initialise the default process group (if needed) and the tp/pp/dp groups.

    Every rank creates every group in the same order, as ``new_group`` requires.
    """
    rank, world, local_rank = world_from_env()
    data = check_sizes(world, tensor, pipeline)
    if world == 1:
        return single_process()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        backend = backend or _backend()
        if "nccl" in backend:
            if "LOCAL_WORLD_SIZE" in os.environ:  # torchrun: every process sees all GPUs
                check_gpus_for_ranks(int(os.environ["LOCAL_WORLD_SIZE"]),
                                     torch.cuda.device_count())
            torch.cuda.set_device(cuda_device_index(local_rank))
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    # Heartbeats in the rendezvous store: a failed operation can then name the rank
    # that died or froze (liveness.py).
    liveness.start(rank, world, timeout_s)
    # Every rank meets here once before the groups are made.
    dist.barrier()
    tp_rank, dp_rank, pp_rank = rank_coordinates(rank, tensor, data)
    # Every group waits parallel.timeout_s for a peer (new_group's own default is 30 min).
    timeout = datetime.timedelta(seconds=timeout_s)
    groups: dict[str, object] = {}
    for dp_i in range(data):
        for pp_i in range(pipeline):
            ranks = [global_rank(t, dp_i, pp_i, tensor, data) for t in range(tensor)]
            g = dist.new_group(ranks, timeout=timeout)
            if (dp_i, pp_i) == (dp_rank, pp_rank):
                groups["tensor"] = g
    for tp_i in range(tensor):
        for pp_i in range(pipeline):
            ranks = [global_rank(tp_i, d, pp_i, tensor, data) for d in range(data)]
            g = dist.new_group(ranks, timeout=timeout)
            if (tp_i, pp_i) == (tp_rank, pp_rank):
                groups["data"] = g
    pipeline_ranks: tuple[int, ...] = ()
    for tp_i in range(tensor):
        for dp_i in range(data):
            ranks = [global_rank(tp_i, dp_i, p, tensor, data) for p in range(pipeline)]
            g = dist.new_group(ranks, timeout=timeout)
            emb_ranks = sorted({ranks[0], ranks[-1]})
            e = dist.new_group(emb_ranks, timeout=timeout)
            up = dist.new_group(ranks, timeout=timeout)
            down = dist.new_group(ranks, timeout=timeout)
            if (tp_i, dp_i) == (tp_rank, dp_rank):
                groups["pipeline"], groups["embedding"] = g, e
                groups["up"], groups["down"] = up, down
                pipeline_ranks = tuple(ranks)
    state = ParallelState(
        rank=rank, world_size=world, local_rank=local_rank,
        tensor_rank=tp_rank, tensor_size=tensor,
        pipeline_rank=pp_rank, pipeline_size=pipeline,
        data_rank=dp_rank, data_size=data,
        tensor_group=groups["tensor"] if tensor > 1 else None,
        pipeline_group=groups["pipeline"] if pipeline > 1 else None,
        data_group=groups["data"] if data > 1 else None,
        embedding_group=groups["embedding"] if pipeline > 1 else None,
        pipeline_ranks=pipeline_ranks,
        p2p_groups=(groups["up"], groups["down"]) if pipeline > 1 else None,
    )
    if pipeline > 1:
        _open_p2p(state)
    return state


def neighbour_edges(ranks: tuple[int, ...]) -> list[tuple[int, int]]:
    """Every directed edge a pipeline over ``ranks`` may send on (to the next and the
    previous stage, and between the last and the first for virtual stages), each once,
    in one order every rank computes alike."""
    n = len(ranks)
    pairs = sorted({tuple(sorted((ranks[i], ranks[(i + 1) % n]))) for i in range(n)})
    return [edge for lo, hi in pairs for edge in ((lo, hi), (hi, lo))]


def _open_p2p(state: ParallelState) -> None:
    """Exchange one message on every edge, in ``neighbour_edges``' order, before training.

    NCCL makes a pair's communicator at its first message, and making it blocks both
    hosts until both arrive: left to the schedule, one stage could wait to make the
    communicator of one edge while its neighbour waits on another's. Taken in one order
    that every rank follows, each edge's two ranks have finished all earlier edges, so
    none waits on a rank that waits on it."""
    nccl = "nccl" in str(dist.get_backend()) and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    buf = torch.zeros(1, device=device)
    rank = state.rank
    for src, dst in neighbour_edges(state.pipeline_ranks):
        if rank not in (src, dst):
            continue
        group = state.p2p_group(src, dst)
        if rank == src:
            dist.isend(buf, dst, group=group).wait()
        else:
            dist.irecv(buf, src, group=group).wait()
    if nccl:
        torch.cuda.synchronize()


def shutdown() -> None:
    """Leave cleanly: a barrier first avoids gloo aborts at exit (design.md)."""
    liveness.stop()
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def fail_on_all_ranks(message: str, code: int = 2, speaks: bool | None = None) -> None:
    """Same error everywhere, printed once: rank 0 speaks (or whichever ranks ``speaks``
    says, e.g. one per pipeline stage that stopped), every rank exits. A message of
    several lines (every bad key of one config) prints as one ``error:`` line each."""
    rank, _, _ = world_from_env()
    if rank == 0 if speaks is None else speaks:
        print("\n".join(f"error: {line}" for line in message.splitlines() or [""]),
              file=sys.stderr, flush=True)
    elif "TORCHELASTIC_RUN_ID" in os.environ:
        # torchrun stops every worker once one has exited: the others wait (a moment;
        # torchrun ends them when rank 0 is done) so that rank 0 is not stopped before
        # it has printed the error.
        time.sleep(FAIL_WAIT_S)
    sys.exit(code)
