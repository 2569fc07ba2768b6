"""keras_moe: the Sparsely-Gated Mixture-of-Experts layer for Keras 3.

A port of the original TF1 `expert_utils.py` of Shazeer et al. (2017),
"Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts
Layer" (https://arxiv.org/abs/1701.06538), to Keras 3 layers on TensorFlow 2.
"""

import os as _os


def _require_tensorflow_backend(backend):
    if backend != "tensorflow":
        raise ImportError(
            "keras_moe requires the TensorFlow backend of Keras 3, but the "
            f"'{backend}' backend is selected. Set the environment variable "
            "KERAS_BACKEND=tensorflow before importing keras (or set "
            '"backend" in ~/.keras/keras.json).'
        )


# Checked before importing keras too: keras itself may fail to import
# with another backend's framework missing, hiding the reason.
if "KERAS_BACKEND" in _os.environ:
    _require_tensorflow_backend(_os.environ["KERAS_BACKEND"])

import keras as _keras  # noqa: E402

_require_tensorflow_backend(_keras.backend.backend())

from keras_moe.balance import (
    cv_squared, gates_to_load, max_overload, router_z_loss, switch_loss,
)
from keras_moe.dispatch import CapacityDispatcher, SparseDispatcher
from keras_moe.embedding import ShardedEmbedding
from keras_moe.expert_parallel_optimizer import ExpertParallelOptimizer
from keras_moe.experts import FeedForwardExperts
from keras_moe.gating import NoisyTopKGating
from keras_moe.introspection import expert_to_gates, expert_to_tokens
from keras_moe.hierarchical import HierarchicalMixtureOfExperts
from keras_moe.moe import MixtureOfExperts
from keras_moe.sampled_softmax import SampledSoftmaxLoss

from keras_moe import routers  # noqa: E402
from keras_moe import compat  # noqa: E402  (after the layers it loads into)
from keras_moe import callbacks  # noqa: E402

__version__ = "0.1.0.dev0"

__all__ = [
    "MixtureOfExperts",
    "HierarchicalMixtureOfExperts",
    "NoisyTopKGating",
    "FeedForwardExperts",
    "ExpertParallelOptimizer",
    "SparseDispatcher",
    "CapacityDispatcher",
    "ShardedEmbedding",
    "SampledSoftmaxLoss",
    "cv_squared",
    "max_overload",
    "gates_to_load",
    "switch_loss",
    "router_z_loss",
    "expert_to_tokens",
    "expert_to_gates",
    "routers",
    "compat",
    "callbacks",
]
