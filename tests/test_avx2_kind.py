"""benchmarks/avx2_kind.py patches copies of native libraries so they take their AVX2 code paths.
Checked here on a small library with the two code shapes it patches, compiled in the test: an
XCR0 read (is the AVX-512 state enabled?) and MLAS's AVX-VNNI test (cpuid leaf 7.1, EAX bit 4)."""

import ctypes
import importlib.util
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "avx2_kind.py"
SOURCE = r"""
int xcr0_low(void) {
    unsigned a, d;
    __asm__ volatile("xor %%ecx, %%ecx\n\txgetbv" : "=a"(a), "=d"(d) : : "ecx");
    return (int)a;
}
int avx_vnni(void) {
    int r;
    __asm__ volatile("push %%rbx\n\tmov $7, %%eax\n\tmov $1, %%ecx\n\tcpuid\n\ttest $0x10, %%al\n\tje 1f\n\t"
                     "mov $1, %0\n\tjmp 2f\n1:\n\tmov $0, %0\n2:\n\tpop %%rbx"
                     : "=r"(r) : : "eax", "ecx", "edx");
    return r;
}
"""

pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64" or not all(shutil.which(t) for t in ("gcc", "objdump", "readelf")),
    reason="needs an x86-64 machine with gcc and binutils",
)


def _script():
    spec = importlib.util.spec_from_file_location("avx2_kind", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_patched_library_sees_no_avx512_state_and_no_avx_vnni(tmp_path):
    source, original = tmp_path / "probe.c", tmp_path / "libprobe.so"
    source.write_text(SOURCE)
    # No red zone: the patch's push writes just below the stack pointer (ONNX Runtime's sites are
    # in functions that call others, which never keep data there).
    subprocess.run(["gcc", "-O1", "-shared", "-fPIC", "-mno-red-zone", "-o", original, source], check=True)
    patched = tmp_path / "libprobe-avx2.so"
    shutil.copy(original, patched)

    assert _script().patch_library(patched) == (1, 1)

    real, copy = ctypes.CDLL(str(original)), ctypes.CDLL(str(patched))
    assert real.xcr0_low() & 0x7 == 0x7  # every x86-64 OS with AVX enables x87, SSE and AVX state
    assert copy.xcr0_low() == 0x7  # no opmask/ZMM state (bits 5-7): AVX-512 looks disabled
    assert copy.avx_vnni() == 0


def test_hidden_flags_leave_the_avx2_kinds_flags():
    line = (
        "flags\t\t: fpu sse2 avx f16c avx2 fma bmi2 avx_vnni avx512f avx512_vnni avx512_bf16 amx_tile amx_bf16 sha_ni\n"
    )
    assert _script().HIDDEN_FLAGS.sub("", line) == "flags\t\t: fpu sse2 avx f16c avx2 fma bmi2 sha_ni\n"
