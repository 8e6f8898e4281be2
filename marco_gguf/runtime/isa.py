"""Which x86-64 instruction sets this CPU *and* OS really execute, tried in child processes.

CPUID flags (/proc/cpuinfo) say what the CPU advertises, not what runs: a virtual machine can
advertise AMX without the host enabling its register state, and an OS can leave AVX-512 state off.
A llama.cpp built for what is advertised then dies with SIGILL (BRIEF fact 2). So each instruction set
llama.cpp's faster builds use is tried once: one instruction of it, as machine code in an executable
page, in a child process whose death by SIGILL is the answer "no". No compiler is needed.

Written by hand because no library offers it: cpuid packages read the flags, which is the question's
premise, not its answer.
"""

from __future__ import annotations

import platform
import subprocess
import sys

# one instruction of each set, then vzeroupper; ret (checked with GNU as/objdump)
_TAIL = "c5f877c3"
INSTRUCTIONS = {
    "avx2": "c5fdefc0",              # vpxor ymm0, ymm0, ymm0
    "avx512f": "62f17d48efc0",       # vpxord zmm0, zmm0, zmm0
    "avx512bw": "62f17d48fcc0",      # vpaddb zmm0, zmm0, zmm0
    "avx512_vbmi": "62f27d488dc0",   # vpermb zmm0, zmm0, zmm0
    "avx512_vnni": "62f27d4850c0",   # vpdpbusd zmm0, zmm0, zmm0
    "avx512_bf16": "62f27e4852c0",   # vdpbf16ps zmm0, zmm0, zmm0
    "amx": "c4e27849c0",             # tilerelease (after asking Linux for the AMX tile state, as ggml does)
}
_CHILD = r"""
import ctypes, mmap, sys
code = bytes.fromhex(sys.argv[1])
if sys.argv[2] == "amx" and sys.platform == "linux":
    # arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): without it Linux faults the first AMX use
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(158, 0x1023, 18) != 0:
        sys.exit(3)
page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
page.write(code)
address = ctypes.addressof(ctypes.c_char.from_buffer(page))
ctypes.CFUNCTYPE(None)(address)()
print("ok")
"""


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def runs(name: str, timeout: float = 30) -> bool | None:
    """True if the instruction set executes here, False if it faults, None if the test could not run."""
    if not is_x86() or name not in INSTRUCTIONS:
        return None
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD, INSTRUCTIONS[name] + _TAIL, name],
                              capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode == 0 and proc.stdout.strip() == "ok":
        return True
    if proc.returncode < 0 or proc.returncode == 3:  # killed by a signal (SIGILL), or AMX permission refused
        return False
    return None  # no executable memory here (a hardened system): unknown


def usable(names: tuple[str, ...] = tuple(INSTRUCTIONS)) -> dict[str, bool | None]:
    """{instruction set: runs here?} for the sets llama.cpp's x86 builds choose between."""
    return {name: runs(name) for name in names}
