"""keras-hub's MoE models, run sparsely by keras_moe: `sparsify(model)`.

keras-hub's Mixtral, Qwen-MoE and Qwen3-MoE blocks run every expert on
every token and weight the results by the router's top-k gates (their
docstrings say so). `sparsify` swaps each decoder layer's MoE block for a
keras-hub-compatible block that holds a `keras_moe.MixtureOfExperts` with the
same weights: the same router (softmax over the experts, top k, renormalized
as the model says), the same SwiGLU experts and, for Qwen-MoE, the same
gated shared expert; but each token reaches only its k experts (the sparse
dispatch). The model is converted in place, and everything keras-hub does
with it afterwards keeps working: `fit` (with the same auxiliary loss),
`generate`, `.keras` and preset saving, `load_weights` of keras-hub files,
parameter counts. docs/keras_hub.md says what it costs and its limits.

Needs keras-hub (`pip install "keras_moe[keras_hub]"`); the sparse blocks
are keras-hub's block classes underneath, from keras-hub's own modules
(`keras_hub.src.models...`), tested with keras-hub 0.32.
"""

import keras
import numpy as np

from keras_moe import private_hooks
from keras_moe.moe import MixtureOfExperts

try:
    import keras_hub
    from keras_hub.src.models.mixtral import mixtral_backbone
    from keras_hub.src.models.mixtral import mixtral_decoder
    from keras_hub.src.models.qwen3_moe import qwen3_moe_backbone
    from keras_hub.src.models.qwen3_moe import qwen3_moe_decoder
    from keras_hub.src.models.qwen_moe import qwen_moe_backbone
    from keras_hub.src.models.qwen_moe import qwen_moe_decoder
except ImportError as error:  # keras-hub missing, or one that moved them
    keras_hub = None
    _IMPORT_ERROR = error
    # Stand-ins, so that the classes below exist (and this module imports)
    # without keras-hub; `sparsify` says what is missing.
    _MixtralBlock = _QwenBlock = _Qwen3Block = keras.layers.Layer
    _MixtralBackbone = _QwenBackbone = _Qwen3Backbone = keras.Model
else:
    _IMPORT_ERROR = None
    _MixtralBlock = mixtral_decoder.MixtralSparseMoeBlock
    _QwenBlock = qwen_moe_decoder.QwenSparseMoeBlock
    _Qwen3Block = qwen3_moe_decoder.Qwen3SparseMoeBlock
    _MixtralBackbone = mixtral_backbone.MixtralBackbone
    _QwenBackbone = qwen_moe_backbone.QwenMoeBackbone
    _Qwen3Backbone = qwen3_moe_backbone.Qwen3MoeBackbone


def _require_keras_hub():
    if keras_hub is None:
        raise ImportError(
            "keras_moe.integrations.keras_hub needs keras-hub (>= 0.32): "
            "`pip install \"keras_moe[keras_hub]\"`. Importing it failed "
            f"with: {_IMPORT_ERROR}"
        )


class _Part:
    """A keras-hub weight kept in a keras_moe variable: `variable[index]`
    (`index` a NumPy index, `...` for the whole variable)."""

    def __init__(self, variable, index=Ellipsis):
        self.variable = variable
        self.index = index

    @property
    def shape(self):
        # A zero-stride view: indexed without allocating the variable's size.
        whole = np.broadcast_to(np.empty((), dtype=bool), self.variable.shape)
        return whole[self.index].shape


