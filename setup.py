"""Packaging for deepseekv3: a DeepSeek-V3-style multimodal model for Hugging Face Transformers."""

from setuptools import find_packages, setup

setup(
    name="deepseekv3",
    version="0.1.0",
    description="A DeepSeek-V3-style multimodal (text, image, audio) model for Hugging Face Transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["deepseekv3", "deepseekv3.*"]),
    package_data={"deepseekv3.serving": ["static/*.html"]},  # the chat page `deepseekv3 serve` answers on GET /
    # transformers 5.24 (pinned below), numpy 2.4 and trl 1.16 (GRPO, DPO) need Python 3.11 or newer
    python_requires=">=3.11",
    install_requires=[
        "torch>=2.6",
        "transformers>=5.24,<5.25",
        "huggingface_hub>=2.0",
        "safetensors",
        "tokenizers",
        "numpy",
        "pillow",
    ],
    extras_require={
        "train": ["accelerate>=1.10", "peft>=0.17", "datasets>=5.2,<6", "matplotlib", "soundfile>=0.12"],
        "hub": ["olah"],
        "distributed": ["accelerate>=1.10", "deepspeed>=0.19"],
        "quantization": ["torchao>=0.18"],
        "ray": ["ray[serve]>=2.60", "httpx"],  # `deepseekv3 serve --ray-replicas N`: replicas on Ray Serve
        "dev": [
            "accelerate>=1.10",
            "peft>=0.17",
            "datasets>=5.2,<6",
            "matplotlib",
            "soundfile>=0.12",
            "deepspeed>=0.19",
            "torchao>=0.18",
            "trl>=1.16",
            "scikit-learn>=1.5",
            "pytest",
            "hypothesis",
            "ruff",
            "olah",
            "openai>=3.0",
            "playwright>=1.65",  # drives Debian's chromium (apt-get install chromium) in the chat page's tests
            "ray[serve]>=2.60",
            "httpx",
        ],
    },
    entry_points={"console_scripts": ["deepseekv3=deepseekv3.cli:main"]},
)
