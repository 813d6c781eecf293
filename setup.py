# Metadata lives in pyproject.toml. This file exists for the optional CUDA extension in csrc/,
# which later issues add; FUSEDPEFT_SKIP_CUDA_BUILD=1 (or no nvcc) keeps the install pure Python.
from setuptools import setup

setup()
