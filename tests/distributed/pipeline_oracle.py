"""The sequential emulator fed with exactly what a distributed run trains on.

The model, the data and the stage split come from the project (they are not what
the comparison checks); the update rule, the LR and the version tables come from
the emulator, which shares no code with the executor, the policies or optim/.
"""

from __future__ import annotations

import dataclasses

from megatron_paci.data.sampler import build_pretraining_data_loader
from megatron_paci.model.gpt import GPTModel, StageSpec
from megatron_paci.pipeline.emulator import emulate
from megatron_paci.pipeline.partition import chunk_layers
from megatron_paci.pipeline.registry import get_schedule
from megatron_paci.training.trainer import Trainer


def emulated_losses(cfg, stages: int, data_parallel: int, windows: int,
                    segments: list[int] | None = None) -> list[float]:
    """Window losses of ``cfg``'s schedule on ``stages`` stages, in one process."""
    one = dataclasses.replace(cfg, parallel=dataclasses.replace(
        cfg.parallel, pipeline=1, tensor=1, virtual_pipeline=1))
    ref = Trainer(one)  # dataset, tokenizer and vocabulary exactly as the real run
    traits = get_schedule(cfg.pipeline.schedule)
    model_cfg = traits.stage_model_config(cfg.model, stages)
    chunks = cfg.parallel.virtual_pipeline
    per_rank = chunk_layers(cfg.model.num_layers, stages, chunks,
                            cfg.pipeline.layers_per_stage)
    virtual = [per_rank[u % stages][u // stages] for u in range(stages * chunks)]
    models = []
    for u, (first, last) in enumerate(virtual):
        spec = StageSpec(first, last, u == 0, u == len(virtual) - 1)
        models.append(GPTModel(model_cfg, ref.vocab_size, stage=spec, seed=cfg.train.seed))
    tied = None
    if stages > 1 and model_cfg.tie_embeddings:
        tied = ("embedding.word_embeddings.weight", "output_layer.weight")
    mbs = cfg.train.micro_batch_size
    window = cfg.train.global_batch_size // (mbs * data_parallel)
    # The dp ranks' j-th micro-batches together are one block of the sampler.
    batches = iter(build_pretraining_data_loader(ref.train_ds, 0, mbs * data_parallel, 0, 1))
    return emulate(cfg.pipeline.schedule, models, batches, window, windows, cfg.optim,
                   cfg.train.iters, tied, segments, chunks)
