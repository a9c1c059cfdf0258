"""GPTQ rounding for the int4 MatMuls of an export, calibrated on the run's own training data.

Plain and k_quant rounding treat each weight alone. GPTQ (Frantar et al., 2022, "Accurate
Post-Training Quantization for Generative Pre-trained Transformers") rounds one input column at a
time and moves its rounding error onto the columns not yet rounded, weighted by how the layer's
inputs correlate on real data (H = X^T X), so the layer's outputs move least. On a 135M model
that answers in long JSON, one flipped token fails an answer: rounding that keeps outputs close is
what int4 needs there.

The builder writes the graph and its own int4 weights; this module then overwrites the bytes of
every int4 MatMulNBits weight it can map to a torch Linear (same names, same shapes, same
layout), so the graph, and everything else in the folder, stays the builder's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeft.errors import ExportError
from edgeft.export.compact import fp16_exact

WEIGHT_SUFFIX = ".MatMul.weight_Q4G"  # the builder's name for an int4 weight: <torch name>.MatMul.weight_Q4G<block>
# At least 64 examples: 64 rounded as well as 128 on the recipe sample (int4 exact match 89.5% vs 89.0%,
# perplexity 1.029 vs 1.030, one `edgeft eval` run), in half the time: carrying them through the
# layers is most of GPTQ. Short examples under one long shared prompt (a classifier's label list)
# hold few tokens of their own: 64 intents examples held ~1,000 distinct token states, fewer than
# the 1,536 inputs of SmolLM2's down projection. More are taken until they hold
# CALIBRATION_OWN_TOKENS, while what is carried stays under CALIBRATION_TOTAL_TOKENS (twice 64
# examples of CALIBRATION_MAX_TOKENS). With all 324 (and the prompt counted once) the intents int4
# export matched the model as trained on two seeds (73.0 and 72.0; 66.0 and 68.0 with 64).
CALIBRATION_EXAMPLES = 64
CALIBRATION_MAX_TOKENS = 512
CALIBRATION_OWN_TOKENS = 8192
CALIBRATION_TOTAL_TOKENS = 65536
DAMPING = 0.01  # of H's mean diagonal, so that H stays invertible for inputs that barely vary
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8)  # a block's range may shrink when that lowers its error


@dataclass
class Target:
    """One int4 MatMulNBits weight and the torch Linear it came from."""

    modules: list[str]  # e.g. [model.layers.0.mlp.gate_proj]; q, k and v for the builder's fused qkv_proj
    weight: str  # initializer names
    scales: str
    zero_points: str
    block_size: int
    rows: tuple[int, int] | None = None  # the part of the stacked weight this MatMul holds


# --- the algorithm ------------------------------------------------------------------------


def quantize(
    weight,
    hessian,
    block_size: int,
    *,
    bits: int = 4,
    damping: float = DAMPING,
    act_order: bool = True,
    batch: int = 128,
):
    """GPTQ for one [out, in] weight: integer codes [out, in], scales and zero points [out, in / block_size].

    Asymmetric blocks along the input dimension, as MatMulNBits stores them: w ~ (code - zero) * scale.
    With act_order, columns are rounded from the most to the least active input (the paper's
    "act-order", which matters most on small models); each block's grid is then fixed up front
    from the unrounded weights, since a block's columns are no longer rounded together.
    """
    import torch

    W = weight.detach().to(torch.float64).clone()
    H = hessian.to(torch.float64).clone()
    rows, cols = W.shape
    if cols % block_size:
        raise ExportError(f"GPTQ needs the input size ({cols}) to be a multiple of the block size ({block_size}).")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    top = 2**bits - 1
    blocks = cols // block_size
    scales = torch.zeros((rows, blocks), dtype=torch.float64)
    zeros = torch.zeros((rows, blocks), dtype=torch.float64)
    order = torch.arange(cols)
    if act_order:
        for b in range(blocks):
            scales[:, b], zeros[:, b] = _block_grid(W[:, b * block_size : (b + 1) * block_size], top)
        order = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, order], H[order][:, order]
    H += damping * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    # Rows of the upper Cholesky factor of H^-1 give each column's error-spreading weights.
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    codes = torch.zeros((rows, cols), dtype=torch.uint8)
    for b0 in range(0, cols, batch):
        b1 = min(b0 + batch, cols)
        W1, E1 = W[:, b0:b1].clone(), torch.zeros((rows, b1 - b0), dtype=W.dtype)
        for j in range(b1 - b0):
            col = int(order[b0 + j])
            block = col // block_size
            if not act_order and col % block_size == 0:
                scales[:, block], zeros[:, block] = _block_grid(W1[:, j : j + block_size], top)
            scale, zero = scales[:, block], zeros[:, block]
            code = torch.clamp(torch.round(W1[:, j] / scale) + zero, 0, top)
            codes[:, col] = code.to(torch.uint8)
            error = (W1[:, j] - (code - zero) * scale) / U[b0 + j, b0 + j]
            W1[:, j:] -= error[:, None] * U[b0 + j, b0 + j : b1][None, :]
            E1[:, j] = error
        W[:, b1:] -= E1 @ U[b0:b1, b1:]
    return codes, scales.to(torch.float32), zeros.to(torch.uint8)


def _block_grid(block, top: int):
    """Scale and zero point per row for one block, the clipped range with the least squared error."""
    import torch

    low = torch.clamp(block.min(dim=1).values, max=0.0)
    high = torch.clamp(block.max(dim=1).values, min=0.0)
    best_error = torch.full((block.shape[0],), float("inf"), dtype=block.dtype)
    best_scale, best_zero = torch.ones_like(low), torch.zeros_like(low)
    for ratio in CLIP_RATIOS:
        scale = fp16_exact((high - low) * ratio / top)  # the folder stores scales in fp16
        zero = torch.clamp(torch.round(-low * ratio / scale), 0, top)
        rounded = (torch.clamp(torch.round(block / scale[:, None]) + zero[:, None], 0, top) - zero[:, None]) * scale[
            :, None
        ]
        error = ((rounded - block) ** 2).sum(dim=1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale, best_zero = torch.where(better, scale, best_scale), torch.where(better, zero, best_zero)
    return best_scale, best_zero


def pack(codes: np.ndarray, zeros: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' 4-bit layout: weights [N, blocks, block_size / 2], zero points [N, ceil(blocks / 2)], low nibble first."""
    rows, cols = codes.shape
    blocks = codes.reshape(rows, cols // block_size, block_size)
    packed = (blocks[..., 0::2] | (blocks[..., 1::2] << 4)).astype(np.uint8)
    return packed, pack_zero_points(zeros)


def pack_zero_points(zeros: np.ndarray) -> np.ndarray:
    """4-bit zero points [N, blocks] as MatMulNBits reads them: [N, ceil(blocks / 2)], each row padded."""
    rows = zeros.shape[0]
    if zeros.shape[1] % 2:
        zeros = np.concatenate([zeros, np.zeros((rows, 1), dtype=zeros.dtype)], axis=1)
    return (zeros[:, 0::2] | (zeros[:, 1::2] << 4)).astype(np.uint8)


# --- calibration --------------------------------------------------------------------------


def calibration_ids(
    tokenizer, data_file: Path, n: int = CALIBRATION_EXAMPLES, *, held_out: Path | None = None
) -> list[list[int]]:
    """Token ids of at least n examples of the training data (spread over it), rendered as training
    renders them; more when n hold fewer than CALIBRATION_OWN_TOKENS tokens beyond a shared prefix.
    Examples of `held_out` (the run's validation split, which the fidelity gate checks the export on)
    are left out: rounding fitted to the gate's own prompts would pass it more easily."""
    from edgeft.chatdata import ChatRenderer, end_of_turn_for, load_dataset

    renderer = ChatRenderer(tokenizer, end_of_turn_for(tokenizer), max_seq_len=CALIBRATION_MAX_TOKENS)
    checked = {tuple(renderer.tokenize(e).input_ids) for e in load_dataset(held_out).examples} if held_out else set()
    examples = load_dataset(data_file).examples
    if not examples:
        raise ExportError(f"{data_file} has no usable examples to calibrate GPTQ with.")

    def spread(k: int) -> list[list[int]]:
        k = min(k, len(examples))
        picked = (renderer.tokenize(examples[i * len(examples) // k]).input_ids for i in range(k))
        return [ids for ids in picked if tuple(ids) not in checked]

    first = spread(n)
    if not first:
        raise ExportError(f"{data_file} has no examples to calibrate GPTQ with besides the held-out ones.")
    own = sum(len(ids) for ids in first) - shared_prefix(first) * (len(first) - 1)
    carried = sum(map(len, first))
    wanted = min(-(-CALIBRATION_OWN_TOKENS * len(first) // own), CALIBRATION_TOTAL_TOKENS * len(first) // carried)
    if wanted <= len(first) or n >= len(examples):
        return first
    return spread(wanted)


def shared_prefix(batches: list[list[int]]) -> int:
    """How many leading tokens every calibration example shares (a system prompt, tool definitions),
    leaving each example at least one token of its own."""
    from edgeft.fidelity import common_start

    return common_start(batches)


class _Stop(Exception):
    pass


def layer_hessians(model, modules: list[str], batches: list[list[int]]):
    """H = sum of x x^T over every calibration token, for the input of each named Linear, one
    decoder layer at a time: yields {name: H} for each layer's modules, then frees them.

    A prefix every example shares is counted once: its hidden states are the same in every example
    (causal attention), and counted 64 times a 159-token system prompt outweighed the ~14 tokens
    that differ (the intents sample), so GPTQ fitted the prompt every answer starts from and not
    the messages that decide the answer.

    The calibration inputs are carried through the model layer by layer (each layer's outputs are
    the next one's inputs, kept for every example), so memory holds one layer's statistics and the
    hidden states, never every layer's H at once (32 layers of Phi-3-mini: 24 GB in float64).
    """
    import torch

    from edgeft.progress import progress

    layers = model.get_decoder().layers
    prefix = {i: f"{name}." for name, layer in model.named_modules() for i, x in enumerate(layers) if x is layer}
    stored = []  # per example: the first layer's positional and keyword inputs

    def catch(_module, args, kwargs):
        stored.append([list(args), dict(kwargs)])
        raise _Stop

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in batches:
                try:
                    model(torch.tensor([ids]), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()

    sums, last = {}, {}
    prefix_len = shared_prefix(batches)
    skip = {"tokens": 0}  # leading tokens of the current example left out of H

    def hook(name):
        def accumulate(_module, inputs, _output):
            x = inputs[0]
            # Linears reading the same tensor (gate and up) share the product. Compared by identity,
            # holding the tensor: a freed tensor's address is soon another layer's input.
            if last.get("input") is not x:
                flat = x.detach().reshape(-1, x.shape[-1])[skip["tokens"] :].float()
                last.update(input=x, product=(flat.T @ flat).double())
            sums[name] = sums.get(name, 0) + last["product"]

        return accumulate

    for index in progress(range(len(layers)), desc="GPTQ", unit="layer"):
        mine = [m for m in modules if m.startswith(prefix[index])]
        handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in mine]
        try:
            with torch.no_grad():
                for i, example in enumerate(stored):
                    skip["tokens"] = prefix_len if i else 0
                    out = layers[index](*example[0], **example[1])
                    example[0][0] = out[0] if isinstance(out, tuple) else out
        finally:
            for h in handles:
                h.remove()
            last.clear()
        yield {name: sums.pop(name) for name in mine if name in sums}


def hessians(model, modules: list[str], batches: list[list[int]]) -> dict:
    """Every named Linear's H at once (small models and checks; `apply` goes layer by layer)."""
    found = {}
    for layer in layer_hessians(model, modules, batches):
        found.update(layer)
    return found


# --- applying it to an export -------------------------------------------------------------


# An int4 head keeps k_quant (tied models' heads are int8 by default, see embeddings.py): measured on
# the recipe sample, an int4 head alone costs no exact match (82.5% vs 80.5% fp32), and GPTQ over
# its 49k rows would take longer than all layers together.
SKIP = ("lm_head",)

# The builder's fused MatMuls and the torch Linears stacked in them (they read the same input, so
# GPTQ on the stack is GPTQ on each).
FUSED = {"attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")}
# And the other way round (Phi-3 fuses gate and up in torch; the builder splits them): the torch
# Linear and which half of its rows the MatMul holds.
HALVES = {"mlp.gate_proj": ("mlp.gate_up_proj", 0), "mlp.up_proj": ("mlp.gate_up_proj", 1)}


def targets(graph, model) -> list[Target]:
    """The int4 MatMulNBits weights that come from torch Linears of the same shape (a head shared with
    the embedding does not: GPTQ would shape it for the head and spoil it for the lookup)."""
    shared = {name for node in graph.node if node.op_type == "GatherBlockQuantized" for name in node.input}
    found = []
    for node in graph.node:
        attrs = {a.name: a.i for a in node.attribute}
        if (
            node.op_type != "MatMulNBits"
            or attrs.get("bits") != 4
            or shared & set(node.input[1:])
            or len(node.input) < 4
        ):
            continue
        name = node.input[1].split(WEIGHT_SUFFIX)[0]
        if name in SKIP:
            continue
        direct = name.replace(".attn.", ".self_attn.")
        options = [[direct]] + [
            [name[: -len(f)] + part for part in parts] for f, parts in FUSED.items() if name.endswith("." + f)
        ]
        names, N, K = node.input[1:4], attrs["N"], attrs["K"]
        for modules in options:
            linears = [_linear(model, m) for m in modules]
            if all(x is not None for x in linears) and (
                sum(x.weight.shape[0] for x in linears),
                linears[0].weight.shape[1],
            ) == (N, K):
                found.append(Target(modules, *names, attrs["block_size"]))
                break
        else:
            for part, (fused, half) in HALVES.items():
                linear = _linear(model, name[: -len(part)] + fused) if name.endswith("." + part) else None
                if linear is not None and tuple(linear.weight.shape) == (2 * N, K):
                    found.append(
                        Target([name[: -len(part)] + fused], *names, attrs["block_size"], (half * N, (half + 1) * N))
                    )
    return found


def _linear(model, name: str):
    import torch

    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    return module if isinstance(module, torch.nn.Linear) else None


def apply(model_dir: Path, onnx_dir: Path, data_file: Path, held_out: Path | None = None) -> dict:
    """Re-round the export's int4 weights with GPTQ; returns what was done, for the export record."""
    import onnx
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    model_file = onnx_dir / "model.onnx"
    proto = onnx.load(str(model_file), load_external_data=False)
    torch_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    found = targets(proto.graph, torch_model)
    if not found:
        return {"method": "gptq", "matmuls": 0, "seconds": 0.0}
    batches = calibration_ids(AutoTokenizer.from_pretrained(model_dir), data_file, held_out=held_out)
    writer = _TensorWriter(proto, onnx_dir)
    by_module = {}
    for target in found:
        by_module.setdefault(target.modules[0], []).append(target)
    done = 0
    for H in layer_hessians(torch_model, sorted(by_module), batches):
        for name, hessian in H.items():
            for target in by_module[name]:
                weight = torch.cat([torch_model.get_submodule(m).weight for m in target.modules])
                if target.rows:
                    weight = weight[target.rows[0] : target.rows[1]]
                codes, scales, zeros = quantize(weight, hessian, target.block_size)
                packed, packed_zeros = pack(codes.numpy(), zeros.numpy(), target.block_size)
                writer.replace(target.weight, packed)
                writer.replace(target.scales, scales.numpy())
                writer.replace(target.zero_points, packed_zeros)
                done += 1
    if done != len(found):
        raise ExportError(f"GPTQ rounded {done} of {len(found)} int4 MatMuls: some sit outside the decoder layers.")
    writer.save(model_file)
    return {
        "method": "gptq",
        "matmuls": len(found),
        "calibration_examples": len(batches),
        "calibration_tokens": sum(map(len, batches)),
        "calibration_shared_prefix": shared_prefix(batches),  # tokens every example starts with, counted once
        "seconds": round(time.perf_counter() - start, 1),
    }


class _TensorWriter:
    """Overwrites initializers in place: same shape and type, so external data keeps its offsets."""

    def __init__(self, proto, folder: Path):
        self.proto, self.folder = proto, folder
        self.by_name = {t.name: t for t in proto.graph.initializer}
        self.inline_changed = False

    def replace(self, name: str, array: np.ndarray) -> None:
        from onnx import helper

        tensor = self.by_name[name]
        expected = (tuple(tensor.dims), helper.tensor_dtype_to_np_dtype(tensor.data_type))
        if (array.shape, array.dtype) != expected:
            raise ExportError(f"GPTQ produced {name} as {array.shape} {array.dtype}, but the export has {expected}.")
        data = np.ascontiguousarray(array).tobytes()
        external = {e.key: e.value for e in tensor.external_data}
        if "location" not in external:
            tensor.raw_data = data
            self.inline_changed = True
            return
        offset, length = int(external.get("offset", 0)), int(external.get("length", len(data)))
        if length != len(data):
            raise ExportError(f"{name}: {len(data)} bytes do not fit the {length} the export reserved.")
        with open(self.folder / external["location"], "r+b") as f:
            f.seek(offset)
            f.write(data)

    def save(self, model_file: Path) -> None:
        if self.inline_changed:
            import onnx

            onnx.save_model(self.proto, str(model_file))