class _KerasHubWeights(keras.layers.Layer):
    """A keras-hub sublayer's weights, held in keras_moe's variables.

    It has no variables of its own. Put where the keras-hub block has the
    sublayer (the same attribute name), it saves the sublayer's weights in
    keras-hub's layout, `vars/0`, `vars/1`, ... at the sublayer's path, and
    loads them from there, so weight files move both ways between the
    keras-hub block and the sparse one. `parts()` gives the weights in
    keras-hub's order as `_Part`s; `children` are the keras-hub sublayer's
    own sublayers, by attribute name.
    """

    def __init__(self, parts, children=None, **kwargs):
        super().__init__(**kwargs)
        self.built = True  # nothing to build: the variables are `moe`'s
        self._parts = parts
        self._child_names = tuple(children or ())
        for attribute, child in (children or {}).items():
            setattr(self, attribute, child)

    def parts(self):
        return self._parts()

    def children(self):
        """`(attribute, view)` of the keras-hub sublayer's sublayers."""
        return [(name, getattr(self, name)) for name in self._child_names]

    def keras_hub_variables(self):
        """The variables this view and its children save, in order."""
        found = [part.variable for part in self.parts()]
        for _, child in self.children():
            found.extend(child.keras_hub_variables())
        return found

    def save_own_variables(self, store):
        for i, part in enumerate(self.parts()):
            store[str(i)] = keras.ops.convert_to_numpy(part.variable)[
                part.index]

    def load_own_variables(self, store):
        parts = self.parts()
        if len(store.keys()) != len(parts):
            raise ValueError(
                f"Layer '{self.name}' expected {len(parts)} variables (the "
                f"keras-hub layout of shapes "
                f"{[part.shape for part in parts]}), but received "
                f"{len(store.keys())} variables during loading."
            )
        values = {}  # id(variable): (variable, [(index, value)])
        for i, part in enumerate(parts):
            value = np.asarray(store[str(i)])
            if value.shape != part.shape:
                raise ValueError(
                    f"Layer '{self.name}': variable {i} has shape "
                    f"{part.shape} in the keras-hub layout, but the value "
                    f"loaded has shape {value.shape}."
                )
            pieces = values.setdefault(id(part.variable),
                                       (part.variable, []))[1]
            pieces.append((part.index, value))
        for variable, pieces in values.values():
            if len(pieces) == 1 and pieces[0][0] is Ellipsis:
                variable.assign(pieces[0][1])
                continue
            # Parts of one variable (W_gate and W_up): written into a copy.
            whole = keras.ops.convert_to_numpy(variable).copy()
            for index, value in pieces:
                whole[index] = value
            variable.assign(whole)

    def load_from_keras_hub_layer(self, layer):
        """Takes the weights of the keras-hub sublayer `layer` (what
        `load_own_variables` would read from its saved file: its own
        variables, then its sublayers')."""
        children = [getattr(layer, name) for name in self._child_names]
        in_children = {id(w) for child in children for w in child.weights}
        self.load_own_variables({
            str(i): keras.ops.convert_to_numpy(weight)
            for i, weight in enumerate(
                w for w in layer.weights if id(w) not in in_children)
        })
        for (_, view), child in zip(self.children(), children):
            view.load_from_keras_hub_layer(child)


def _view(parts, name, children=None):
    return _KerasHubWeights(parts, children=children, name=name)


class _SparseMoeBlock:
    """What the sparse keras-hub blocks share (a mixin put before the
    keras-hub block class): the `MixtureOfExperts` in `moe`, the views that
    keep keras-hub's weight layout, the conversion from a keras-hub block.

    Subclasses set `_HUB_BLOCK` and define `_moe_arguments` (the
    `MixtureOfExperts` arguments of the keras-hub block's), `_views` (the
    keras-hub sublayers' attribute names and views), `call`, `get_config`
    and `_arguments_of` (a keras-hub block's constructor arguments).
    """

    # The keras-hub block class this one replaces.
    _HUB_BLOCK = None

    def _init_sparse(self, return_router_logits):
        self.return_router_logits = bool(return_router_logits)
        # All the block's variables are this layer's (made in `build`).
        self.moe = MixtureOfExperts(
            routing_metrics=False,
            dtype=self.dtype_policy,
            name="moe",
            **self._moe_arguments(),
        )
        self._view_names = []
        for attribute, view in self._views():
            setattr(self, attribute, view)
            self._view_names.append(attribute)

    def __dir__(self):
        # Keras saves a layer by walking its attributes (`dir`): the views,
        # named as keras-hub's sublayers, save `moe`'s weights in
        # keras-hub's layout; `moe` itself must not be saved again.
        return [name for name in super().__dir__() if name != "moe"]

    def _expert_kernels(self):
        h = self.moe.experts.hidden_sizes[0]
        gate_and_up, down = self.moe.experts.kernels
        return h, gate_and_up, down

    def build(self, input_shape):
        self.moe.build((None, input_shape[-1]))
        covered = {id(v) for v in self.weights}
        statistics = {id(self.moe.last_importance), id(self.moe.last_load)}
        left_out = [v.path for v in self.moe.weights
                    if id(v) not in covered and id(v) not in statistics]
        if left_out:  # A keras_moe change the views do not know.
            raise RuntimeError(
                f"{type(self).__name__} does not save the weights "
                f"{left_out} of its MixtureOfExperts in keras-hub's layout."
            )

    @property
    def weights(self):
        # keras-hub's weights, in keras-hub's order (what the views save):
        # keras_moe's routing statistics `last_importance` and `last_load`
        # (not updated: `routing_metrics=False`) are no weights of the
        # keras-hub block, nor counted in its parameters.
        found, seen = [], set()
        for name in self._view_names:
            for variable in getattr(self, name).keras_hub_variables():
                if id(variable) not in seen:
                    seen.add(id(variable))
                    found.append(variable)
        return found

    def _sparse_call(self, hidden_states, token_mask, training):
        """`(outputs, router_logits)`, as keras-hub's block returns them;
        the logits only with `return_router_logits` (else None)."""
        # keras-hub adds the balancing loss while training only; keras_moe
        # in inference too (it shows in `evaluate`): weighted 0 there.
        # (`loss_coef` is read when `call` runs or is traced, and each
        # `training` value has its own trace.)
        loss_coef = self.moe.loss_coef
        if not training:
            self.moe.loss_coef = 0.0
        try:
            outputs = self.moe(
                hidden_states, mask=token_mask, training=training)
        finally:
            self.moe.loss_coef = loss_coef
        router_logits = None
        if self.return_router_logits:
            flat = keras.ops.reshape(hidden_states, (-1, self.hidden_dim))
            router_logits, _ = self.moe.gating.logits(flat)
        return outputs, router_logits

    def compute_output_spec(self, hidden_states, attention_mask=None,
                            training=None):
        outputs = keras.KerasTensor(hidden_states.shape,
                                    dtype=self.compute_dtype)
        if not self.return_router_logits:
            return outputs, None
        return outputs, keras.KerasTensor((None, self.num_experts),
                                          dtype="float32")

    def load_from_keras_hub_block(self, block):
        """Copies the weights of the keras-hub block `block` (built, the
        same sizes) into `moe`."""
        for name in self._view_names:
            getattr(self, name).load_from_keras_hub_layer(
                getattr(block, name))


