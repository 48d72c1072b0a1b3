"""pipeline.layers_per_stage=auto: the cost-balanced split against hand counts and a brute
force over every composition, and the dry run that shows it."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_paci.config import ConfigError, load_config
from megatron_paci.parallel.state import ParallelConfigError
from megatron_paci.pipeline.partition import PartCosts, balanced_split, chunk_layers
from megatron_paci.training import plan as P
from megatron_paci.training.flops import part_costs


def medium(*extra):
    return load_config("configs/gpt2_medium.yaml", ["model.vocab_size=50257", *extra])


def test_gpt2_medium_on_8_stages_by_hand():
    # In units of 6h^2 (h = s = 1024, f = 4h): a layer is 6(4h^2 + 2h*4h) + 6sh = 13 units;
    # the head 6hV + 6V with V = 50257 is 50257/1024 + 50257/1024^2 = 49.13 units, the
    # embedding 3h = 0.0005. The last stage holds the head, so at least 13 + 49.13 = 62.13:
    # with one layer there, no other stage may take 5 (65 > 62.13). The other 23 layers on
    # 7 stages of at most 4: the fewest 4s is two (5 x 3 + 2 x 4), and they go where the
    # costs tie, on stages 5 and 6 (stage 0 would add the embedding; later stages keep
    # fewer micro-batches in flight).
    cfg = medium()
    costs = part_costs(cfg.model, 50257)
    unit = 6 * 1024**2
    assert costs.layer == 13 * unit
    assert costs.head == pytest.approx((50257 / 1024 + 50257 / 1024**2) * unit)
    assert costs.embedding == 3 * 1024
    split = balanced_split(24, 8, costs)
    assert split == [3, 3, 3, 3, 3, 4, 4, 1]
    total = 24 * 13 + 50257 / 1024 + 50257 / 1024**2 + 3 * 1024 / unit
    assert P.max_over_mean(split, costs) == pytest.approx((13 + 49.127) / (total / 8), rel=1e-4)
    even = [3] * 8  # the last stage's 3 layers + the head: 88.13 units, nearly twice the mean
    assert P.max_over_mean(even, costs) == pytest.approx((39 + 49.127) / (total / 8), rel=1e-4)
    assert P.max_over_mean(even, costs) > 1.9


def test_without_a_head_cost_auto_is_even_with_the_extra_layers_late():
    assert balanced_split(10, 4, PartCosts(1.0)) == [2, 2, 3, 3]
    assert balanced_split(4, 1, PartCosts(1.0, 5.0, 7.0)) == [4]
    assert balanced_split(5, 5, PartCosts(1.0, 5.0, 7.0)) == [1] * 5
    # A head worth 2 layers on 2 stages: 5 + 1 layers (5, 1 + 2 = 3) is worse than 4 + 2.
    assert balanced_split(6, 2, PartCosts(1.0, 0.0, 2.0)) == [4, 2]


def compositions(n: int, k: int):
    """Every way to write n as k positive parts, in order."""
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        yield [bounds[i + 1] - bounds[i] for i in range(k)]


def brute_force(n: int, k: int, layer: float, emb: float, head: float) -> list[int]:
    def key(sizes):
        c = [m * layer for m in sizes]
        c[0] += emb
        c[-1] += head
        # the costliest stage, then the next, ...; then the extra layers late
        return sorted(c, reverse=True), sizes

    return min(compositions(n, k), key=key)


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(n=st.integers(1, 10), k=st.integers(1, 6), layer=st.integers(1, 20),
       emb=st.integers(0, 40), head=st.integers(0, 80))
def test_balanced_split_is_the_best_of_all_compositions(n, k, layer, emb, head):
    if k > n:
        return
    # integer costs make ties exact, so the tie-break is tested too
    assert balanced_split(n, k, PartCosts(layer, emb, head)) == brute_force(n, k, layer, emb,
                                                                             head)


def test_virtual_stages_are_balanced_then_dealt_round_robin():
    costs = PartCosts(1.0, 0.0, 3.0)
    # 4 virtual stages over 10 layers, a head worth 3: [3, 3, 3, 1] (max 4) beats the rest
    assert balanced_split(10, 4, costs) == [3, 3, 3, 1]
    assert chunk_layers(10, 2, 2, "auto", costs) == [[(0, 3), (6, 9)], [(3, 6), (9, 10)]]


@pytest.mark.parametrize("overrides,message", [
    (["parallel.pipeline=4", "model.num_layers=3"],
     "parallel.pipeline=4 is larger than model.num_layers=3"),
    (["parallel.pipeline=2", "parallel.virtual_pipeline=3", "model.num_layers=5"],
     "pipeline.layers_per_stage=auto: parallel.pipeline x parallel.virtual_pipeline = 2 x 3"),
])
def test_auto_refuses_too_few_layers_naming_the_keys(overrides, message):
    from megatron_paci.training.layout import validate_layout

    cfg = load_config(None, ["pipeline.layers_per_stage=auto", "train.global_batch_size=8",
                             "train.micro_batch_size=1", *overrides])
    with pytest.raises(ParallelConfigError, match=message.replace("+", r"\+")):
        validate_layout(cfg, int(overrides[0].split("=")[1]))


def test_config_takes_auto_a_list_or_null_and_names_the_key_otherwise():
    assert load_config(None, ["pipeline.layers_per_stage=auto"]).pipeline.layers_per_stage \
        == "auto"
    assert load_config(None, ["pipeline.layers_per_stage=[3,1]"]).pipeline.layers_per_stage \
        == [3, 1]
    assert load_config(None, ["pipeline.layers_per_stage=null"]).pipeline.layers_per_stage \
        is None
    with pytest.raises(ConfigError, match=r"config key 'pipeline.layers_per_stage': expected "
                                          r"list\[int\] \(e.g. \[3, 1\]\) or auto, got 'even'"):
        load_config(None, ["pipeline.layers_per_stage=even"])
    with pytest.raises(ConfigError, match=r"pipeline.layers_per_stage\[1\]': expected int"):
        load_config(None, ["pipeline.layers_per_stage=[1,x]"])


def test_dry_run_shows_the_split_and_the_stage_costs():
    cfg = medium("parallel.pipeline=8", "pipeline.layers_per_stage=auto",
                 "train.global_batch_size=64")
    text = P.format_plan(P.make_plan(cfg, 8, 80))
    flat = " ".join(text.split())
    assert "split (pipeline.layers_per_stage=auto: balanced by FLOPs" in flat
    assert "[3, 3, 3, 3, 3, 4, 4, 1] layers, cost / mean" in flat
    assert "(max/mean 1.38); the even split [3, 3, 3, 3, 3, 3, 3, 3]: max/mean 1.95" in flat
    assert "stage 6: ranks 6-6: layers 19-22" in text
    assert "stage 7: ranks 7-7: layers 23-23 + final norm" in text
    # the memory table follows the split: stage 0 now holds 3 layers, not 3 of an even 24/8
    plan = P.make_plan(cfg, 8, 80)
    even = P.make_plan(medium("parallel.pipeline=8", "train.global_batch_size=64"), 8, 80)
    last = {sp.name: sp.stages[-1].parameters for sp in plan.schedules}
    last_even = {sp.name: sp.stages[-1].parameters for sp in even.schedules}
    per_layer = P.layer_parameters(cfg.model)[0]
    assert last_even["1f1b_flush"] - last["1f1b_flush"] == 2 * per_layer
