"""Build and install orwcfm_fast.

Pure Python for now; the C++/CUDA extension ``orwcfm_fast._C`` is added with the
kernels (csrc/, kernels/).
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def _version() -> str:
    for line in (ROOT / "orwcfm_fast" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=")[1].strip().strip('"')
    raise RuntimeError("__version__ not found")


setup(
    name="orwcfm_fast",
    version=_version(),
    description="Fast, correct ORW-CFM-W2: online reward-weighted flow matching fine-tuning with W2 regularisation",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["orwcfm_fast", "orwcfm_fast.*"]),
    install_requires=[
        "torch>=2.6",
        "numpy",
        "scipy",
        "pot",
        "torchcfm",
        "open_clip_torch",
        "pillow",
        "tqdm",
        "matplotlib",
        "scikit-learn",
    ],
    extras_require={
        "wandb": ["wandb"],
        "test": ["pytest", "hypothesis", "torchdiffeq"],
    },
    entry_points={"console_scripts": ["orwcfm-fast=orwcfm_fast.cli:main"]},
)