@keras.saving.register_keras_serializable(package="keras_moe")
class SparseMixtralMoeBlock(_SparseMoeBlock, _MixtralBlock):
    """keras-hub's Mixtral MoE block, each token run by its top-k experts
    only.

    The `MixtralSparseMoeBlock` of keras-hub (Jiang et al. 2024, "Mixtral of
    Experts", https://arxiv.org/abs/2401.04088) as a
    `keras_moe.MixtureOfExperts` (`moe`): softmax router, top `top_k`
    renormalized, SwiGLU experts, the switch balancing loss
    (`router_aux_loss_coef * E * sum_i f_i * P_i`, while training, over the
    unpadded tokens) and multiplicative jitter of the block's input while
    training. Padded tokens (`attention_mask` 0) reach no expert: their
    outputs are zero, where keras-hub's are unused values. Its weights are
    saved and loaded in keras-hub's layout; `sparsify` makes these from
    keras-hub's blocks.

    Args:
        hidden_dim: int, the model's width `d`.
        intermediate_dim: int, each expert's hidden size.
        num_experts: int.
        top_k: int, experts per token.
        router_jitter_noise: float in `[0, 1)`; while training the block's
            input is multiplied by uniform(1 - noise, 1 + noise).
        layer_norm_epsilon: float, kept for keras-hub's signature.
        router_aux_loss_coef: float, the weight of the balancing loss.
        kernel_initializer: initializer of the router and experts.
        return_router_logits: bool; also return the router logits
            `[tokens, num_experts]` (else None), as keras-hub's decoder with
            `output_router_logits=True` reads them.
        **kwargs: base layer keyword arguments.

    Call arguments:
        hidden_states: float tensor `[batch, length, hidden_dim]`.
        attention_mask: optional padding mask `[batch, length]`.
        training: Python bool.

    Returns:
        `(outputs, router_logits)`: outputs `[batch, length, hidden_dim]`
        and the logits or None.

    Example:

    >>> block = SparseMixtralMoeBlock(hidden_dim=8, intermediate_dim=16,
    ...                               num_experts=4, top_k=2)
    >>> outputs, _ = block(np.ones((2, 3, 8), "float32"))
    >>> outputs.shape
    TensorShape([2, 3, 8])
    >>> [tuple(w.shape) for w in block.weights]
    [(8, 4), (4, 8, 32), (4, 16, 8)]
    """

    _HUB_BLOCK = _MixtralBlock

    def __init__(self, hidden_dim, intermediate_dim, num_experts, top_k=2,
                 router_jitter_noise=0.0, layer_norm_epsilon=1e-5,
                 router_aux_loss_coef=0.02,
                 kernel_initializer="glorot_uniform",
                 return_router_logits=False, **kwargs):
        super().__init__(
            hidden_dim=hidden_dim,
            intermediate_dim=intermediate_dim,
            num_experts=num_experts,
            top_k=top_k,
            router_jitter_noise=router_jitter_noise,
            layer_norm_epsilon=layer_norm_epsilon,
            router_aux_loss_coef=router_aux_loss_coef,
            kernel_initializer=kernel_initializer,
            **kwargs,
        )
        if not 0 <= router_jitter_noise < 1:
            raise ValueError(
                "`router_jitter_noise` must be in [0, 1). Received: "
                f"router_jitter_noise={router_jitter_noise!r}"
            )
        # keras-hub jitters the block's input, which the experts read too
        # (the router's own jitter would reach the router only).
        self._jitter_seed_generator = (
            keras.random.SeedGenerator() if router_jitter_noise > 0
            else None)
        self._init_sparse(return_router_logits)

    def _moe_arguments(self):
        return dict(
            num_experts=self.num_experts,
            k=self.top_k,
            hidden_sizes=(self.intermediate_dim,),
            hidden_activation="silu",
            glu=True,
            autoscale=False,
            router="softmax_top_k",
            normalize_top_k=True,
            balance_loss="switch",
            loss_coef=self.router_aux_loss_coef,
            gate_initializer=self.kernel_initializer,
            expert_initializer=self.kernel_initializer,
        )

    def _views(self):
        def router():
            return [_Part(self.moe.gating.gate_kernel)]

        def experts():
            h, gate_and_up, down = self._expert_kernels()
            return [_Part(gate_and_up, np.s_[..., :h]),
                    _Part(gate_and_up, np.s_[..., h:]), _Part(down)]

        return [
            ("_sparse_feedforward_gate_dense",
             _view(router, "sparse_feedforward_gate_dense")),
            ("expert_bank", _view(experts, "experts")),
        ]

    def call(self, hidden_states, attention_mask=None, training=False):
        token_mask = None
        if attention_mask is not None:
            token_mask = keras.ops.cast(attention_mask, "bool")
        if training and self.router_jitter_noise > 0:
            hidden_states = hidden_states * keras.random.uniform(
                keras.ops.shape(hidden_states),
                minval=1.0 - self.router_jitter_noise,
                maxval=1.0 + self.router_jitter_noise,
                dtype=hidden_states.dtype,
                seed=self._jitter_seed_generator,
            )
        return self._sparse_call(hidden_states, token_mask, training)

    def get_config(self):
        base_config = super().get_config()
        config = {
            "hidden_dim": self.hidden_dim,
            "intermediate_dim": self.intermediate_dim,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "router_jitter_noise": self.router_jitter_noise,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "kernel_initializer": keras.initializers.serialize(
                self.kernel_initializer),
            "return_router_logits": self.return_router_logits,
        }
        return {**base_config, **config}

    @classmethod
    def _arguments_of(cls, block):
        return dict(
            hidden_dim=block.hidden_dim,
            intermediate_dim=block.intermediate_dim,
            num_experts=block.num_experts,
            top_k=block.top_k,
            router_jitter_noise=block.router_jitter_noise,
            layer_norm_epsilon=block.layer_norm_epsilon,
            router_aux_loss_coef=block.router_aux_loss_coef,
            kernel_initializer=block.kernel_initializer,
        )


