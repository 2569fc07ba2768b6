"""keras_moe with other libraries.

- `keras_moe.integrations.keras_hub`: `sparsify(model)` runs the MoE blocks
  of keras-hub's Mixtral, Qwen-MoE and Qwen3-MoE models through keras_moe
  (`pip install "keras_moe[keras_hub]"`).

Each integration is imported by name, not from here: importing
`keras_moe.integrations` imports none of the libraries.
"""
