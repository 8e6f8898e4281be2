"""`marco-gguf doctor`: is the installed llama.cpp right for this machine, does it run, does the model fit."""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from marco_gguf.errors import MarcoError
from marco_gguf.memory import Footprint
from marco_gguf.runtime.build import build_command, parse_system_info
from marco_gguf.runtime.isa import is_x86, usable
from marco_gguf.runtime.kernels import activate as activate_kernels
from marco_gguf.runtime.kernels import describe as describe_kernels
from marco_gguf.runtime.kernels import supported as kernels_supported
from marco_gguf.runtime.placement import backends, devices

CPU_PROFILE_LEVELS = ("cpu-avx2", "cpu", "cpu-avx512")
# /proc/cpuinfo flag -> the instruction set isa.py tries
ISA_NAMES = {"amx_int8": "amx", "amx_tile": "amx"}
# what a rebuild gained where it was measured (BENCHMARKS.md, "Build profiles"): shown with the advice
MEASURED_GAIN = {
    "build-kernels": "measured against the portable kernels on a 2-core AMD EPYC (Zen 4), 4-layer "
                     "Marco-Nano-shaped Q4_K_M, 1 thread: generation +7 %, prompt processing +15 % "
                     "(BENCHMARKS.md, 'Build profiles')",
    "cpu-avx512": "measured against the portable build on a 2-core AMD EPYC (Zen 4), 4-layer Marco-Nano-shaped "
                  "Q4_K_M, 1 thread, quiet machine: prompt processing +15 %, generation +17 % "
                  "(BENCHMARKS.md, 'Build profiles')",
}
PROBE_CODE = """
import json, sys, time
import marco_gguf.runtime  # the CPU kernels every command uses (kernels.py), so the probe runs those
from llama_cpp import Llama
llm = Llama(sys.argv[1], n_ctx=256, n_batch=64, verbose=False)
ids = llm.tokenize(("Marco runs on laptops and phones. " * 8).encode(), add_bos=False)
t0 = time.perf_counter()
llm.eval(ids)
llm.eval([ids[0]])
print(json.dumps({"tokens": len(ids), "seconds": time.perf_counter() - t0}))
"""
PROBE_CONFIG = {"num_hidden_layers": 1, "num_experts": 4, "num_experts_per_tok": 2}


@dataclass
class Host:
    """What this machine offers a llama.cpp build."""

    system: str
    machine: str
    cpu_flags: list[str]
    nvidia: list[dict] = field(default_factory=list)
    vulkan: bool = False
    memory_total: int | None = None
    memory_available: int | None = None
    runs: dict[str, bool | None] = field(default_factory=dict)  # instruction sets tried in a child (isa.py)

    @classmethod
    def detect(cls) -> Host:
        total, available = memory()
        return cls(platform.system(), platform.machine().lower(), cpu_flags(), nvidia_gpus(), vulkan_present(),
                   total, available, usable() if is_x86() else {})

    def has(self, flag: str) -> bool:
        """The CPU runs this instruction set: tried where isa.py can, else as advertised (/proc/cpuinfo)."""
        tried = self.runs.get(ISA_NAMES.get(flag, flag))
        return tried if tried is not None else flag in self.cpu_flags


# the instruction-set flags that decide a llama.cpp build (x86 /proc/cpuinfo flags, ARM Features)
BUILD_FLAGS = {"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni", "avx512f", "avx512vbmi", "avx512_vnni",
               "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimdhp", "asimddp", "i8mm", "sve", "sve2",
               "sme"}


def cpu_flags() -> list[str]:
    """The CPU's instruction-set flags that matter to llama.cpp (Linux: /proc/cpuinfo; elsewhere empty)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return sorted(set(value.split()) & BUILD_FLAGS)
    return []


def memory() -> tuple[int | None, int | None]:
    """(total, available) bytes of RAM; available from /proc/meminfo where there is one."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return int(info["MemTotal"].split()[0]) * 1024, int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), None
    except (ValueError, OSError, AttributeError):
        return None, None


