"""Run the onnxruntime-genai model builder with one addition: int8 for chosen MatMul kinds in every layer.

The builder (0.15) can keep the head and a llama.cpp-style third of the layers in int8, but not a
kind of MatMul throughout. On SmolLM2-135M that is what int4 needs (measured on the recipe sample,
100 answers, exact match: fp32 81%, int4 k_quant 46%, builder's mixed layers 62%, attention and
down projections int8 in every layer 73%). Usage, as a subprocess:

    python -m edgeft.export.genai_builder INT8_KINDS <builder arguments>

INT8_KINDS is a comma-separated list such as `attn/qkv_proj,mlp/down_proj`, or `-` for none.
"""

from __future__ import annotations

import runpy
import sys


def _add_int8_kinds(kinds: list[str]) -> None:
    import onnxruntime_genai.models  # noqa: F401  (puts its folder on sys.path)

    # builder.py imports its helpers as the top-level package `builders`: patch that copy.
    from builders.base import Model

    original = Model.make_matmul_mixed_precision

    def make_matmul_mixed_precision(self, placement):
        original(self, placement)
        for i in range(self.num_layers):
            for kind in kinds:
                self.int4_customized_weight_config[f"/model/layers.{i}/{kind}/MatMul"] = {"bits": 8}

    Model.make_matmul_mixed_precision = make_matmul_mixed_precision


if __name__ == "__main__":
    kinds = [k for k in sys.argv[1].split(",") if k and k != "-"]
    if kinds:
        _add_int8_kinds(kinds)
    sys.argv = ["builder", *sys.argv[2:]]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
