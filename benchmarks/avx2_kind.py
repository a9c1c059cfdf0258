"""Run edgeft as on an AVX2-only CPU, at native speed, on a machine with AVX-512.

Our goals must hold on both kinds of CPU this project runs on: AVX-512 with VNNI and bf16, and
AVX2 + FMA only (most laptops and edge boxes). When no AVX2-only machine is at hand, qemu's
`-cpu Haswell` (benchmarks/cpu_kinds.py) shows the AVX2 kernels' answers but emulates them about
a hundred times slower. This instead makes a copy of the project's virtual environment whose
native libraries take their AVX2 code paths on this CPU:

- ONNX Runtime (the shared library onnxruntime-genai loads, and the Python module) and the
  bitsandbytes CPU library decide on AVX-512 by reading XCR0 (`xgetbv`: has the OS enabled the
  AVX-512 registers?). In the copy every `xgetbv` reads x87|SSE|AVX only (`push 7; pop rax`, the
  same 3 bytes), and MLAS's AVX-VNNI branch (cpuid leaf 7.1, EAX bit 4) is never taken.
- llama.cpp (llama-cpp-python, if installed) is rebuilt without AVX-512 and VNNI.
- PyTorch is held to AVX2 (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS), and
  commands see a /proc/cpuinfo without avx512*, avx_vnni and amx* flags (a private mount
  namespace: root only), so edgeft trains in fp32 and prints the AVX2 kind's flags.

    python benchmarks/avx2_kind.py setup /tmp/avx2          # ~4 min with llama.cpp's compile
    python benchmarks/avx2_kind.py check /tmp/avx2 runs/quickstart/onnx-int4
    python benchmarks/avx2_kind.py run /tmp/avx2 -- edgeft bench runs/quickstart --compare

`check` proves the copy: an export's logits from the copy must equal, bit for bit, those of the
unpatched libraries under `qemu-x86_64 -cpu Haswell`. The copy keeps this machine's clock, caches
and memory: its numbers say what the AVX2 code paths cost here, not what an older AVX2 laptop
measures. Never use the copy for anything but measuring.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HIDDEN_FLAGS = re.compile(r" (avx512\w*|avx_vnni\w*|amx\w*)(?=\s)")
ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
XGETBV, READS_AVX_ONLY = b"\x0f\x01\xd0", b"\x6a\x07\x58"  # push 7; pop rax: XCR0 = x87 | SSE | AVX
LLAMA_CMAKE = "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF"


def _load_segments(path: Path) -> list[tuple[int, int, int]]:
    out = subprocess.run(["readelf", "-lW", str(path)], capture_output=True, text=True, check=True).stdout
    return [
        (int(f[1], 16), int(f[2], 16), int(f[4], 16)) for f in map(str.split, out.splitlines()) if f[:1] == ["LOAD"]
    ]


def _file_offset(segments, address: int) -> int:
    for offset, vaddr, size in segments:
        if vaddr <= address < vaddr + size:
            return address - vaddr + offset
    raise ValueError(f"address {address:#x} is in no loaded segment")


def patch_library(path: Path) -> tuple[int, int]:
    """Patch one shared library in place; returns (xgetbv sites, AVX-VNNI branches) patched.

    Sites come from the disassembly, never a byte search: the same bytes occur inside other
    instructions and data."""
    code = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(path)], capture_output=True, text=True, check=True
    ).stdout
    segments, data = _load_segments(path), bytearray(path.read_bytes())
    sites = [int(a, 16) for a in re.findall(r"^\s*([0-9a-f]+):\s+xgetbv", code, re.MULTILINE)]
    for address in sites:
        at = _file_offset(segments, address)
        if data[at : at + 3] != XGETBV:
            raise RuntimeError(f"{path}: no xgetbv at {address:#x}")
        data[at : at + 3] = READS_AVX_ONLY
    branches = 0
    vnni = r"^\s*[0-9a-f]+:\s+mov\s+\$0x1,%ecx\n\s*[0-9a-f]+:\s+cpuid\n\s*[0-9a-f]+:\s+test\s+\$0x10,%al\n\s*([0-9a-f]+):\s+je\s"
    for jump in re.findall(vnni, code, re.MULTILINE):
        at = _file_offset(segments, int(jump, 16))
        if data[at] != 0x74:  # je rel8
            raise RuntimeError(f"{path}: unexpected branch at {jump}")
        data[at] = 0xEB  # jmp rel8: never the AVX-VNNI kernels
        branches += 1
    path.write_bytes(data)
    return len(sites), branches


def site_packages(venv: Path) -> Path:
    return next(venv.glob("lib/python3*/site-packages"))


def setup(target: Path, source: Path) -> None:
    venv = target / "venv"
    if venv.exists():
        sys.exit(f"{venv} exists: remove it or choose another folder")
    if not (source / "bin" / "python").exists():
        sys.exit(f"{source} is not a virtual environment: run `make setup` first, or pass --venv")
    print(f"Copying {source} to {venv}...", flush=True)
    shutil.copytree(source, venv, symlinks=True)
    for script in (venv / "bin").iterdir():  # console scripts name the original interpreter
        if script.is_file() and not script.is_symlink():
            text = script.read_bytes()
            if text.startswith(b"#!" + str(source).encode()):
                script.write_bytes(text.replace(str(source).encode(), str(venv).encode(), 1))
    packages = site_packages(venv)
    libraries = [
        *packages.glob("onnxruntime/capi/libonnxruntime.so*"),
        *packages.glob("onnxruntime/capi/onnxruntime_pybind11_state*.so"),
        *packages.glob("bitsandbytes/libbitsandbytes_cpu.so"),
    ]
    for library in libraries:
        if library.is_symlink():
            continue
        sites, branches = patch_library(library)
        print(f"  {library.relative_to(packages)}: {sites} xgetbv, {branches} AVX-VNNI branches patched")
        if sites == 0:
            sys.exit(f"{library}: no xgetbv found; this release checks the CPU another way, so the copy would be wrong")
    version = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('llama_cpp_python'))"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if version:
        print(f"Rebuilding llama-cpp-python {version} without AVX-512 (a few minutes)...", flush=True)
        subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-cache-dir",
                "--no-deps",
                "--force-reinstall",
                f"llama-cpp-python=={version}",
            ],
            env={**os.environ, "CMAKE_ARGS": LLAMA_CMAKE},
            check=True,
        )
    (target / "cpuinfo").write_text(HIDDEN_FLAGS.sub("", Path("/proc/cpuinfo").read_text()))
    print(f"Ready: python {__file__} run {target} -- COMMAND")


def run(target: Path, command: list[str], **kwargs) -> int:
    if os.geteuid() != 0:
        sys.exit("run needs root: it shows the command its own /proc/cpuinfo (unshare -m, mount --bind)")
    venv = target / "venv"
    env = {**os.environ, **ENV, "VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    inner = 'mount --bind "$0" /proc/cpuinfo && exec "$@"'
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", inner, str(target / "cpuinfo"), *command], env=env, check=False, **kwargs
    ).returncode


def check(target: Path, export: str) -> None:
    """The copy's logits for an export against the unpatched libraries under qemu -cpu Haswell."""
    import tempfile

    import numpy as np

    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        sys.exit("check needs qemu-x86_64 (apt-get install qemu-user)")
    worker = ROOT / "tests" / "cpu_kind_worker.py"
    with tempfile.TemporaryDirectory() as tmp:
        copy, emulated = Path(tmp, "copy.npz"), Path(tmp, "qemu.npz")
        if run(target, ["python", str(worker), export, str(copy)], stdout=subprocess.DEVNULL):
            sys.exit("the copy failed to run the export")
        subprocess.run(
            [qemu, "-cpu", "Haswell", sys.executable, str(worker), export, str(emulated)],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        a, b = dict(np.load(copy)), dict(np.load(emulated))
    same = [name for name in a if np.array_equal(a[name], b[name])]
    print(f"{len(same)}/{len(a)} logit arrays identical to qemu -cpu Haswell's")
    if len(same) != len(a):
        sys.exit("the copy does not compute what an AVX2-only CPU computes: do not use it")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("setup", help="Copy the virtual environment to DIR/venv and patch it.")
    p.add_argument("dir", type=Path)
    p.add_argument(
        "--venv", type=Path, default=ROOT / ".venv", help="The environment to copy (default: the project's .venv)."
    )
    p = sub.add_parser("check", help="Compare the copy's logits with qemu -cpu Haswell's.")
    p.add_argument("dir", type=Path)
    p.add_argument("export", help="An ONNX export folder.")
    p = sub.add_parser("run", help="Run a command with the copy, as on an AVX2-only CPU.")
    p.add_argument("dir", type=Path)
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    target = args.dir.resolve()
    if args.action == "setup":
        setup(target, args.venv.resolve())
    elif args.action == "check":
        check(target, args.export)
    else:
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        sys.exit(run(target, command or ["bash"]))


if __name__ == "__main__":
    main()