def nvidia_gpus() -> list[dict]:
    """NVIDIA GPUs by nvidia-smi: name, compute capability ('8.9') and memory in bytes."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=name,compute_cap,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and parts[2].isdigit():
            gpus.append({"name": parts[0], "compute_cap": parts[1], "memory": int(parts[2]) * 2**20})
    return gpus


def vulkan_present() -> bool:
    """A Vulkan loader and driver tool on this machine (vulkaninfo, or the loader library)."""
    import ctypes.util

    return shutil.which("vulkaninfo") is not None or ctypes.util.find_library("vulkan") is not None


@dataclass
class Advice:
    profile: str
    defines: list[str]
    reason: str


def best_profile(host: Host) -> Advice | None:
    """The build profile that uses this machine best: its GPU if it has one, else its widest CPU kernels."""
    flags = set(host.cpu_flags)
    x86 = host.machine in ("x86_64", "amd64")
    avx512 = ["GGML_AVX512=ON"] if x86 and host.has("avx512f") else []
    if host.system == "Darwin" and host.machine == "arm64":
        return Advice("metal", [], "Apple silicon: Metal GPU with unified memory")
    if host.nvidia:
        gpu = host.nvidia[0]
        arch = gpu["compute_cap"].replace(".", "")
        return Advice("cuda", [f"CMAKE_CUDA_ARCHITECTURES={arch}", *avx512],
                      f"NVIDIA {gpu['name']} (compute capability {gpu['compute_cap']})")
    if host.vulkan:
        return Advice("vulkan", avx512, "a Vulkan driver is installed")
    if host.machine in ("aarch64", "arm64"):
        if "asimddp" not in flags:
            return Advice("linux-arm64", ["GGML_CPU_ARM_ARCH=armv8-a"], "64-bit ARM without the dot product")
        if "i8mm" in flags:
            return Advice("linux-arm64", ["GGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16+i8mm"],
                          "64-bit ARM with dot product and int8 matrix multiply")
        return Advice("linux-arm64", [], "64-bit ARM with the dot product")
    if not x86:
        return None
    if all(host.has(f) for f in ("avx512f", "avx512_vnni", "avx512_bf16")) and "avx512vbmi" in flags:
        return Advice("cpu-avx512", [], "x86-64 that runs AVX-512 VNNI/BF16/VBMI (AMX left out)")
    if host.has("avx512f"):
        return Advice("cpu", [], "x86-64 that runs AVX-512")
    if host.has("avx2") and {"fma", "f16c"} <= flags:
        return Advice("cpu-avx2", [], "x86-64 with AVX2 (no AVX-512)")
    return None


def cpu_build_level(cpu: dict[str, str]) -> int:
    """Index into CPU_PROFILE_LEVELS of what the installed CPU kernels were built with (-1: older)."""
    if all(cpu.get(k) == "1" for k in ("AVX512_VNNI", "AVX512_BF16", "AVX512_VBMI")):
        return 2
    if cpu.get("AVX512") == "1":
        return 1
    return 0 if cpu.get("AVX2") == "1" else -1


def advise(host: Host, info: dict[str, dict[str, str]], registered: list[str], crashed: bool) -> Advice | None:
    """A better build for this machine, or None when the installed one already fits."""
    best = best_profile(host)
    if best is None:
        return None
    cpu = info.get("CPU", {})
    if crashed:
        return best
    flags = set(host.cpu_flags)
    if cpu.get("AVX512") == "1" and host.cpu_flags and not host.has("avx512f"):
        return Advice("portable", [], "the installed build uses AVX-512, which this CPU does not run")
    gpu = {"metal": "MTL", "cuda": "CUDA", "vulkan": "Vulkan"}.get(best.profile)  # ggml's backend names
    if gpu:
        return None if gpu in registered else best
    if best.profile in CPU_PROFILE_LEVELS:
        return best if cpu_build_level(cpu) < CPU_PROFILE_LEVELS.index(best.profile) else None
    return None if cpu.get("DOTPROD") == "1" or "asimddp" not in flags else best


def probe_model() -> Path:
    """A tiny Q4_K_M Marco GGUF for the probe, made once and kept in the user's cache folder."""
    from marco_gguf import __version__
    from marco_gguf.convert import convert
    from marco_gguf.quantize.recipe import preset
    from marco_gguf.tiny_checkpoint import TINY_CONFIG, write_tiny_checkpoint

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "marco-gguf"
    path = cache / f"doctor-probe-{__version__}.gguf"
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="marco-doctor-") as tmp:
            ckpt = write_tiny_checkpoint(Path(tmp) / "probe", {**TINY_CONFIG, **PROBE_CONFIG})
            convert(ckpt, path, preset("Q4_K_M"), force=True, progress=False)
    return path


