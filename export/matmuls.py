"""The genai builder's projection MatMuls and the transformers modules each one is made from:
shared by runtime adapters (a LoRA slot per MatMul) and dequantization (a weight back per module)."""

from __future__ import annotations

import re

# A projection MatMul as the genai builder names it: /model/layers.3/attn/qkv_proj/MatMul(_Q4)
SLOT = re.compile(r"^/model/layers\.(\d+)/(attn|mlp)/(\w+)/MatMul")
# The peft modules that feed each builder MatMul, in the order of its output columns, as
# alternatives: Llama-style models have q/k/v apart, which the builder fuses into qkv_proj; Phi-3
# has qkv_proj and gate_up_proj fused, which the builder splits into gate_proj and up_proj
# (half 0 and 1 of the fused output).
SOURCES = {
    "attn/qkv_proj": (
        (("self_attn.q_proj", None), ("self_attn.k_proj", None), ("self_attn.v_proj", None)),
        (("self_attn.qkv_proj", None),),
    ),
    "attn/q_proj": ((("self_attn.q_proj", None),),),
    "attn/k_proj": ((("self_attn.k_proj", None),),),
    "attn/v_proj": ((("self_attn.v_proj", None),),),
    "attn/o_proj": ((("self_attn.o_proj", None),),),
    "mlp/gate_proj": ((("mlp.gate_proj", None),), (("mlp.gate_up_proj", 0),)),
    "mlp/up_proj": ((("mlp.up_proj", None),), (("mlp.gate_up_proj", 1),)),
    "mlp/down_proj": ((("mlp.down_proj", None),),),
}
