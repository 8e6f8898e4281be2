"""OpenMP's waiting (runtime/openmp.py): set before libgomp loads, as libgomp itself reports, unless the user
set it. (What it buys, two decoding threads without libgomp's throttle, is bench/openmp_teams.py's.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from marco_gguf.runtime import openmp

pytestmark = pytest.mark.skipif(sys.platform != "linux" or not openmp.uses_libgomp(),
                                reason="the installed llama.cpp does not use GNU libgomp")


def libgomp_settings(code: str, **env: str) -> dict[str, str]:
    """What libgomp read at its start (OMP_DISPLAY_ENV), in a child process running `code`."""
    clean = {k: v for k, v in os.environ.items() if k not in openmp.SETTINGS}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**clean, "OMP_DISPLAY_ENV": "VERBOSE", **env})
    assert proc.returncode == 0, proc.stderr[-1500:]
    got = {}
    for line in proc.stderr.splitlines():
        name, sep, value = line.strip().partition(" = ")
        if sep and name in openmp.SETTINGS:
            got[name] = value.strip("'")
    return got


def test_libgomp_starts_with_the_settings():
    assert libgomp_settings("import marco_gguf.runtime, llama_cpp") == openmp.SETTINGS


def test_a_users_setting_wins():
    got = libgomp_settings("import marco_gguf.runtime, llama_cpp", OMP_WAIT_POLICY="PASSIVE")
    assert got["OMP_WAIT_POLICY"] == "PASSIVE"


def test_llama_cpp_loaded_first_keeps_libgomps_defaults():
    assert libgomp_settings("import llama_cpp, marco_gguf.runtime")["OMP_WAIT_POLICY"] == "PASSIVE"
