"""Import of TF1 checkpoints written by the original `expert_utils.py`.

The original created one variable per gating kernel and per expert layer,
named after the MoE's `name`:

- `LocalMixtureOfExperts`: `{name}_gating_gate`, `{name}_gating_noise`,
  `{name}_{i}_layer_{l}`;
- flat `DistributedMixtureOfExperts`: `{name}_primary_gating_gate`,
  `{name}_primary_gating_noise`, `{name}_{i}_layer_{l}`;
- hierarchical `DistributedMixtureOfExperts`: `{name}_primary_gating_gate`,
  `{name}_primary_gating_noise`, `{name}_secondary_{i}_gating_gate`,
  `{name}_secondary_{i}_gating_noise`, `{name}_secondary_{i}_{j}_layer_{l}`.

`load_tf1_checkpoint` copies them into a built keras_moe layer so that a
model trained with the original keeps its weights.
"""

import re

import numpy as np
import tensorflow as tf

from keras_moe.gating import NoisyTopKGating
from keras_moe.hierarchical import HierarchicalMixtureOfExperts
from keras_moe.moe import MixtureOfExperts


def load_tf1_checkpoint(layer, checkpoint, name):
    """Loads the original's MoE variables from a TF1 checkpoint into `layer`.

    Every variable the layer needs must be in the checkpoint with the
    right shape, a floating-point dtype and finite values, and no variable
    of the original's naming scheme for `name` may be left over (a
    checkpoint with more experts, say); otherwise a `ValueError` lists the
    offending names (with shapes or dtypes) and no weight is changed. Variables of other names (other layers, `global_step`) are
    ignored.

    Args:
        layer: a built `MixtureOfExperts` or `HierarchicalMixtureOfExperts`
            whose configuration matches the original's (experts, hidden
            sizes, noisy gating).
        checkpoint: a TF1 checkpoint prefix (`.../model.ckpt-1000`) or a
            directory holding one.
        name: the original MoE's `name` argument, with any variable scope
            in front (`"moe"`, `"body/moe"`).

    Returns:
        The list of checkpoint variable names that were loaded.

    Example:

    ```python
    layer = keras_moe.MixtureOfExperts(16, k=2, hidden_sizes=(1024,))
    layer.build((None, 512))
    keras_moe.compat.load_tf1_checkpoint(layer, "train_dir/", name="moe")
    ```
    """
    if not isinstance(layer, (MixtureOfExperts, HierarchicalMixtureOfExperts)):
        raise TypeError(
            "`layer` must be a MixtureOfExperts or a "
            f"HierarchicalMixtureOfExperts. Received: layer={layer!r}"
        )
    if not layer.built:
        raise ValueError(
            f"`layer` must be built before loading weights into it: call it "
            f"on an input or call `layer.build(input_shape)`. Received: "
            f"layer={layer.name!r} (not built)"
        )
    if isinstance(layer, MixtureOfExperts):
        # What the original had: the noisy top-k gating, plain experts.
        extras = []
        if not isinstance(layer.gating, NoisyTopKGating):
            extras.append(f"router={type(layer.gating).__name__}")
        if layer.experts.glu:
            extras.append("glu=True")
        if layer.shared_expert is not None:
            extras.append("a shared expert")
        if extras:
            raise ValueError(
                "The original's checkpoints hold a noisy top-k gating and "
                "plain feed-forward experts; this layer has no counterpart "
                f"for its {', '.join(extras)}. Received: "
                f"layer={layer.name!r}"
            )
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"`name` must be the original MoE's name, a non-empty string. "
            f"Received: name={name!r}"
        )
    reader = tf.train.load_checkpoint(checkpoint)
    available = reader.get_variable_to_shape_map()
    if isinstance(layer, HierarchicalMixtureOfExperts):
        targets = _hierarchical_targets(layer, name)
        pattern = (
            r"(primary_gating_(gate|noise)|secondary_\d+_gating_(gate|noise)"
            r"|secondary_\d+_\d+_layer_\d+)"
        )
    else:
        gating_prefix = (
            f"{name}_primary_gating"
            if f"{name}_primary_gating_gate" in available
            and f"{name}_gating_gate" not in available
            else f"{name}_gating"
        )
        targets = _flat_targets(layer, name, gating_prefix)
        pattern = r"((primary_)?gating_(gate|noise)|\d+_layer_\d+)"

    expected = {source: shape for source, (_, _, shape) in targets.items()}
    missing = sorted(set(expected) - set(available))
    scheme = re.compile(re.escape(name) + "_" + pattern + "$")
    extra = sorted(
        v for v in available if scheme.match(v) and v not in expected
    )
    mismatched = sorted(
        v for v in expected
        if v in available and tuple(available[v]) != tuple(expected[v])
    )
    dtypes = reader.get_variable_to_dtype_map()
    not_float = sorted(
        v for v in expected
        if v in available and not tf.as_dtype(dtypes[v]).is_floating
    )
    # Read every value now: a checkpoint that holds NaN or infinity is
    # refused before anything is assigned, like any other bad variable.
    values = {
        v: reader.get_tensor(v) for v in expected
        if v in available and v not in mismatched and v not in not_float
    }
    not_finite = sorted(
        v for v, value in values.items() if not np.isfinite(value).all()
    )
    problems = []
    if missing:
        problems.append(
            "missing from the checkpoint: "
            + ", ".join(f"{v} {tuple(expected[v])}" for v in missing)
        )
    if extra:
        problems.append(
            "in the checkpoint but not in the layer: "
            + ", ".join(f"{v} {tuple(available[v])}" for v in extra)
        )
    if mismatched:
        problems.append(
            "shape mismatch (checkpoint vs layer): "
            + ", ".join(
                f"{v} {tuple(available[v])} vs {tuple(expected[v])}"
                for v in mismatched
            )
        )
    if not_float:
        problems.append(
            "not floating-point: "
            + ", ".join(f"{v} ({tf.as_dtype(dtypes[v]).name})"
                        for v in not_float)
        )
    if not_finite:
        problems.append(
            "NaN or infinite values: " + ", ".join(not_finite)
        )
    if problems:
        raise ValueError(
            f"Cannot load checkpoint {checkpoint!r} (name={name!r}) into "
            f"layer {layer.name!r}; nothing was loaded. "
            + "; ".join(problems)
        )

    # Every value converted to its variable's dtype first, then assigned:
    # all or nothing.
    updates = {}
    for source, (variable, index, _) in targets.items():
        value = values[source]
        if index is None:
            updates[id(variable)] = (
                variable, np.asarray(value, variable.dtype)
            )
        else:
            stacked = updates.setdefault(
                id(variable), (variable, np.array(variable.numpy()))
            )[1]
            stacked[index] = value
    for variable, value in updates.values():
        variable.assign(value)
    return sorted(targets)


