"""The install runs on machines other than this one: an emulated AVX2-only CPU, an OS without
sched_getaffinity/preadv/pread, and a llama-cpp-python whose C interface differs."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import platform
import shutil
import subprocess
import sys

import pytest

from marco_gguf import host
from marco_gguf.bindings import GGML_BASE_SYMBOLS, TESTED, _mismatch, check, missing_symbols
from marco_gguf.convert import convert
from marco_gguf.errors import MarcoError
from marco_gguf.gguf_file import GGUFFile
from marco_gguf.runtime.isa import _CHILD, _TAIL, INSTRUCTIONS

QEMU = shutil.which("qemu-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None or platform.machine() != "x86_64",
                                reason="needs qemu-x86_64 (Debian's qemu-user) on an x86-64 host")

# load a model, evaluate a prompt, generate a token: everything the installed library does on a CPU
# marco_gguf's runtime first, as every command imports it: it chooses among the CPU kernel variants
HASWELL_SCRIPT = r"""
import json, sys
from marco_gguf.runtime import kernels
from marco_gguf.runtime.model import load_model
import llama_cpp
info = llama_cpp.llama_print_system_info().decode()
model = load_model(sys.argv[1], n_ctx=128, threads=1)
c = model.complete("Marco runs on laptops and phones in many languages.", max_tokens=2, temperature=0)
print("SYSTEM", info)
print("TOKENS", c.prompt_tokens, c.completion_tokens, c.finish_reason)
print("KERNELS", json.dumps(kernels.describe(kernels.activate())))
"""


def haswell(*argv: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([QEMU, "-cpu", "Haswell", *argv], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


@needs_qemu
def test_installed_library_runs_on_an_avx2_only_cpu(tiny_q4):
    """The README's build on a CPU without AVX-512 (qemu's Haswell): load, prompt, one generated token."""
    proc = haswell(sys.executable, "-c", HASWELL_SCRIPT, str(tiny_q4))
    assert proc.returncode == 0, f"exit {proc.returncode} under qemu -cpu Haswell: {proc.stderr[-1500:]}"
    tokens = next(line for line in proc.stdout.splitlines() if line.startswith("TOKENS")).split()
    assert int(tokens[1]) > 5 and int(tokens[2]) >= 1
    info = next(line for line in proc.stdout.splitlines() if line.startswith("SYSTEM"))
    assert "AVX2 = 1" in info and "AVX512 = 1" not in info
    chosen = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("KERNELS"))[8:])
    assert chosen["variant"] is None
    # the AVX-512 variants the README's install builds were each considered and refused by ggml's CPUID test
    # in the emulated process (a child process would run natively and say yes)
    assert len(chosen["skipped"]) == len(chosen["built"])
    assert all("CPUID" in why for why in chosen["skipped"])


@needs_qemu
def test_instruction_probe_tells_what_the_cpu_runs():
    """isa.py's child faults on AVX-512 under an AVX2-only CPU and runs AVX2: the doctor's evidence can fail."""
    def tried(name: str) -> int:
        return haswell(sys.executable, "-c", _CHILD, INSTRUCTIONS[name] + _TAIL, name, timeout=300).returncode

    assert tried("avx2") == 0
    assert tried("avx512f") < 0  # SIGILL


def test_thread_count_without_sched_getaffinity(monkeypatch):
    """macOS and Windows have no os.sched_getaffinity: the count falls back to the cores."""
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    assert host.default_threads() == (os.cpu_count() or 1)


@pytest.mark.parametrize("missing", [(), ("preadv",), ("preadv", "pread")])
def test_conversion_without_preadv_or_pread(missing, tiny_ckpt, tiny_f32, tmp_path, monkeypatch):
    """macOS has no os.preadv, Windows neither preadv nor pread: the same file comes out of each path."""
    for name in missing:
        monkeypatch.delattr(os, name, raising=False)
    out = tmp_path / "tiny.gguf"
    from marco_gguf.quantize.recipe import uniform

    convert(tiny_ckpt, out, uniform("F32"), threads=1, progress=False)
    assert out.read_bytes() == tiny_f32.read_bytes()


def test_read_into_reads_short_at_the_end(tmp_path, monkeypatch):
    monkeypatch.delattr(os, "preadv", raising=False)
    monkeypatch.delattr(os, "pread", raising=False)
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(100)))
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(30)
        assert host.read_into(fd, memoryview(buf), 80) == 20 and bytes(buf[:20]) == bytes(range(80, 100))
        assert host.read_into(fd, memoryview(buf), 10) == 30 and bytes(buf) == bytes(range(10, 40))
    finally:
        os.close(fd)


def test_bindings_check_passes_on_the_installed_library():
    check()
    assert GGUFFile  # the reader's first use went through the check


def test_a_library_without_our_symbols_is_one_clear_line():
    """A different libggml (here: the C library itself) is named as a version mismatch, not a crash."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    missing = missing_symbols(libc, GGML_BASE_SYMBOLS)
    assert missing == list(GGML_BASE_SYMBOLS)
    message = str(_mismatch(f"missing {', '.join(missing[:2])}"))
    assert "\n" not in message and all(v in message for v in TESTED) and "gguf_init_from_file" in message
    with pytest.raises(MarcoError, match="does not match what marco-gguf binds"):
        raise _mismatch("x")
