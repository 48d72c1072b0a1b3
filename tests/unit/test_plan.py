"""The dry-run planner against the paper's formula, the design table and measured tensors.

Measurement, on the CPU: weights, gradients and optimizer state are the storage sizes of
the tensors a built Trainer holds; activations are the distinct storages a forward hands
to autograd for its backward (``saved_tensors_hooks``), parameters left out. Both are
exact and deterministic, unlike a peak-RSS difference, which the allocator's caching and
the other processes on a shared machine blur.
"""

import os
import sys

import pytest
import torch

from megatron_paci.config import load_config
from megatron_paci.model.gpt import GPTModel, StageSpec
from megatron_paci.parallel.state import ParallelConfigError
from megatron_paci.pipeline.registry import get_schedule, schedule_names
from megatron_paci.training import plan as P

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "distributed"))
from parallel_equality import config, make_dataset  # noqa: E402


def model_cfg(*extra):
    return load_config(None, ["model.num_layers=8", "model.hidden_size=256",
                              "model.num_attention_heads=8", "model.seq_length=512",
                              "model.vocab_size=1000", *extra])


@pytest.mark.parametrize("tp", [1, 2, 8])
def test_megatron_count_is_the_papers_formula(tp):
    m = model_cfg().model
    s, b, h, a = 512, 4, 256, 8
    no_sp = s * b * h * (10 + 24 / tp + 5 * a * s / (h * tp))
    sp = s * b * h * (34 + 5 * a * s / h) / tp
    assert P.layer_activation_bytes(m, b, tp, False) == pytest.approx(no_sp)
    assert P.layer_activation_bytes(m, b, tp, True) == pytest.approx(sp)


def saved_bytes_of_forward(model, **inputs) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    held = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            held[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs)
    return sum(held.values())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("pre,post", [(False, False), (True, False), (False, True)])
def test_activation_estimate_within_20_percent_of_saved_tensors(dropout, pre, post):
    cfg = load_config(None, ["model.num_layers=2", "model.hidden_size=64",
                             "model.num_attention_heads=4", "model.seq_length=64",
                             f"model.dropout={dropout}", f"model.attention_dropout={dropout}",
                             "model.tie_embeddings=false"])
    m, b, vocab = cfg.model, 4, 512
    torch.manual_seed(0)
    model = GPTModel(m, vocab, stage=StageSpec(0, 2, pre, post))
    inputs = ({"tokens": torch.randint(0, vocab, (b, 64))} if pre
              else {"hidden": torch.randn(64, b, 64, requires_grad=True)})
    if post:
        inputs["labels"] = torch.randint(0, vocab, (b, 64))
    measured = saved_bytes_of_forward(model, **inputs)
    sb = P.saved_bytes(cfg, "cpu")
    estimate = 2 * P.layer_activation_bytes(m, b, sb=sb)
    if pre:
        estimate += P.embedding_activation_bytes(m, b, sb=sb)
    if post:
        estimate += P.head_activation_bytes(m, b, vocab, sb=sb)
    assert abs(estimate / measured - 1) < 0.2, (estimate, measured)


def storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("distributed", [False, True])
def test_state_estimate_matches_a_built_trainers_tensors(tmp_path, distributed):
    from megatron_paci.training.trainer import Trainer

    cfg = config(make_dataset(str(tmp_path)), str(tmp_path / "run"), 2,
                 **{"optim.distributed_optimizer": distributed})
    trainer = Trainer(cfg)
    stage = P.make_plan(cfg, 1, 80).chosen.stages[0]
    opt = trainer.optimizer
    weights = storage_bytes(trainer.model.parameters())
    grads = opt.grad_buffer.buffer.untyped_storage().nbytes()
    state = opt.state_by_name(create=True)
    moments = storage_bytes(v for k, v in state.items() if k.endswith(("exp_avg", "exp_avg_sq")))
    assert stage.parameters == sum(p.numel() for p in trainer.model.parameters())
    for est, real in ((stage.weights, weights), (stage.grads, grads),
                      (stage.optimizer, moments)):
        assert abs(est / real - 1) < 0.2, (est, real)
    if distributed:  # the fp32 weights live in the sharded optimizer's buffer: no copy
        assert weights == opt.distributed.param_buffer.untyped_storage().nbytes()