def run_probe(argv: list[str], timeout: float = 300) -> dict:
    """Run a probe command in a child process; report how it ended (a crash there cannot take us down)."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "returncode": None, "signal": None, "message": f"no answer within {timeout:.0f} s"}
    result: dict = {"ok": proc.returncode == 0, "returncode": proc.returncode, "signal": None}
    if proc.returncode < 0:
        result["signal"] = signal.Signals(-proc.returncode).name
        result["message"] = f"killed by {result['signal']}"
    elif proc.returncode > 0:
        tail = proc.stderr.strip().splitlines()
        result["message"] = f"exit code {proc.returncode}: {tail[-1] if tail else 'no message'}"
    else:
        result.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return result


def measure_kernels(model: Path, threads: int | None = None, n_prompt: int = 128, n_gen: int = 32,
                    repetitions: int = 3) -> dict:
    """`bench` on the user's model in two child processes, the CPU kernels in use against the portable ones
    (MARCO_GGUF_CPU_KERNELS=portable): what the variant gains on this CPU, measured instead of quoted."""
    from marco_gguf.runtime.kernels import ENV

    in_use = activate_kernels()
    if in_use.variant is None:
        return {"note": f"no CPU kernel variant is in use ({in_use.reason}); nothing to compare"}
    speeds = {}
    for name, choice in (("kernels", in_use.variant), ("portable", "portable")):
        cmd = [sys.executable, "-m", "marco_gguf", "bench", str(model), "-p", str(n_prompt), "-n", str(n_gen),
               "-r", str(repetitions), "--json", *([] if threads is None else ["-t", str(threads)])]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, ENV: choice})
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()
            raise MarcoError(f"bench with the {choice} kernels failed: {tail[-1] if tail else proc.returncode}")
        result = json.loads(proc.stdout)
        speeds[name] = {"tg": result["llama_cpp"]["tg"], "pp": result["llama_cpp"]["pp"],
                        "threads": result["settings"]["threads"]}
    return {"model": str(model), "variant": in_use.variant, "threads": speeds["kernels"]["threads"], **speeds,
            "gain_tg": speeds["kernels"]["tg"] / speeds["portable"]["tg"],
            "gain_pp": speeds["kernels"]["pp"] / speeds["portable"]["pp"]}


def probe_prompt() -> dict:
    """Evaluate a multi-token prompt on the tiny probe model in a child process."""
    return run_probe([sys.executable, "-c", PROBE_CODE, str(probe_model())])


def explain_crash(probe: dict, info: dict[str, dict[str, str]], host: Host) -> str:
    """Why prompt processing died, in the user's terms."""
    cpu = info.get("CPU", {})
    if probe.get("signal") == "SIGILL":
        if cpu.get("AMX_INT8") == "1":
            return ("prompt processing dies with SIGILL: this llama.cpp was built with AMX kernels (a native "
                    "build on a Xeon that advertises AMX it cannot use, common in virtual machines)")
        if cpu.get("AVX512") == "1" and not host.has("avx512f"):
            return "prompt processing dies with SIGILL: this llama.cpp uses AVX-512, which this CPU lacks"
        return "prompt processing dies with SIGILL: this llama.cpp uses instructions this CPU lacks"
    return f"prompt processing failed ({probe.get('message')})"


def model_fit(path: Path, n_ctx: int, host: Host, gpus: list[dict]) -> dict:
    """Memory the model needs at n_ctx (weights + f16 KV cache + compute buffers) against what there is."""
    fp = Footprint.of(path)
    kv = fp.kv_bytes(n_ctx)
    compute = fp.compute_bytes(n_ctx)
    need = fp.weight_bytes + kv + compute
    fit = {"model": str(path), "n_ctx": n_ctx, "weights": fp.weight_bytes, "experts": fp.expert_bytes,
           "kv_cache": kv, "compute": compute, "need": need, "ram_available": host.memory_available,
           "ram_total": host.memory_total}
    ram = host.memory_available or host.memory_total
    fit["fits_in_ram"] = None if ram is None else need <= ram
    if gpus:
        gpu_free = max(d["memory_free"] for d in gpus)
        dense = fp.gpu_bytes_with_experts_on_cpu() + kv + compute
        fit.update(gpu_free=gpu_free, fits_on_gpu=need <= gpu_free, gpu_need_experts_on_cpu=dense,
                   fits_with_experts_on_cpu=dense <= gpu_free and fp.expert_bytes <= (ram or 0))
    return fit


