"""Packaging for keras_moe: the Sparsely-Gated Mixture-of-Experts layer for Keras 3."""

import pathlib

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent

setup(
    name="keras_moe",
    version="0.1.0.dev0",
    description=(
        "The Sparsely-Gated Mixture-of-Experts layer (Shazeer et al. 2017) "
        "as Keras 3 layers on TensorFlow 2."
    ),
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    # keras_moe only: not the reference harness (reference_harness/), the
    # tests, tools or benchmarks beside it.
    packages=find_packages(include=["keras_moe", "keras_moe.*"]),
    python_requires=">=3.9",
    install_requires=["tensorflow>=2.16", "keras>=3.0", "numpy"],
    extras_require={
        "test": ["pytest", "hypothesis", "pytest-xdist", "keras-hub>=0.32"],
        "examples": ["matplotlib"],
        # keras_moe.integrations.keras_hub.sparsify
        "keras_hub": ["keras-hub>=0.32"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "License :: OSI Approved :: Apache Software License",
    ],
)