def _any_query_key(attention_mask):
    """keras-hub's Qwen blocks count a token in the balancing loss when it
    attends to any key: `any(attention_mask, -1)`."""
    if attention_mask is None:
        return None
    return keras.ops.any(keras.ops.cast(attention_mask, "bool"), axis=-1)


class _SparseQwenFamilyBlock(_SparseMoeBlock):
    """The Qwen-MoE and Qwen3-MoE blocks: the same router and experts."""

    def _routed_arguments(self):
        return dict(
            num_experts=self.num_experts,
            k=self.top_k,
            hidden_sizes=(self.intermediate_dim,),
            hidden_activation="silu",
            glu=True,
            autoscale=False,
            router="softmax_top_k",
            normalize_top_k=bool(self.norm_top_k_prob),
            balance_loss="switch",
            loss_coef=self.router_aux_loss_coefficient,
            gate_initializer=self.kernel_initializer,
            expert_initializer=self.kernel_initializer,
        )

    def _routed_views(self):
        def router():
            return [_Part(self.moe.gating.gate_kernel)]

        def experts():
            _, gate_and_up, down = self._expert_kernels()
            # keras-hub's Qwen experts fuse W_gate and W_up as keras_moe does.
            return [_Part(gate_and_up), _Part(down)]

        return [
            ("_sparse_feedforward_gate_dense",
             _view(router, "sparse_feedforward_gate_dense")),
            ("expert_bank", _view(experts, "experts")),
        ]

    def call(self, hidden_states, attention_mask=None, training=None):
        return self._sparse_call(
            hidden_states, _any_query_key(attention_mask), training)

    def _qwen_config(self):
        return {
            "hidden_dim": self.hidden_dim,
            "moe_intermediate_dim": self.intermediate_dim,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "norm_top_k_prob": self.norm_top_k_prob,
            "kernel_initializer": keras.initializers.serialize(
                keras.initializers.get(self.kernel_initializer)),
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "router_aux_loss_coefficient": self.router_aux_loss_coefficient,
            "return_router_logits": self.return_router_logits,
        }

    @classmethod
    def _arguments_of(cls, block):
        return dict(
            hidden_dim=block.hidden_dim,
            moe_intermediate_dim=block.intermediate_dim,
            num_experts=block.num_experts,
            top_k=block.top_k,
            norm_top_k_prob=block.norm_top_k_prob,
            kernel_initializer=block.kernel_initializer,
            layer_norm_epsilon=block.layer_norm_epsilon,
            router_aux_loss_coefficient=block.router_aux_loss_coefficient,
        )


