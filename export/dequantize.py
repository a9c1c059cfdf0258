"""An int4/int8 export's weights as a transformers folder: the weights the export computes with.

Every MatMulNBits weight (int4 or int8, in blocks, with or without zero points) is turned back into
floats exactly as the kernel reads it, (code - zero point) x scale, and written over the matching
weight of the HF model the export came from; what the export keeps in full precision (norms, an fp32
head) stays the HF model's. The embedding table comes from the lookup's own quantized table when it
has one. Training an adapter on this folder trains it against the very weights an int4 export runs
(`edgeft tune --int4-base`, or `--model EXPORT`: training_base); it is also a way to look at what
rounding did.

The builder's MatMul names map to the HF modules through the same table the runtime adapters use
(export/matmuls.py): fused q/k/v split by rows, Phi-3's fused gate_up assembled from its halves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np

from edgeft import artifacts, models
from edgeft.errors import ConfigError, ExportError
from edgeft.export.matmuls import SLOT, SOURCES

log = logging.getLogger(__name__)

HEAD = "lm_head.weight"
EMBEDDING = "model.embed_tokens.weight"
# In a dequantized folder: the export it came from. A runtime adapter trained on the folder gets that
# export as its base (export/adapters.py), not a new rounding of the rounded weights (which moved
# ~2% of SmolLM2's int4 codes when tried).
SOURCE_FILE = "edgeft-dequantized.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def nbits_weight(
    codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, *, n: int, k: int, bits: int, block: int
):
    """The float [N, K] weight a MatMulNBits node computes with: codes [N, blocks, block * bits / 8]
    (two 4-bit codes a byte, low nibble first), scales [N * blocks], zero points packed as codes are
    per row (uint8) or floats, default 2^(bits-1)."""
    rows, blocks = n, -(-k // block)
    if bits == 4:
        q = _nibbles(codes.reshape(rows, blocks, block // 2))
    elif bits == 8:
        q = codes.reshape(rows, blocks, block).astype(np.float32)
    else:
        raise ExportError(f"{bits}-bit MatMulNBits weights are not supported (4 or 8).")
    if zeros is None:
        z = np.full((rows, blocks), 2 ** (bits - 1), np.float32)
    elif zeros.dtype != np.uint8:  # float zero points
        z = zeros.reshape(rows, blocks).astype(np.float32)
    elif bits == 4:
        z = _nibbles(zeros.reshape(rows, -1))[:, :blocks]  # each row's padded to whole bytes
    else:
        z = zeros.reshape(rows, blocks).astype(np.float32)
    weight = (q - z[..., None]) * scales.astype(np.float32).reshape(rows, blocks)[..., None]
    return weight.reshape(rows, blocks * block)[:, :k]


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """Two 4-bit values a byte, low nibble first, as floats (the last axis doubles)."""
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.float32)
    out[..., 0::2], out[..., 1::2] = packed & 0x0F, packed >> 4
    return out


def _gather_table(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, *, bits: int, block: int):
    """The float table a GatherBlockQuantized lookup reads (quantized along each row)."""
    rows = scales.shape[0]
    return nbits_weight(codes, scales, zeros, n=rows, k=scales.size // rows * block, bits=bits, block=block)


class _Graph:
    def __init__(self, folder: Path):
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(folder / "model.onnx"))
        self.nodes = list(model.graph.node)
        self.inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.producers = {out: node for node in self.nodes for out in node.output}

    def value(self, name: str) -> np.ndarray | None:
        """An initializer, seen through the Cast/Reshape the export put in front of it (fp16 scales,
        a shared table); None for an empty or absent input."""
        if not name:
            return None
        if name in self.inits:
            return self.inits[name]
        node = self.producers.get(name)
        if node is None or node.op_type not in ("Cast", "Reshape", "Identity"):
            raise ExportError(f"{name} is not a stored weight (made by {node.op_type if node else 'nothing'}).")
        return self.value(node.input[0])


def dequantized_weights(folder: Path, names: set[str], shape_of) -> dict[str, np.ndarray]:
    """The export's quantized weights as HF tensors {name: float32 array}, for a model whose weights are
    `names` (shape_of(name) gives each one's shape)."""
    graph, out = _Graph(folder), {}
    for node in graph.nodes:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "GatherBlockQuantized":
            codes, scales = graph.value(node.input[0]), graph.value(node.input[2])
            zeros = graph.value(node.input[3]) if len(node.input) > 3 else None
            out[EMBEDDING] = _gather_table(codes, scales, zeros, bits=attrs["bits"].i, block=attrs["block_size"].i)
            continue
        if node.op_type != "MatMulNBits":
            continue
        i = {k: a.i for k, a in attrs.items()}
        zeros = graph.value(node.input[3]) if len(node.input) > 3 else None
        weight = nbits_weight(
            graph.value(node.input[1]),
            graph.value(node.input[2]),
            zeros,
            n=i["N"],
            k=i["K"],
            bits=i["bits"],
            block=i["block_size"],
        )
        if node.name.startswith("/lm_head/"):
            out[HEAD] = weight
            continue
        match = SLOT.match(node.name)
        kind = f"{match[2]}/{match[3]}" if match else None
        if kind not in SOURCES:
            raise ExportError(f"{folder}: no HF weight is known for the MatMul {node.name}.")
        prefix = f"model.layers.{match[1]}."
        sources = next(
            (alt for alt in SOURCES[kind] if all(f"{prefix}{module}.weight" in names for module, _ in alt)), None
        )
        if sources is None:
            raise ExportError(f"{folder}: the model has none of the modules {kind} is made from (layer {match[1]}).")
        start = 0
        for module, half in sources:
            key = f"{prefix}{module}.weight"
            rows = shape_of(key)[0] // (2 if half is not None else 1)
            piece = weight[start : start + rows]
            start += rows
            if half is None:
                out[key] = piece
            else:  # one half of a fused matrix (Phi-3's gate_up_proj), the other comes from its own MatMul
                full = out.setdefault(key, np.zeros(shape_of(key), np.float32))
                full[half * rows : (half + 1) * rows] = piece
        if start != weight.shape[0]:
            raise ExportError(f"{folder}: {node.name} has {weight.shape[0]} outputs, its HF modules {start}.")
    return out


def write_dequantized(export: Path, source: Path, out: Path, **record) -> Path:
    """`export`'s weights (an int4 or int8 export of the HF folder `source`) as the HF folder `out`;
    `record` goes into its marker beside the export's and the source's paths."""
    from safetensors.numpy import load_file, save_file

    config = json.loads((source / "config.json").read_text())
    state = {}
    for file in sorted(source.glob("*.safetensors")):
        state.update({k: v.astype(np.float32) for k, v in load_file(str(file)).items()})
    if not state:
        raise ExportError(f"{source} has no safetensors weights to start from.")
    weights = dequantized_weights(export, set(state), lambda name: state[name].shape)
    if config.get("tie_word_embeddings") and HEAD not in state:
        head, table = weights.get(HEAD), weights.get(EMBEDDING)
        if head is not None and table is not None and np.array_equal(head, table):
            del weights[HEAD]  # one shared matrix, as the model has
        elif head is not None or table is not None:
            # the export's head and lookup differ (a lookup table of its own, or a head left in fp32):
            # the HF model unties them, each as the export has it
            config["tie_word_embeddings"] = False
            weights.setdefault(HEAD, state[EMBEDDING])
            weights.setdefault(EMBEDDING, state[EMBEDDING])
            state[HEAD] = state[EMBEDDING]
    for name, value in weights.items():
        if name in state and state[name].shape != value.shape:
            raise ExportError(f"{export}: {name} is {value.shape} in the export, {state[name].shape} in {source}.")
    state.update(weights)
    out.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        # config and tokenizer files; not the weights (written below) nor a GGUF the folder was converted from
        if file.is_file() and file.suffix not in WEIGHT_SUFFIXES and not file.name.endswith(".index.json"):
            shutil.copyfile(file, out / file.name)
    config["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(out / "model.safetensors"))
    (out / SOURCE_FILE).write_text(
        json.dumps({"export": str(export.resolve()), "source": str(source.resolve()), **record})
    )
    return out


def is_export(path: Path) -> bool:
    """An edgeft export folder (a model onnxruntime-genai loads, or a runtime adapter's folder)?"""
    return (path / "edgeft-export.json").is_file() and (
        (path / "genai_config.json").is_file() or (path / artifacts.ADAPTER_FILE).is_file()
    )


def training_base(export: Path) -> Path:
    """The HF folder of `export`'s own weights, to train an adapter on (`edgeft tune --model EXPORT`):
    made once per export in EDGEFT_HOME/int4-weights, made again when the export changes."""
    export = export.resolve()
    info = artifacts.read_json(export / "edgeft-export.json", "export record")
    if info.get("kind") == "adapter":
        raise ConfigError(
            f"{export} is a runtime adapter, not a model: train on its base export ({info.get('base')}) or on a run's "
            "model instead."
        )
    if info.get("precision") not in ("int4", "int8"):
        raise ConfigError(
            f"{export} is an {info.get('precision')} export, which computes with the model's own weights: pass the "
            f"model it was exported from ({info.get('source')}) as --model."
        )
    source = Path(info.get("source", ""))
    if not (source / "config.json").is_file():
        raise ConfigError(
            f"{export} was exported from {source}, which is gone: its config and tokenizer are needed to train on the "
            "export's weights. Export the model again, then pass the new export."
        )
    stamp = _stamp(export)
    out = models.edgeft_home() / "int4-weights" / f"{export.name}-{_digest(str(export))}"
    marker = out / SOURCE_FILE
    if (
        (out / "model.safetensors").is_file()
        and marker.is_file()
        and json.loads(marker.read_text()).get("stamp") == stamp
    ):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    artifacts.check_free_space(out.parent, artifacts.dir_size(source) * 3, "the export's weights in full precision")
    with artifacts.staged_dir(out, force=True, what="the export's weights") as tmp:
        write_dequantized(export, source, tmp, stamp=stamp)
    return out


def int4_export_of(spec: str) -> Path:
    """`edgeft tune --int4-base`: the model's int4 export to train against (RTN rounding, the default
    layout otherwise), made once per model in EDGEFT_HOME/int4-exports."""
    from edgeft.export.onnx import export
    from edgeft.export.options import ExportConfig

    model = models.resolve_model(spec).path.resolve()
    weights = sorted(p for p in model.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    key = _digest(json.dumps([str(model), [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in weights]]))
    folder = models.edgeft_home() / "int4-exports" / f"{model.name}-{key}"
    if (folder / "edgeft-export.json").is_file() and (folder / "model.onnx").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    log.info(f"Exporting {spec} to int4 (once) to train against its weights: {folder}")
    # not verified: its reference would be the full-precision model, and what is trained is this export
    return export(
        str(model), ExportConfig(precision="int4", quant_method="rtn", verify=False, output=str(folder)), force=True
    )


def _stamp(export: Path) -> list:
    """What changes when the export is made again: its model file's (and weight data's) sizes and times."""
    files = [p for p in (export / "model.onnx", export / "model.onnx.data") if p.is_file()]
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def source_export(folder: Path) -> Path | None:
    """The export a dequantized HF folder was made from (None for any other folder)."""
    marker = folder / SOURCE_FILE
    if not marker.is_file():
        return None
    export = Path(json.loads(marker.read_text())["export"])
    if not (export / "model.onnx").is_file():
        raise ExportError(
            f"{folder} was dequantized from the export {export}, which is gone: its adapters need that export as "
            "their base. Export the source model again and dequantize it again, or export a merged model."
        )
    return export


def main(argv: list[str] | None = None) -> None:
    """python -m edgeft.export.dequantize EXPORT SOURCE_HF OUT"""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        raise SystemExit("usage: python -m edgeft.export.dequantize EXPORT SOURCE_HF_FOLDER OUT")
    print(write_dequantized(Path(args[0]), Path(args[1]), Path(args[2])))


if __name__ == "__main__":
    main()
