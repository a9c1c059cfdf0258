"""`edgeft doctor`: what this machine can do, checked rather than assumed."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import sys
from dataclasses import dataclass

from edgeft import __version__, artifacts, models
from edgeft.cpu import cpu_flags, usable_cpus

PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "accelerate",
    "gguf",
    "optimum",
    "optimum-onnx",
    "onnx",
    "onnxruntime",
    "onnxruntime-genai",
    "onnxscript",
    "onnx-ir",
    "fastapi",
    "uvicorn",
)


@dataclass
class Check:
    name: str
    value: str
    ok: bool | None = None  # None: informational


def doctor() -> list[Check]:
    """Run every check; slow ones (torch, bitsandbytes) only when their package is installed."""
    checks = [
        Check("edgeft", __version__),
        Check("python", f"{sys.version.split()[0]} ({platform.machine()}, {platform.system()})"),
        Check("cpu cores", f"{usable_cpus()} usable of {os.cpu_count()}"),
        Check("cpu flags", " ".join(cpu_flags()) or "unknown (no /proc/cpuinfo)"),
    ]
    for name in PACKAGES:
        try:
            checks.append(Check(name, importlib.metadata.version(name), True))
        except importlib.metadata.PackageNotFoundError:
            checks.append(Check(name, "not installed", None))
    checks += _torch_checks()
    checks.append(_onnxruntime_check())
    home = models.edgeft_home()
    probe = home if home.exists() else home.parent if home.parent.exists() else os.path.expanduser("~")
    free = shutil.disk_usage(probe).free
    checks.append(Check("free disk", f"{artifacts.human_size(free)} at {probe}", free > 2e9))
    ready = [m.name for m in models.list_models() if m.status == "ready"]
    checks.append(Check("cache", f"{home} ({', '.join(ready) or 'no models yet'})"))
    return checks


def _torch_checks() -> list[Check]:
    try:
        import torch
    except ImportError:
        return [Check("torch device", "torch not installed: pip install 'edgeft[train]' to fine-tune", None)]
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        device = f"cuda ({name}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'})"
    else:
        device = f"cpu ({torch.get_num_threads()} threads; no CUDA GPU)"
    return [Check("torch device", device, True), _bnb_check(torch)]


def _bnb_check(torch) -> Check:
    """Quantize and run one tiny NF4 layer: the only honest answer to 'does QLoRA work here?'."""
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its notice about optional hub kernels is noise
    try:
        import bitsandbytes as bnb

        device = "cuda" if torch.cuda.is_available() else "cpu"
        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4").to(device)
        out = layer(torch.randn(2, 64, device=device))
        if not torch.isfinite(out).all():
            raise RuntimeError("non-finite output")
        return Check("bitsandbytes 4-bit", f"works on {device} (--method qlora available)", True)
    except ImportError:
        return Check("bitsandbytes 4-bit", "not installed (--method lora still works)", None)
    except Exception as e:
        return Check("bitsandbytes 4-bit", f"fails: {e} (use --method lora)", False)


def _onnxruntime_check() -> Check:
    try:
        import onnxruntime as ort

        return Check("onnxruntime providers", ", ".join(ort.get_available_providers()), True)
    except ImportError:
        return Check("onnxruntime providers", "onnxruntime not installed", False)
