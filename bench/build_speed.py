#!/usr/bin/env python3
"""Decode and prompt speed of the installed llama.cpp build against other builds of the same source.

Answers two questions with one method: does the README's install (portable AVX2 library plus the CPU
kernel variants `marco-gguf build-kernels` compiles and each process picks, runtime/kernels.py) decode as
fast as the AVX-512 build the README installed before (goal: within 3 %), and what do the portable kernels
alone and the opt-in profile (`cpu-avx512`: VNNI/BF16/VBMI) give on this CPU.
The installed library runs twice: `installed` with the variant this CPU takes (MARCO_GGUF_CPU_KERNELS=auto)
and `portable` without it (=portable); the other builds always run with their own kernels (=portable).

1. builds libllama + ggml from .cache/llama.cpp (scripts/fetch_llama_cpp.py) with each named
   profile (cmake -C cmake/PROFILE.cmake, shared libraries, niced, -j2; cached in bench/out);
2. lays each build into a copy of the installed llama_cpp package (bench/out/pkg-PROFILE), so the
   same llama-cpp-python and marco-gguf code load it (PYTHONPATH + LD_LIBRARY_PATH);
3. runs `marco-gguf bench FILE --json` (the Python API and llama.cpp's own decode loop) for every
   build in turn, --rounds times, interleaved so that a noisy neighbour hits all builds alike;
4. prints the medians and each build's ratio to the installed one.

    python bench/build_speed.py bench/out/marco-nano-L4-Q4_K_M.gguf --profiles cpu cpu-avx512 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from common import LLAMA_CPP, OUT, REPO, marco_bench

from marco_gguf.runtime import kernels  # before llama_cpp anywhere: it chooses the CPU kernels

LIBS = ("libllama", "libggml", "libggml-base", "libggml-cpu", "libggml-rpc")


def build(profile: str) -> Path:
    """libllama and ggml built with cmake/PROFILE.cmake; returns the folder holding the shared libraries."""
    folder = OUT / f"llama.cpp-lib-{profile}"
    if not (folder / "bin" / "libllama.so").is_file():
        subprocess.run(["cmake", "-C", str(REPO / "cmake" / f"{profile}.cmake"), "-S", str(LLAMA_CPP), "-B",
                        str(folder), "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                        "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_OPENSSL=OFF", "-DGGML_CCACHE=OFF"],
                       check=True, capture_output=True)
        subprocess.run(["nice", "-n", "5", "cmake", "--build", str(folder), "--target", "llama", "ggml-rpc", "-j2"],
                       check=True)
    return folder / "bin"


def package(profile: str, libs: Path) -> Path:
    """A copy of the installed llama_cpp package whose lib/ holds this build's libraries."""
    import llama_cpp

    root = OUT / f"pkg-{profile}"
    target = root / "llama_cpp"
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(Path(llama_cpp.__file__).parent, target)
    for name in LIBS:
        for f in libs.glob(f"{name}.so*"):
            dest = target / "lib" / f.name
            dest.unlink(missing_ok=True)
            shutil.copy2(f, dest, follow_symlinks=False)
    return root


def run_bench(model: Path, root: Path | None, args, kernels: str = "portable") -> dict:
    env = dict(os.environ, MARCO_GGUF_CPU_KERNELS=kernels)
    if root is not None:
        env["PYTHONPATH"] = str(root)
        env["LD_LIBRARY_PATH"] = str(root / "llama_cpp" / "lib")
    return marco_bench(model, args.threads, args.prompt, args.gen, args.repetitions, env=env)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--profiles", nargs="+", default=["cpu", "cpu-avx512"],
                    help="builds to compare with the installed one")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--repetitions", type=int, default=3)
    args = ap.parse_args()
    import llama_cpp  # after marco_gguf.runtime (imported above), which chose this process's CPU kernels

    builds: dict[str, Path | None] = {"installed": None, "portable": None}
    for profile in args.profiles:
        builds[profile] = package(profile, build(profile))
    results: dict[str, list[dict]] = {name: [] for name in builds}
    for r in range(args.rounds):
        for name, root in builds.items():
            res = run_bench(args.model, root, args, "auto" if name == "installed" else "portable")
            results[name].append(res)
            print(f"round {r + 1} {name}: tg {res['llama_cpp']['tg']:.2f} (API {res['api']['tg']:.2f}), "
                  f"pp {res['llama_cpp']['pp']:.1f} (API {res['api']['pp']:.1f})", file=sys.stderr, flush=True)

    def median(name: str, side: str, test: str) -> float:
        return statistics.median(res[side][test] for res in results[name])

    info = llama_cpp.llama_print_system_info().decode().strip()
    print(f"{args.model.name}, {args.threads} thread(s), {args.rounds} interleaved rounds of "
          f"{args.repetitions} repetitions; installed: {info}; {kernels.activate().reason}")
    # tokens per CPU second as well: with one thread it is the speed the build's kernels have, and it moves far
    # less than wall-clock rates when other processes share the two cores
    print("| build | llama.cpp tg | API tg | tg ratio | tg per CPU s | ratio | llama.cpp pp | pp ratio | "
          "pp per CPU s | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = {k: median("installed", "llama_cpp", k) for k in ("tg", "pp", "tg_cpu", "pp_cpu")}
    for name in builds:
        m = {k: median(name, "llama_cpp", k) for k in base}
        print(f"| {name} | {m['tg']:.2f} | {median(name, 'api', 'tg'):.2f} | {m['tg'] / base['tg']:.3f} | "
              f"{m['tg_cpu']:.2f} | {m['tg_cpu'] / base['tg_cpu']:.3f} | {m['pp']:.1f} | {m['pp'] / base['pp']:.3f} | "
              f"{m['pp_cpu']:.1f} | {m['pp_cpu'] / base['pp_cpu']:.3f} |")
    print("all runs (llama.cpp tg): " + "; ".join(
        f"{name} " + ", ".join(f"{res['llama_cpp']['tg']:.2f}" for res in results[name]) for name in builds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