@keras.saving.register_keras_serializable(package="keras_moe")
class SparseQwenMoeBlock(_SparseQwenFamilyBlock, _QwenBlock):
    """keras-hub's Qwen-MoE block, each token run by its top-k experts only.

    The `QwenSparseMoeBlock` of keras-hub (Qwen1.5-MoE, Qwen Team 2024,
    https://qwenlm.github.io/blog/qwen-moe/) as a `keras_moe.MixtureOfExperts`
    (`moe`): softmax router, top `top_k` (renormalized if
    `norm_top_k_prob`), SwiGLU experts, an always-on SwiGLU shared expert
    scaled by `sigmoid(x @ w)`, and the switch balancing loss
    (`router_aux_loss_coefficient * E * sum_i f_i * P_i`, while training).
    As keras-hub's, it counts a token in the loss when it attends to any key
    (`any(attention_mask, -1)`); tokens that attend to none reach no expert
    and output zeros. Its weights are saved and loaded in keras-hub's
    layout; `sparsify` makes these from keras-hub's blocks.

    Args:
        hidden_dim: int, the model's width `d`.
        moe_intermediate_dim: int, each routed expert's hidden size.
        shared_expert_intermediate_dim: int, the shared expert's hidden size.
        num_experts: int.
        top_k: int, experts per token.
        norm_top_k_prob: bool, renormalize the top-k probabilities.
        kernel_initializer: initializer of the router and experts.
        layer_norm_epsilon: float, kept for keras-hub's signature.
        router_aux_loss_coefficient: float, the weight of the balancing
            loss.
        return_router_logits: bool; also return the router logits
            `[tokens, num_experts]` (else None).
        **kwargs: base layer keyword arguments.

    Call arguments:
        hidden_states: float tensor `[batch, length, hidden_dim]`.
        attention_mask: optional attention mask `[batch, length, keys]`.
        training: Python bool.

    Returns:
        `(outputs, router_logits)`: outputs `[batch, length, hidden_dim]`
        and the logits or None.

    Example:

    >>> block = SparseQwenMoeBlock(
    ...     hidden_dim=8, moe_intermediate_dim=4,
    ...     shared_expert_intermediate_dim=16, num_experts=4, top_k=2,
    ...     norm_top_k_prob=False)
    >>> outputs, _ = block(np.ones((2, 3, 8), "float32"))
    >>> outputs.shape
    TensorShape([2, 3, 8])
    >>> [tuple(w.shape) for w in block.weights]  # W_gate, W_up side by side
    [(8, 4), (4, 8, 8), (4, 4, 8), (1, 8, 32), (1, 16, 8), (8, 1)]
    """

    _HUB_BLOCK = _QwenBlock

    def __init__(self, hidden_dim, moe_intermediate_dim,
                 shared_expert_intermediate_dim, num_experts, top_k,
                 norm_top_k_prob, kernel_initializer="glorot_uniform",
                 layer_norm_epsilon=1e-5, router_aux_loss_coefficient=0.01,
                 return_router_logits=False, **kwargs):
        super().__init__(
            hidden_dim=hidden_dim,
            moe_intermediate_dim=moe_intermediate_dim,
            shared_expert_intermediate_dim=shared_expert_intermediate_dim,
            num_experts=num_experts,
            top_k=top_k,
            norm_top_k_prob=norm_top_k_prob,
            kernel_initializer=kernel_initializer,
            layer_norm_epsilon=layer_norm_epsilon,
            router_aux_loss_coefficient=router_aux_loss_coefficient,
            **kwargs,
        )
        self._init_sparse(return_router_logits)

    def _moe_arguments(self):
        return dict(
            self._routed_arguments(),
            shared_expert_hidden_sizes=(self.intermediate_dim_shared,),
            shared_expert_gate=True,
        )

    def _views(self):
        h = self.intermediate_dim_shared

        def shared_kernels():
            gate_and_up, down = self.moe.shared_expert.kernels
            return gate_and_up, down

        def shared_up():
            return [_Part(shared_kernels()[0], np.s_[0, :, h:])]

        def shared_gate():
            return [_Part(shared_kernels()[0], np.s_[0, :, :h])]

        def shared_down():
            return [_Part(shared_kernels()[1], np.s_[0])]

        def shared_expert_gate():
            return [_Part(self.moe.shared_expert_gate_kernel)]

        shared_expert = _view(
            lambda: [], "shared_expert_dense",
            children={
                # In keras-hub's order: W_up, W_gate, W_down.
                "_feedforward_intermediate_dense": _view(
                    shared_up, "feedforward_intermediate_dense"),
                "_feedforward_gate_dense": _view(
                    shared_gate, "feedforward_gate_dense"),
                "_feedforward_output_dense": _view(
                    shared_down, "feedforward_output_dense"),
            },
        )
        return self._routed_views() + [
            ("shared_expert_dense", shared_expert),
            ("shared_expert_gate_dense",
             _view(shared_expert_gate, "shared_expert_gate_dense")),
        ]

    def get_config(self):
        base_config = super().get_config()
        config = dict(
            self._qwen_config(),
            shared_expert_intermediate_dim=self.intermediate_dim_shared,
        )
        return {**base_config, **config}

    @classmethod
    def _arguments_of(cls, block):
        return dict(
            super()._arguments_of(block),
            shared_expert_intermediate_dim=block.intermediate_dim_shared,
        )