def pipeline_plan(schedule, window, stages=4, *extra):
    cfg = model_cfg(f"parallel.pipeline={stages}", "train.micro_batch_size=1",
                    f"train.global_batch_size={window}", f"pipeline.schedule={schedule}",
                    *extra)
    return P.make_plan(cfg, stages, 80)


@pytest.mark.parametrize("window", [2, 4, 8])
def test_in_flight_per_stage_is_the_design_table(window):
    plan = pipeline_plan("paci", window)
    by_name = {sp.name: sp for sp in plan.schedules}
    p = 4
    flush = [st.in_flight for st in by_name["1f1b_flush"].stages]
    assert flush == [min(p - s, window) for s in range(p)]
    assert [st.in_flight for st in by_name["paci"].stages] == [p - s for s in range(p)]
    if window >= p - 1:
        assert [st.in_flight for st in by_name["pipedream_2bw"].stages] == \
            [p - s for s in range(p)]
    else:
        assert "m >= P-1" in by_name["pipedream_2bw"].problem


def test_activations_grow_with_in_flight_and_2bw_adds_a_weight_copy():
    plan = pipeline_plan("paci", 8)
    by_name = {sp.name: sp for sp in plan.schedules}
    layer = P.layer_activation_bytes(plan.cfg.model, 1, sb=plan.saved)
    casts = 2 * P.layer_parameters(plan.cfg.model)[1]  # bf16 copies, per layer
    middle = by_name["paci"].stages[1]  # 2 layers, no embedding or head, 3 in flight
    assert middle.activations == pytest.approx(3 * 2 * layer)
    assert middle.weight_casts == pytest.approx(3 * 2 * casts)
    for a, b in zip(by_name["paci"].stages, by_name["pipedream_2bw"].stages, strict=True):
        assert b.extra_copies == a.weights == 4 * a.parameters
        assert b.total == pytest.approx(a.total + a.weights)
    assert by_name["paci"].steady_bubble == pytest.approx(0.0, abs=1e-9)
    assert by_name["1f1b_flush"].bubble > 0.1


def test_every_registered_schedule_is_planned():
    plan = pipeline_plan("1f1b_flush", 8)
    assert [sp.name for sp in plan.schedules] == list(schedule_names())
    for sp in plan.schedules:
        assert sp.title == get_schedule(sp.name).title


def test_distributed_optimizer_shards_adam_over_dp():
    cfg = model_cfg("train.micro_batch_size=1", "train.global_batch_size=8")
    plain = P.make_plan(cfg, 8, 80).chosen.stages[0]
    sharded = P.make_plan(load_config(None, [*_args(cfg), "optim.distributed_optimizer=true"]),
                          8, 80).chosen.stages[0]
    assert plain.optimizer == 8 * plain.parameters
    assert sharded.optimizer == pytest.approx(plain.optimizer / 8)


def _args(cfg):
    return [f"{k}={v}" for k, v in P.non_default_keys(cfg)]


def test_layout_error_names_the_sizes():
    with pytest.raises(ParallelConfigError, match="world size 6 is not divisible"):
        P.make_plan(model_cfg("parallel.pipeline=4"), 6, 80)


def test_fit_verdict_says_why():
    plan = pipeline_plan("paci", 8)
    assert P.fits(plan) and P.verdict(plan).startswith("fits: yes")
    small = P.make_plan(plan.cfg, 4, 0.01)
    assert not P.fits(small)
    assert P.verdict(small).startswith("fits: no") and "largest part" in P.verdict(small)
