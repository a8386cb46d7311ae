"""medst_fast packaging.

``kernels/`` (the Triton ops) is installed as ``medst_fast.kernels``. The optional C++/CUDA extension
``medst_fast._C`` in ``csrc/`` is built through CMakeLists.txt when possible and skipped otherwise; every op
in it has a PyTorch fallback.
"""
import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))


def read_version():
    ns = {}
    with open(os.path.join(here, "medst_fast", "version.py")) as f:
        exec(f.read(), ns)
    return ns["__version__"]


packages = find_packages(include=["medst_fast", "medst_fast.*"]) + ["medst_fast.kernels"]

setup(
    name="medst_fast",
    version=read_version(),
    description="Fast, faithful Med-ST (ICML 2024) chest X-ray vision-language pretraining",
    long_description=open(os.path.join(here, "README.md")).read() if os.path.exists(os.path.join(here, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=packages,
    package_dir={"medst_fast.kernels": "kernels"},
    package_data={"medst_fast": ["model_configs/*.json"]},
    install_requires=["torch>=2.3", "numpy"],
    extras_require={
        "train": ["tokenizers>=0.15", "safetensors>=0.4", "pillow>=9", "tqdm"],
        "eval": ["scikit-learn>=1.2", "pydicom>=2.4"],
        "dali": ["nvidia-dali-cuda130"],
        "dev": ["pytest>=7", "tokenizers>=0.15", "safetensors>=0.4", "pillow>=9", "tqdm",
                "scikit-learn>=1.2", "pydicom>=2.4"],
    },
    entry_points={"console_scripts": ["medst-pretrain=medst_fast.pretrain:main"]},
)