@keras.saving.register_keras_serializable(package="keras_moe")
class SparseQwen3MoeBlock(_SparseQwenFamilyBlock, _Qwen3Block):
    """keras-hub's Qwen3-MoE block, each token run by its top-k experts
    only.

    The `Qwen3SparseMoeBlock` of keras-hub (Qwen Team 2025, "Qwen3 Technical
    Report", https://arxiv.org/abs/2505.09388) as a
    `keras_moe.MixtureOfExperts` (`moe`): softmax router, top `top_k`
    (renormalized if `norm_top_k_prob`), SwiGLU experts and the switch
    balancing loss (`router_aux_loss_coefficient * E * sum_i f_i * P_i`,
    while training). As keras-hub's, it counts a token in the loss when it
    attends to any key (`any(attention_mask, -1)`); tokens that attend to
    none reach no expert and output zeros. Its weights are saved and loaded
    in keras-hub's layout; `sparsify` makes these from keras-hub's blocks.

    Args:
        hidden_dim: int, the model's width `d`.
        moe_intermediate_dim: int, each expert's hidden size.
        num_experts: int.
        top_k: int, experts per token.
        norm_top_k_prob: bool, renormalize the top-k probabilities.
        kernel_initializer: initializer of the router and experts.
        layer_norm_epsilon: float, kept for keras-hub's signature.
        router_aux_loss_coefficient: float, the weight of the balancing
            loss.
        return_router_logits: bool; also return the router logits
            `[tokens, num_experts]` (else None).
        **kwargs: base layer keyword arguments.

    Call arguments:
        hidden_states: float tensor `[batch, length, hidden_dim]`.
        attention_mask: optional attention mask `[batch, length, keys]`.
        training: Python bool.

    Returns:
        `(outputs, router_logits)`: outputs `[batch, length, hidden_dim]`
        and the logits or None.

    Example:

    >>> block = SparseQwen3MoeBlock(hidden_dim=8, moe_intermediate_dim=4,
    ...                             num_experts=4, top_k=2,
    ...                             norm_top_k_prob=True)
    >>> outputs, _ = block(np.ones((2, 3, 8), "float32"))
    >>> [tuple(w.shape) for w in block.weights]
    [(8, 4), (4, 8, 8), (4, 4, 8)]
    """

    _HUB_BLOCK = _Qwen3Block

    def __init__(self, hidden_dim, moe_intermediate_dim, num_experts, top_k,
                 norm_top_k_prob, kernel_initializer="glorot_uniform",
                 layer_norm_epsilon=1e-6, router_aux_loss_coefficient=0.01,
                 return_router_logits=False, **kwargs):
        super().__init__(
            hidden_dim=hidden_dim,
            moe_intermediate_dim=moe_intermediate_dim,
            num_experts=num_experts,
            top_k=top_k,
            norm_top_k_prob=norm_top_k_prob,
            kernel_initializer=kernel_initializer,
            layer_norm_epsilon=layer_norm_epsilon,
            router_aux_loss_coefficient=router_aux_loss_coefficient,
            **kwargs,
        )
        self._init_sparse(return_router_logits)

    def _moe_arguments(self):
        return self._routed_arguments()

    def _views(self):
        return self._routed_views()

    def get_config(self):
        base_config = super().get_config()
        return {**base_config, **self._qwen_config()}