def diagnose(model: Path | None = None, n_ctx: int = 4096) -> dict:
    """Everything `marco-gguf doctor` reports, as plain data; 'problems' lists what needs fixing."""
    import llama_cpp

    host = Host.detect()
    system_info = llama_cpp.llama_print_system_info().decode().strip()
    info = parse_system_info(system_info)
    registered = backends()
    devs = [asdict(d) for d in devices()]
    gpus = [d for d in devs if d["type"] in ("GPU", "iGPU")]
    probe = probe_prompt()
    problems = [] if probe["ok"] else [explain_crash(probe, info, host)]
    report = {
        "llama_cpp": {"version": llama_cpp.__version__, "system_info": system_info, "features": info,
                      "backends": registered, "devices": devs,
                      # llama_supports_gpu_offload() is true for any build with the RPC backend, GPU or not
                      "gpu_offload": bool(gpus)},
        "host": asdict(host),
        "probe": probe,
        "kernels": kernels(info, host),
    }
    if model is not None:
        fit = model_fit(Path(model), n_ctx, host, gpus)
        report["model"] = fit
        if fit["fits_in_ram"] is False and not fit.get("fits_on_gpu"):
            problems.append(f"{Path(model).name} at context {n_ctx} needs {fit['need']:,} bytes; "
                            f"{fit['ram_available']:,} bytes of RAM are free")
    advice = advise(host, info, registered, crashed=not probe["ok"])
    report["advice"] = None
    if advice and advice.profile in ("cpu", "cpu-avx512") and probe["ok"] and kernels_supported():
        # the same kernels without rebuilding llama-cpp-python, and the install stays portable
        in_use = report["kernels"]["in_use"]
        command = "marco-gguf build-kernels"
        if in_use["built"]:  # built, but not loaded in this process: say why instead of building again
            command = f"built but not in use: {in_use['reason']}"
        report["advice"] = {"profile": "build-kernels", "defines": [], "reason": advice.reason,
                            "command": command, "pip": None,
                            "measured_gain": MEASURED_GAIN["build-kernels"]}
    elif advice:
        command = build_command_for(advice)
        report["advice"] = {**asdict(advice), "command": command[0], "pip": command[1],
                            "measured_gain": MEASURED_GAIN.get(advice.profile)}
    report["problems"] = problems
    return report


def kernels(info: dict[str, dict[str, str]], host: Host) -> dict:
    """The CPU kernels the installed llama.cpp was built with, and what this CPU advertises and runs."""
    built = sorted(k for k, v in info.get("CPU", {}).items() if v == "1")
    notes = []
    if any(f in host.cpu_flags for f in ("amx_tile", "amx_int8")) and host.runs.get("amx") is False:
        notes.append("the CPU advertises AMX but AMX instructions do not run here (a virtual machine?): "
                     "a native or AMX build would die with SIGILL")
    if "avx512f" in host.cpu_flags and host.runs.get("avx512f") is False:
        notes.append("the CPU advertises AVX-512 but the OS does not run it")
    return {"built_with": built, "advertised": host.cpu_flags, "runs_here": host.runs, "notes": notes,
            "in_use": describe_kernels(activate_kernels())}


def build_command_for(advice: Advice) -> tuple[str, str]:
    """(`marco-gguf build-runtime ...`, the equivalent CMAKE_ARGS=... pip command)."""
    marco = " ".join(["marco-gguf build-runtime --profile", advice.profile, *(f"-D {d}" for d in advice.defines)])
    try:
        pip = build_command(advice.profile, advice.defines, python="python").shell()
    except MarcoError as exc:  # a cross profile: its own instructions
        pip = str(exc)
    return marco, pip
