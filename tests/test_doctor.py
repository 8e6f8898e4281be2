"""`marco-gguf doctor`: the installed build as llama.cpp reports it, a crash probe in a child process, the
memory a model needs (checked against llama.cpp's own KV-cache and compute-buffer sizes), and advice."""

from __future__ import annotations

import contextlib
import json
import re
import sys

import gguf
import llama_cpp
import pytest
from typer.testing import CliRunner

from marco_gguf.cli import app
from marco_gguf.cli.machine import show_report
from marco_gguf.runtime.doctor import (
    Host,
    advise,
    best_profile,
    build_command_for,
    explain_crash,
    model_fit,
    parse_system_info,
    run_probe,
)


@contextlib.contextmanager
def llama_log():
    """Every line llama.cpp logs (all levels) while the block runs."""
    from llama_cpp._logger import llama_log_callback

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        lines.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(collect, None)
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(llama_log_callback, None)


def mib(log: list[str], pattern: str) -> float:
    (value,) = [float(m.group(1)) for line in log if (m := re.search(pattern, line))]
    return value


def test_doctor_reports_the_installed_build_and_the_model_fit(tiny_f32, tmp_path, monkeypatch, capsys, hf_tokenizer):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the probe model is made afresh
    result = CliRunner().invoke(app, ["doctor", "--model", str(tiny_f32), "--ctx", "512", "--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert r["llama_cpp"]["version"] == llama_cpp.__version__
    assert r["llama_cpp"]["system_info"] == llama_cpp.llama_print_system_info().decode().strip()
    assert "CPU" in r["llama_cpp"]["backends"] and r["llama_cpp"]["devices"][0]["type"] == "CPU"
    probe_text = "Marco runs on laptops and phones. " * 8  # the probe's prompt, tokenized by llama.cpp
    assert r["probe"]["ok"] and r["probe"]["tokens"] == len(hf_tokenizer(probe_text)["input_ids"]) == 57
    assert r["problems"] == []
    assert list(tmp_path.glob("marco-gguf/doctor-probe-*.gguf"))

    # llama.cpp's own accounting for the same file and context is the referee
    fit = r["model"]
    llama = llama_cpp_buffers(tiny_f32, 512)
    assert fit["weights"] == pytest.approx(llama["weights"], abs=2**20)
    assert fit["kv_cache"] == pytest.approx(llama["kv_cache"], abs=0.01 * 2**20)
    assert llama["compute"] <= fit["compute"] <= llama["compute"] + COMPUTE_SLACK
    assert sum(llama.values()) <= fit["need"] <= sum(llama.values()) + COMPUTE_SLACK + 2**20
    assert fit["fits_in_ram"]

    show_report(r)
    text = capsys.readouterr().out
    assert "prompt processing works" in text and f"{tiny_f32.name}" in text and "KV cache" in text


COMPUTE_SLACK = 128 * 2**20  # how far above llama.cpp's compute buffer the estimate may lie


def llama_cpp_buffers(path, n_ctx: int) -> dict[str, float]:
    """The bytes llama.cpp allocates for a model at n_ctx, by its own load log (no flash attention and a
    micro-batch of 512, as load_model runs it): mapped weights, KV cache, compute buffer."""
    with llama_log() as log:
        llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=512, n_ubatch=512, flash_attn=False, verbose=True)
        llm.close()
    patterns = {"weights": r"CPU_Mapped model buffer size =\s+([\d.]+) MiB",
                "kv_cache": r"llama_kv_cache: size =\s+([\d.]+) MiB",
                "compute": r"CPU compute buffer size =\s+([\d.]+) MiB"}
    return {k: mib(log, p) * 2**20 for k, p in patterns.items()}


@pytest.mark.parametrize("n_ctx", [256, 512, 32768])
def test_compute_buffer_estimate_is_just_above_what_llama_cpp_allocates(mini_f16, n_ctx):
    """From short contexts (a micro-batch of n_ctx tokens: smaller logits) to long ones, where the attention
    scores of 16 heads outgrow the logits (1.1 GiB against 0.3 at 32768 tokens)."""
    host = Host("Linux", "x86_64", ["avx2"], memory_total=2**40, memory_available=2**40)
    fit = model_fit(mini_f16, n_ctx, host, gpus=[])
    llama = llama_cpp_buffers(mini_f16, n_ctx)
    assert llama["compute"] <= fit["compute"] <= llama["compute"] + COMPUTE_SLACK
    assert fit["kv_cache"] == pytest.approx(llama["kv_cache"], abs=0.01 * 2**20)


def test_a_model_larger_than_memory_is_a_problem(tiny_f32):
    host = Host("Linux", "x86_64", ["avx2"], memory_total=2**30, memory_available=2**20)
    fit = model_fit(tiny_f32, 4096, host, gpus=[])
    assert fit["fits_in_ram"] is False and "gpu_free" not in fit
    experts = sum(int(t.n_bytes) for t in gguf.GGUFReader(tiny_f32).tensors if t.name.endswith("_exps.weight"))
    assert fit["experts"] == experts  # by gguf-py's reader: 3 layers x 8 experts x 3 x 96 x 256 f32
    assert experts == 3 * 8 * 3 * 96 * 256 * 4
    gpu = model_fit(tiny_f32, 4096, host, gpus=[{"memory_free": fit["need"] - experts // 2}])
    assert gpu["fits_on_gpu"] is False and gpu["gpu_need_experts_on_cpu"] == fit["need"] - experts
    assert gpu["fits_with_experts_on_cpu"] is False  # the experts need host RAM, and there is 1 MiB


def test_a_sigill_in_the_probe_is_explained_with_the_fix():
    probe = run_probe([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"])
    assert probe == {"ok": False, "returncode": -4, "signal": "SIGILL", "message": "killed by SIGILL"}
    flags = ["avx", "avx2", "fma", "f16c", "avx512f", "amx_int8", "amx_tile"]
    host = Host("Linux", "x86_64", flags)
    amx_build = parse_system_info("CPU : AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 | OPENMP = 1 |")
    assert explain_crash(probe, amx_build, host) == (
        "prompt processing dies with SIGILL: this llama.cpp was built with AMX kernels (a native build on a Xeon "
        "that advertises AMX it cannot use, common in virtual machines)")
    advice = advise(host, amx_build, ["CPU"], crashed=True)
    assert advice.profile == "cpu" and build_command_for(advice)[0] == "marco-gguf build-runtime --profile cpu"
    avx2_host = Host("Linux", "x86_64", ["avx", "avx2", "fma", "f16c"])
    assert explain_crash(probe, parse_system_info("CPU : AVX2 = 1 | AVX512 = 1 |"), avx2_host) == (
        "prompt processing dies with SIGILL: this llama.cpp uses AVX-512, which this CPU lacks")
    assert run_probe([sys.executable, "-c", "raise SystemExit('boom')"])["message"] == "exit code 1: boom"


def test_system_info_parsed_by_backend():
    """llama_print_system_info() of a CUDA build with the portable CPU flags, as llama.cpp prints it."""
    text = ("CUDA : ARCHS = 890 | USE_GRAPHS = 1 | PEER_MAX_BATCH_SIZE = 128 | CPU : SSE3 = 1 | AVX2 = 1 | FMA = 1 | "
            "AVX512 = 0 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | ")
    assert parse_system_info(text) == {
        "CUDA": {"ARCHS": "890", "USE_GRAPHS": "1", "PEER_MAX_BATCH_SIZE": "128"},
        "CPU": {"SSE3": "1", "AVX2": "1", "FMA": "1", "AVX512": "0", "LLAMAFILE": "1", "OPENMP": "1", "REPACK": "1"},
    }


@pytest.mark.parametrize("host, build, profile, defines", [
    (Host("Darwin", "arm64", []), "CPU : NEON = 1 |", "metal", []),
    (Host("Linux", "x86_64", ["avx2", "fma", "f16c", "avx512f"], nvidia=[{"name": "RTX 4070", "compute_cap": "8.9",
                                                                           "memory": 8 << 30}]),
     "CPU : AVX2 = 1 |", "cuda", ["CMAKE_CUDA_ARCHITECTURES=89", "GGML_AVX512=ON"]),
    (Host("Linux", "x86_64", ["avx2", "fma", "f16c"], vulkan=True), "CPU : AVX2 = 1 |", "vulkan", []),
    (Host("Linux", "aarch64", ["asimd", "asimddp", "i8mm"]), "CPU : NEON = 1 |", "linux-arm64",
     ["GGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16+i8mm"]),
    (Host("Linux", "x86_64", ["avx2", "fma", "f16c"]), "CPU : AVX2 = 1 | AVX512 = 1 |", "portable", []),
    # advertised but not run (isa.py's child faulted): the AVX-512 build is not advised
    (Host("Linux", "x86_64", ["avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx512vbmi"],
          runs={"avx2": True, "avx512f": False, "avx512_vnni": False, "avx512_bf16": False}),
     "CPU : AVX2 = 1 | AVX512 = 1 |", "portable", []),
    (Host("Linux", "x86_64", ["avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx512vbmi"]),
     "CPU : AVX2 = 1 | AVX512 = 1 |", "cpu-avx512", []),
])
def test_advice_names_the_build_for_the_hardware(host, build, profile, defines):
    advice = advise(host, parse_system_info(build), ["CPU"], crashed=False)
    assert (advice.profile, advice.defines) == (profile, defines)


def test_kernels_report_amx_that_does_not_run():
    from marco_gguf.runtime.doctor import kernels

    host = Host("Linux", "x86_64", ["avx2", "avx512f", "amx_int8", "amx_tile"], runs={"avx512f": True, "amx": False})
    report = kernels(parse_system_info("CPU : AVX2 = 1 | FMA = 1 | AVX512 = 0 |"), host)
    assert report["built_with"] == ["AVX2", "FMA"]
    assert report["notes"] == ["the CPU advertises AMX but AMX instructions do not run here (a virtual machine?): "
                               "a native or AMX build would die with SIGILL"]
    assert kernels({}, Host("Linux", "x86_64", ["avx2", "amx_int8"], runs={"amx": True}))["notes"] == []


def test_no_advice_when_the_build_already_fits():
    cuda = Host("Linux", "x86_64", ["avx2"], nvidia=[{"name": "H100", "compute_cap": "9.0", "memory": 80 << 30}])
    assert advise(cuda, parse_system_info("CPU : AVX2 = 1 | CUDA : ARCHS = 900 |"), ["CUDA", "CPU"], False) is None
    mac = Host("Darwin", "arm64", [])
    assert advise(mac, parse_system_info("CPU : NEON = 1 | MTL : EMBED_LIBRARY = 1 |"), ["MTL", "BLAS", "CPU"],
                  False) is None
    avx2 = Host("Linux", "x86_64", ["avx2", "fma", "f16c"])
    assert advise(avx2, parse_system_info("CPU : AVX2 = 1 | FMA = 1 |"), ["CPU"], False) is None
    assert best_profile(Host("Linux", "riscv64", [])) is None
