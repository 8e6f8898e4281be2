"""CPU kernel variants (runtime/kernels.py): a process loads the best variant this CPU runs, and nothing else.

The README's install builds the variants (`marco-gguf build-kernels`); the emulated AVX2-only CPU's side
(every variant refused there) is in test_portable.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from marco_gguf.runtime import isa, kernels

pytestmark = pytest.mark.skipif(not kernels.supported(), reason="CPU kernel variants are for x86-64 Linux")

# /proc/cpuinfo flags each ggml option needs (ggml's GGML_AVX512 compiles for F, CD, VL, DQ and BW)
CPUINFO = {"AVX512": {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"}, "AVX512_VBMI": {"avx512vbmi"},
           "AVX512_VNNI": {"avx512_vnni"}, "AVX512_BF16": {"avx512_bf16"}}

CHILD = r"""
import json, sys
from marco_gguf.runtime import kernels
import llama_cpp
a = kernels.activate()
out = {"variant": a.variant, "reason": a.reason, "skipped": a.skipped,
       "features": llama_cpp.llama_print_system_info().decode(),
       "mapped": sorted({l.split()[-1] for l in open("/proc/self/maps") if "libggml-cpu" in l})}
if len(sys.argv) > 1:
    import numpy as np
    from llama_cpp import Llama
    llm = Llama(sys.argv[1], n_ctx=256, n_threads=1, logits_all=True, verbose=False)
    ids = llm.tokenize("Marco runs on laptops and phones, in many languages: hola, bonjour, 你好.".encode())
    llm.eval(ids)
    np.save(sys.argv[2], np.array(llm.scores[: len(ids)], dtype=np.float32))
print(json.dumps(out))
"""
TOO_LATE = CHILD.replace("from marco_gguf.runtime import kernels\nimport llama_cpp\n",
                         "import llama_cpp\nfrom marco_gguf.runtime import kernels\n")


def child(*argv: str, code: str = CHILD, **env: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def built() -> list[str]:
    names = kernels.built()
    if not names:
        pytest.skip("no CPU kernel variants built for the installed llama.cpp (the README's install runs "
                    "`marco-gguf build-kernels`)")
    return names


def cpuinfo_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def expected_variant(built: list[str]) -> str | None:
    """The first built variant (best first) whose features /proc/cpuinfo lists and whose instructions run."""
    flags = cpuinfo_flags()
    for v in kernels.VARIANTS:
        if v.name in built and all(CPUINFO[o] <= flags for o in v.options) and all(
                isa.runs(i) for i in v.instructions):
            return v.name
    return None


def installed_cpu_library() -> str:
    from marco_gguf.ggml_library import library_dir

    return str((library_dir() / kernels.LIBRARY).resolve())


def test_the_best_variant_this_cpu_runs_is_loaded(built):
    got = child()
    want = expected_variant(built)
    assert got["variant"] == want, got["reason"]
    if want is None:
        assert got["mapped"] == [installed_cpu_library()] and "AVX512 = 1" not in got["features"]
        return
    # ggml itself reports the variant's kernels, and only the variant's library is mapped in the process
    assert got["mapped"] == [str(kernels.kernels_dir(kernels.installed_key()) / want / kernels.LIBRARY)]
    for option in kernels.BY_NAME[want].options:
        assert f"{option} = 1" in got["features"]
    assert "LLAMAFILE = 1" in got["features"] and "REPACK = 1" in got["features"]  # as the installed build


@pytest.mark.parametrize(("env", "why"), [({kernels.ENV: "portable"}, "portable"),
                                          ({kernels.ENV: "sapphirerapids"}, "not a variant")])
def test_the_installed_kernels_when_asked(built, env, why):
    got = child(**env)
    assert got["variant"] is None and why in got["reason"]
    assert got["mapped"] == [installed_cpu_library()] and "AVX512 = 1" not in got["features"]


def test_llama_cpp_loaded_first_keeps_its_kernels(built):
    got = child(code=TOO_LATE)
    assert got["variant"] is None and "loaded before" in got["reason"]
    assert got["mapped"] == [installed_cpu_library()]


def test_variants_of_another_library_are_not_loaded(built, tmp_path):
    """Variants live under a key of the installed library: another cache (or a reinstalled library) has none."""
    got = child(XDG_CACHE_HOME=str(tmp_path))
    assert got["variant"] is None and "build-kernels" in got["reason"]
    assert got["mapped"] == [installed_cpu_library()]


def test_variant_logits_match_the_portable_kernels(built, tiny_q4, tmp_path):
    """Same model, same prompt: the AVX-512 kernels give the portable kernels' next tokens (up to near ties)."""
    if expected_variant(built) is None:
        pytest.skip("this CPU runs none of the variants")
    fast, slow = tmp_path / "variant.npy", tmp_path / "portable.npy"
    assert child(str(tiny_q4), str(fast))["variant"] is not None
    assert child(str(tiny_q4), str(slow), **{kernels.ENV: "portable"})["variant"] is None
    a, b = np.load(fast), np.load(slow)
    assert a.shape == b.shape and a.shape[0] > 10
    diff = np.abs(a - b).max(axis=1)
    assert diff.max() < 0.05 * np.abs(b).max()  # quantized dot products in another order, not other numbers
    top2 = np.sort(b, axis=1)[:, -2:]
    near_tie = top2[:, 1] - top2[:, 0] <= 2 * diff
    agree = a.argmax(axis=1) == b.argmax(axis=1)
    assert np.all(agree | near_tie), f"positions {np.where(~(agree | near_tie))[0]} pick other tokens"


def test_build_kernels_refuses_an_unknown_variant():
    proc = subprocess.run([sys.executable, "-m", "marco_gguf", "build-kernels", "--variant", "pentium"],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "unknown variant 'pentium'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_doctor_measures_what_the_variant_gains_on_this_cpu(built, tiny_q4):
    """`doctor --model FILE --measure` times the model with the kernels in use and with the portable ones."""
    def doctor(**env: str) -> dict:
        proc = subprocess.run([sys.executable, "-m", "marco_gguf", "doctor", "--model", str(tiny_q4), "--measure",
                               "--json"], capture_output=True, text=True, timeout=600, env={**os.environ, **env})
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout)["measured"]

    want = expected_variant(built)
    got = doctor()
    if want is None:
        assert "no CPU kernel variant is in use" in got["note"]
        return
    assert got["variant"] == want and got["model"] == str(tiny_q4)
    for side in ("kernels", "portable"):
        assert got[side]["tg"] > 0 and got[side]["pp"] > 0
    assert got["gain_tg"] == pytest.approx(got["kernels"]["tg"] / got["portable"]["tg"])
    assert "nothing to compare" in doctor(**{kernels.ENV: "portable"})["note"]


def test_doctor_advises_building_the_kernels_only_where_they_are_missing(built, tmp_path):
    """On a CPU that runs a variant: without variants doctor's advice is `build-kernels` (not a 10-minute
    rebuild of llama-cpp-python); with them in use there is no CPU advice."""
    if expected_variant(built) is None:
        pytest.skip("this CPU runs none of the variants")

    def advice(**env: str) -> dict | None:
        proc = subprocess.run([sys.executable, "-m", "marco_gguf", "doctor", "--json"], capture_output=True,
                              text=True, timeout=600, env={**os.environ, **env})
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout)["advice"]

    missing = advice(XDG_CACHE_HOME=str(tmp_path))
    assert missing is not None and missing["command"] == "marco-gguf build-kernels"
    assert advice() is None
