"""Sampling from a tensor-parallel model: every tp rank takes part (the forward
all-reduces over tp) and all of them return the ids that the same weights give
in one process.

Reference: the whole model built in this process from the same seed (the tp model
holds shards of exactly those weights), sampled with the same seed. The prompt has
an odd length, so with sequence parallelism the context is padded on every step.
"""

import pytest
from launcher import spawn

from megatron_paci.config.schema import ModelConfig
from megatron_paci.model.gpt import GPTModel
from megatron_paci.training.generate import sample

MODEL = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                    dropout=0.0, attention_dropout=0.0, init_std=0.2)
VOCAB = 64
PROMPT = [5, 9, 3]
TOKENS = 20  # longer than seq_length: the context window slides too


def _sample_worker(rank, world, sequence_parallel):
    from megatron_paci.model.transformer import LayerContext
    from megatron_paci.parallel.state import initialize

    ps = initialize(2, 1)
    ctx = LayerContext(group=ps.tensor_group, size=ps.tensor_size, rank=ps.tensor_rank,
                       sequence_parallel=sequence_parallel)
    model = GPTModel(MODEL, VOCAB, seed=7, tp=ctx)
    return sample(model, PROMPT, TOKENS, vocab_limit=60, seed=3)


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tp_sample_equals_one_process(sequence_parallel):
    expected = sample(GPTModel(MODEL, VOCAB, seed=7), PROMPT, TOKENS, vocab_limit=60, seed=3)
    assert len(expected) == len(PROMPT) + TOKENS and max(expected) < 60
    assert len(set(expected[len(PROMPT):])) > 3  # a real sample, not one repeated token
    got = spawn(_sample_worker, 2, args=(sequence_parallel,))
    assert got == [expected, expected]
