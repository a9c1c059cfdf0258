"""Run the onnxruntime-genai model builder with three changes: int8 for chosen MatMul kinds in every
layer, int8 weights in larger blocks, and quantization one weight at a time.

The builder (0.15) can keep the head and a llama.cpp-style third of the layers in int8, but not a
kind of MatMul throughout. On SmolLM2-135M that is what int4 needs (measured on the recipe sample,
100 answers, exact match: fp32 81%, int4 k_quant 46%, builder's mixed layers 62%, attention and
down projections int8 in every layer 73%). Usage, as a subprocess:

    python -m edgeft.export.genai_builder INT8_KINDS <builder arguments>

INT8_KINDS is a comma-separated list such as `attn/qkv_proj,mlp/down_proj`, or `-` for none.

The builder quantizes by turning its whole graph, with every weight in fp32, into one in-memory
ONNX proto while the torch model it came from is still loaded: twice the fp32 model (31 GB for a
3.8B model, past a 24 GB machine). Here the fp32 graph is first written to disk, the torch weights
are let go, and each MatMul weight is read back and quantized alone by the same onnxruntime
quantizer with the same settings, so the result is the builder's, byte for byte (tests/test_export.py),
and memory holds the quantized weights and one fp32 matrix.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path


def _int8_layout(kinds: list[str]) -> None:
    """int8 for `kinds` in every layer (on top of the builder's own mixed layers and head), and
    every int8 layer MatMul symmetric in blocks as large as its input size allows
    (options.int8_block). The head keeps int4's blocks (see options.INT8_MAX_BLOCK)."""
    import onnxruntime_genai.models  # noqa: F401  (puts its folder on sys.path)

    # builder.py imports its helpers as the top-level package `builders`: patch that copy.
    from builders.base import Model

    from edgeft.export.options import int8_block

    original = Model.make_matmul_mixed_precision

    def make_matmul_mixed_precision(self, placement):
        original(self, placement)
        config = self.int4_customized_weight_config
        for i in range(self.num_layers):
            for kind in kinds:
                config[f"/model/layers.{i}/{kind}/MatMul"] = {"bits": 8}
        for name, node in config.items():
            if node.get("bits") == 8 and not name.startswith("/lm_head/"):
                inputs = (
                    self.intermediate_size
                    if "/down_proj/" in name
                    else self.num_attn_heads * self.head_size
                    if "/o_proj/" in name
                    else self.hidden_size
                )
                node.update(group_size=int8_block(inputs), scheme="sym")

    Model.make_matmul_mixed_precision = make_matmul_mixed_precision


def _quantize_tensor_by_tensor() -> None:
    import onnxruntime_genai.models  # noqa: F401
    from builders.base import Model

    original = Model.save_model

    def save_model(self, out_dir):
        import onnx_ir as ir

        quantized = {ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.INT8, ir.DataType.UINT8}
        if self.onnx_dtype not in quantized or self.quant_attrs["use_qdq"]:
            return original(self, out_dir)
        model = _streamed_nbits(self, Path(out_dir))
        self.to_nbits = lambda: model  # what the builder's save_model quantizes with
        return original(self, out_dir)

    Model.save_model = save_model


def _pack_zero_points_per_row() -> None:
    """onnxruntime 1.31's weight-only quantizer packs 4-bit zero points two a byte across the whole
    matrix, but MatMulNBits reads them per row ([N, ceil(blocks / 2)]): when a row has an odd
    number of blocks (K=576 at block 64: 9) the builder fails. Build the node without them, then
    add them packed per row."""
    import numpy as np
    from onnx import TensorProto, helper
    from onnxruntime.quantization.neural_compressor import weight_only

    from edgeft.export.gptq import pack_zero_points

    original = weight_only.make_matmul_weight_only_node

    def make_matmul_weight_only_node(node, weight_shape, num_bits, group_size, k_blocks, *args, **kwargs):
        names = ("q_weight", "scale", "zero_point", "accuracy_level")
        kwargs.update(zip(names, args))
        zero_point = kwargs["zero_point"]
        if zero_point is None or num_bits != 4 or k_blocks % 2 == 0:
            return original(node, weight_shape, num_bits, group_size, k_blocks, **kwargs)
        made, inits = original(node, weight_shape, num_bits, group_size, k_blocks, **{**kwargs, "zero_point": None})
        packed = pack_zero_points(np.asarray(zero_point).reshape(weight_shape[1], k_blocks).astype(np.uint8))
        tensor = helper.make_tensor(f"{node.input[1]}_zp", TensorProto.UINT8, packed.shape, packed.tobytes(), raw=True)
        made.input.append(tensor.name)
        return made, [*inits, tensor]

    weight_only.make_matmul_weight_only_node = make_matmul_weight_only_node


def _streamed_nbits(builder, out_dir: Path):
    """The builder's to_nbits, one MatMul weight at a time (see the module's docstring)."""
    import gc
    import shutil

    import onnx
    import onnx_ir as ir
    from onnx import external_data_helper, helper, numpy_helper
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    attrs = builder.quant_attrs
    staging = out_dir / ".fp32-staging"
    staging.mkdir(parents=True, exist_ok=True)
    print("Writing the fp32 graph to disk to quantize it one weight at a time", flush=True)
    ir.save(builder.model, staging / "model.onnx", external_data="model.onnx.data", size_threshold_bytes=0)
    # Let the torch weights go: the graph's values point into them (through builder.values too),
    # and the model keeps the safetensors files mapped.
    for value in builder.model.graph.initializers.values():
        value.const_value = None
    builder.model = builder.graph = builder.weights = None
    builder.values = {}
    gc.collect()
    proto = onnx.load(str(staging / "model.onnx"), load_external_data=False)
    initializers = {t.name: t for t in proto.graph.initializer}
    excluded = set(attrs["nodes_to_exclude"])
    customized = getattr(builder, "int4_customized_weight_config", {}) or {}
    base_method = getattr(builder, "quantization_algo", "default")
    quant_format = QuantFormat.QDQ if attrs["use_qdq"] else QuantFormat.QOperator
    nodes, added, dropped = [], [], set()
    matmuls = [n for n in proto.graph.node if n.op_type in attrs["op_types_to_quantize"]]
    for done, node in enumerate(proto.graph.node):
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if weight is None or node.name in excluded or node.op_type not in attrs["op_types_to_quantize"]:
            nodes.append(node)
            continue
        copy = onnx.TensorProto()
        copy.CopyFrom(weight)
        array = numpy_helper.to_array(copy, base_dir=str(staging))
        k, n = array.shape
        graph = helper.make_graph(
            [node],
            "one_matmul",
            [helper.make_tensor_value_info(node.input[0], weight.data_type, [None, k])],
            [helper.make_tensor_value_info(node.output[0], weight.data_type, [None, n])],
            [numpy_helper.from_array(array, weight.name)],
        )
        single = helper.make_model(graph, opset_imports=proto.opset_import, ir_version=proto.ir_version)
        # As the builder's to_nbits: the default method quantizes the upgraded nodes at their own width.
        default_upgrade = base_method == "default" and node.name in customized
        quantizer = MatMulNBitsQuantizer(
            model=single,
            bits=customized[node.name]["bits"] if default_upgrade else attrs["bits"],
            block_size=attrs["qdq_block_size"],
            is_symmetric=attrs["is_symmetric"],
            accuracy_level=attrs["accuracy_level"],
            nodes_to_exclude=[],
            quant_format=quant_format,
            op_types_to_quantize=attrs["op_types_to_quantize"],
            algo_config=None if base_method == "default" else attrs["algo_config"],
        )
        quantizer.process()
        result = quantizer.model.model
        # Copies: a message taken out of `result` would keep all of it alive, fp32 weight included.
        nodes.extend(_copy(onnx.NodeProto, n) for n in result.graph.node)
        added.extend(_copy(onnx.TensorProto, t) for t in result.graph.initializer)
        dropped.add(weight.name)
        del array, copy, single, quantizer, result
        if done % 16 == 0:
            print(f"Quantized {len(dropped)}/{len(matmuls)} MatMul weights", flush=True)
    kept = [t for t in proto.graph.initializer if t.name not in dropped]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept + added)
    external_data_helper.load_external_data_for_model(proto, str(staging))  # the unquantized rest
    shutil.rmtree(staging)
    builder.prepack_matmulnbits_weights(proto)
    return ir.from_proto(proto)


def _copy(kind, message):
    fresh = kind()
    fresh.CopyFrom(message)
    return fresh


if __name__ == "__main__":
    _int8_layout([k for k in sys.argv[1].split(",") if k and k != "-"])
    _pack_zero_points_per_row()
    if not os.environ.get("EDGEFT_BUILDER_WHOLE_GRAPH"):  # the builder's own way: for the equality test
        _quantize_tensor_by_tensor()
    sys.argv = ["builder", *sys.argv[2:]]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