def _gating_targets(gating, prefix):
    targets = {f"{prefix}_gate": (gating.gate_kernel, None,
                                  tuple(gating.gate_kernel.shape))}
    if gating.noisy_gating:
        targets[f"{prefix}_noise"] = (
            gating.noise_kernel, None, tuple(gating.noise_kernel.shape)
        )
    return targets


def _expert_targets(experts, prefix):
    """`{prefix}_{i}_layer_{l}` -> (stacked kernel l, i, one expert's shape)."""
    return {
        f"{prefix}_{i}_layer_{l}": (kernel, i, tuple(kernel.shape[1:]))
        for l, kernel in enumerate(experts.kernels)
        for i in range(experts.num_experts)
    }


def _flat_targets(layer, name, gating_prefix):
    return {
        **_gating_targets(layer.gating, gating_prefix),
        **_expert_targets(layer.experts, name),
    }


def _hierarchical_targets(layer, name):
    targets = _gating_targets(layer.primary_gating, f"{name}_primary_gating")
    gating, per_group = layer.secondary_gating, layer.experts_per_group
    # Group i's kernels are slice i of the stacked secondary kernels, its
    # expert j expert i * experts_per_group + j of the layer's experts.
    kernels = [("gate", gating.gate_kernel)]
    if gating.noisy_gating:
        kernels.append(("noise", gating.noise_kernel))
    for i in range(layer.num_groups):
        prefix = f"{name}_secondary_{i}"
        for kind, kernel in kernels:
            targets[f"{prefix}_gating_{kind}"] = (
                kernel, i, tuple(kernel.shape[1:]))
        for l, kernel in enumerate(layer.experts.kernels):
            for j in range(per_group):
                targets[f"{prefix}_{j}_layer_{l}"] = (
                    kernel, i * per_group + j, tuple(kernel.shape[1:]))
    return targets
