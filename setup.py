"""megatron_paci: GPT pretraining with tensor, data and pipeline parallelism."""

from setuptools import find_packages, setup

setup(
    name="megatron_paci",
    version="0.1.0",
    description="GPT pretraining in the Megatron tradition with 1F1B-flush, PipeDream-2BW "
    "and PACI pipeline schedules",
    packages=find_packages(include=["megatron_paci", "megatron_paci.*", "data_prep"]),
    py_modules=["pretrain_gpt"],
    python_requires=">=3.10",
    # torch and triton are pinned exactly: a range lets pip pull a multi-GB CUDA
    # build of torch on a CPU machine. NVIDIA apex is optional and detected at run
    # time and never listed here (the PyPI package of that name is unrelated).
    install_requires=[
        "torch==2.13.0",
        "triton==3.7.1; platform_system == 'Linux'",
        "numpy",
        "matplotlib",
        "pyyaml",
        "sentencepiece",
        "tokenizers",
        "tqdm",
        "datasets",
        "wandb",
    ],
    extras_require={
        "dev": ["pytest", "pytest-timeout", "pytest-xdist", "hypothesis", "ruff", "transformers",
                "safetensors"],
        # For Hugging Face checkpoint import/export.
        "interop": ["transformers", "safetensors"],
        # logging.tensorboard=true writes through torch.utils.tensorboard.
        "tensorboard": ["tensorboard"],
    },
)