def _sparse_backbone_init(backbone):
    """What a sparse backbone's constructor adds to keras-hub's: its MoE
    blocks become sparse."""
    _convert_blocks(backbone, _family(backbone))


@keras.saving.register_keras_serializable(package="keras_moe")
class SparseMixtralBackbone(_MixtralBackbone):
    """keras-hub's `MixtralBackbone`, its MoE blocks sparse
    (`SparseMixtralMoeBlock`): what `sparsify` makes of one. The same
    arguments; built from a config (`.keras` files, presets) it is sparse
    again."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _sparse_backbone_init(self)


@keras.saving.register_keras_serializable(package="keras_moe")
class SparseQwenMoeBackbone(_QwenBackbone):
    """keras-hub's `QwenMoeBackbone`, its MoE blocks sparse
    (`SparseQwenMoeBlock`): what `sparsify` makes of one. The same
    arguments; built from a config (`.keras` files, presets) it is sparse
    again."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _sparse_backbone_init(self)


@keras.saving.register_keras_serializable(package="keras_moe")
class SparseQwen3MoeBackbone(_Qwen3Backbone):
    """keras-hub's `Qwen3MoeBackbone`, its MoE blocks sparse
    (`SparseQwen3MoeBlock`): what `sparsify` makes of one. The same
    arguments; built from a config (`.keras` files, presets) it is sparse
    again."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _sparse_backbone_init(self)


class _Family:
    """One keras-hub model family: its backbone, the attribute of its
    decoder layers that holds the MoE block, and the sparse classes."""

    def __init__(self, backbone, sparse_backbone, block_attribute,
                 sparse_block):
        self.backbone = backbone
        self.sparse_backbone = sparse_backbone
        self.block_attribute = block_attribute
        self.sparse_block = sparse_block


def _families():
    return [
        _Family(_MixtralBackbone, SparseMixtralBackbone, "_sparse_moe_block",
                SparseMixtralMoeBlock),
        _Family(_QwenBackbone, SparseQwenMoeBackbone, "mlp",
                SparseQwenMoeBlock),
        _Family(_Qwen3Backbone, SparseQwen3MoeBackbone, "mlp",
                SparseQwen3MoeBlock),
    ]


def _family(backbone):
    for family in _families():
        if isinstance(backbone, family.backbone):
            return family
    return None


def _convert_blocks(backbone, family):
    """Swaps each decoder layer's keras-hub MoE block for a sparse one with
    its weights; sparse blocks and dense feed-forward layers (Qwen's
    `mlp_only_layers`) stay."""
    block_class = family.sparse_block._HUB_BLOCK
    for decoder in backbone.transformer_layers:
        block = getattr(decoder, family.block_attribute, None)
        if isinstance(block, _SparseMoeBlock) or not isinstance(
                block, block_class):
            continue
        sparse = family.sparse_block(
            **family.sparse_block._arguments_of(block),
            return_router_logits=bool(
                getattr(decoder, "output_router_logits", False)),
            dtype=block.dtype_policy,
            name=block.name,
        )
        # Variables named under the decoder's scope, as keras-hub's were.
        with keras.name_scope(decoder.name):
            sparse.build((None, None, block.hidden_dim))
        sparse.load_from_keras_hub_block(block)
        private_hooks.replace_sublayer(
            decoder, family.block_attribute, sparse)


def _forget_compiled_functions(model):
    """Drops the training, evaluation, prediction and generation functions
    traced with the keras-hub blocks, and XLA, which the sparse dispatch
    does not compile with."""
    for attribute in ("train_function", "test_function", "predict_function",
                      "generate_function"):
        if getattr(model, attribute, None) is not None:
            setattr(model, attribute, None)
    if getattr(model, "compiled", False) and model.jit_compile:
        model.jit_compile = False


def sparsify(model):
    """Runs the MoE blocks of a keras-hub model through keras_moe, in place.

    keras-hub's Mixtral, Qwen-MoE and Qwen3-MoE blocks run every expert on
    every token. `sparsify` swaps each of them for a keras-hub-compatible
    block holding a `keras_moe.MixtureOfExperts` with the same weights
    (`SparseMixtralMoeBlock`, `SparseQwenMoeBlock`,
    `SparseQwen3MoeBlock`), which runs each token through its top-k experts
    only (Shazeer et al. 2017, https://arxiv.org/abs/1701.06538, the sparse
    dispatch). The outputs are the keras-hub model's (up to float rounding;
    at padded positions, which nothing reads, they may differ), and so is
    the balancing loss while training. The backbone becomes a
    `SparseMixtralBackbone`, `SparseQwenMoeBackbone` or
    `SparseQwen3MoeBackbone` (a subclass of keras-hub's), so that a saved
    model (`.keras`, `save_to_preset`) loads sparse; its weight files keep
    keras-hub's layout and load into either. A compiled model's traced
    functions are dropped, and XLA is turned off (the sparse dispatch has
    data-dependent shapes). See docs/keras_hub.md.

    Args:
        model: a keras-hub `MixtralBackbone`, `QwenMoeBackbone` or
            `Qwen3MoeBackbone`, or a task built on one (e.g. a
            `MixtralCausalLM`). A model already sparse is returned as it is.

    Returns:
        `model`, converted.

    Example:

    >>> import keras_hub
    >>> backbone = keras_hub.models.Qwen3MoeBackbone(
    ...     vocabulary_size=50, num_layers=1, num_query_heads=2,
    ...     num_key_value_heads=1, hidden_dim=8, intermediate_dim=16,
    ...     moe_intermediate_dim=4, num_experts=4, top_k=2)
    >>> inputs = {"token_ids": np.array([[5, 7, 9]]),
    ...           "padding_mask": np.ones((1, 3), "int32")}
    >>> dense_outputs = backbone(inputs)
    >>> backbone = sparsify(backbone)
    >>> type(backbone.transformer_layers[0].mlp).__name__
    'SparseQwen3MoeBlock'
    >>> np.allclose(backbone(inputs), dense_outputs, atol=1e-6)
    True
    """
    _require_keras_hub()
    backbone = model
    if isinstance(model, keras_hub.models.Task):
        backbone = model.backbone
    family = _family(backbone)
    if family is None:
        raise ValueError(
            "`model` must be a keras-hub MixtralBackbone, QwenMoeBackbone "
            "or Qwen3MoeBackbone, or a task (such as a CausalLM) built on "
            f"one. Received: model={model!r} (of type "
            f"{type(model).__name__})"
        )
    # The new variables where the model's are: mirrored if it was built in
    # a strategy's scope (the default strategy's scope changes nothing).
    with backbone.distribute_strategy.scope():
        _convert_blocks(backbone, family)
    # Exactly keras-hub's class only: a subclass of the user's keeps its
    # class (and then saves as that class, which builds keras-hub blocks).
    if type(backbone) is family.backbone:
        backbone.__class__ = family.sparse_backbone
    _forget_compiled_functions(backbone)
    if backbone is not model:
        _forget_compiled_functions(model)
    return model
