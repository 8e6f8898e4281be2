#!/usr/bin/env bash
# The GPU check: llama-cpp-python built with cmake/cuda.cmake for one GPU architecture, a reduced-depth
# Marco-Nano-shaped Q4_K_M file, and `marco-gguf bench` with every layer on the GPU and with the experts
# kept in host memory (--experts-on-cpu). Results go to $OUT.
#
# 1. Here (with network), once: fetch what the GPU machine lacks into bench/out/gpu_carry (~10 MB):
#      bash bench/gpu_check.sh prepare
#    (the llama-cpp-python sdist of the installed version, slimmed of its git pack, model vocabularies,
#    docs and web-UI tests; wheels for Python 3.12 of gguf, diskcache and the sdist's build backend).
# 2. On the GPU machine (CUDA toolkit, python3 with numpy/typer/rich/cmake/ninja; no network):
#      device run: command "bash bench/gpu_check.sh", carry ["bench/out/gpu_carry"], timeout_s 600
#    Budget: ~4-5 min for the CUDA build (sm_90 only, flash-attention kernels left out: load_model's
#    default is flash_attn=False), ~1-2 min to write and convert the file, ~1 min of benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=bench/out/gpu_carry
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}

if [ "${1:-}" = "prepare" ]; then
  rm -rf "$CARRY" && mkdir -p "$CARRY/sdist"
  python -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d "$CARRY" gguf diskcache "scikit-build-core>=0.9.2" pathspec packaging
  python -m pip download -q --no-binary=:all: --no-deps -d "$CARRY/sdist" "llama-cpp-python==$VERSION"
  tar -xzf "$CARRY/sdist/llama_cpp_python-$VERSION.tar.gz" -C "$CARRY/sdist"
  src=$CARRY/sdist/llama_cpp_python-$VERSION
  rm -rf "$src/.git" "$src/vendor/llama.cpp/.git" "$src"/vendor/llama.cpp/{models,docs,benches,media,tests} \
    "$src/vendor/llama.cpp/tools/ui/tests" "$src"/vendor/llama.cpp/tools/mtmd/test-*
  tar -czf "$CARRY/llama_cpp_python-$VERSION.tar.gz" -C "$CARRY/sdist" "llama_cpp_python-$VERSION"
  rm -rf "$CARRY/sdist"
  du -sh "$CARRY" && ls "$CARRY"
  exit 0
fi

OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
[ -d /usr/local/cuda/bin ] && export PATH=/usr/local/cuda/bin:$PATH
# The image's `cmake` and `ninja` are pip shims that pip's isolated build environment cannot import
# (seen on the H200, 2026-11-26): put the binaries inside those packages on PATH instead.
export PATH=$(python3 -c "import cmake; print(cmake.CMAKE_BIN_DIR)"):$(python3 -c "import ninja; print(ninja.BIN_DIR)"):$PATH
nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
ARCH=${CUDA_ARCH:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '.')}
export PIP_NO_INDEX=1 PIP_FIND_LINKS=$PWD/$CARRY CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
python3 -m pip install -q gguf diskcache
python3 -m pip install -q --no-deps --no-build-isolation -e .
M="python3 -X faulthandler -m marco_gguf"  # a crash prints the Python stack it happened under

echo "== build llama-cpp-python $VERSION with cmake/cuda.cmake for sm_$ARCH"
start=$(date +%s)
# what `marco-gguf build-runtime --profile cuda --cuda-arch $ARCH -D ...` runs (the CLI itself needs an
# importable llama_cpp, which is what is being built here)
timeout 420 python3 - "$ARCH" > "$OUT/build.log" 2>&1 <<'PY' || { tail -40 "$OUT/build.log"; exit 1; }
import sys
from marco_gguf.runtime.build import build_command, run_build
cmd = build_command("cuda", [f"CMAKE_CUDA_ARCHITECTURES={sys.argv[1]}", "GGML_CUDA_FA=OFF", "LLAVA_BUILD=OFF"])
print(cmd.shell(), flush=True)
sys.exit(run_build(cmd))
PY
echo "built in $(( $(date +%s) - start )) s: $(head -1 "$OUT/build.log")"
python3 -c "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
$M doctor --json > "$OUT/doctor.json" || true

echo "== reduced-depth Marco-Nano-shaped Q4_K_M file"
start=$(date +%s)
MODEL=/tmp/marco-nano-L${LAYERS:-4}-Q4_K_M.gguf
python3 - "$MODEL" "${LAYERS:-4}" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "bench")
from common import nano_checkpoint
from marco_gguf.convert import convert
from marco_gguf.quantize.recipe import preset
convert(nano_checkpoint(int(sys.argv[2])), Path(sys.argv[1]), preset("Q4_K_M"), progress=False)
PY
echo "written in $(( $(date +%s) - start )) s: $(du -h "$MODEL" | cut -f1)"

echo "== bench: all layers on the GPU, then experts in host memory"
T=$(nproc)
$M bench "$MODEL" -ngl -1 -t "$T" -r 3 --json > "$OUT/bench_gpu.json"
$M bench "$MODEL" -ngl -1 --experts-on-cpu -t "$T" -r 3 --json > "$OUT/bench_experts_on_cpu.json"
$M bench "$MODEL" -ngl -1 --n-cpu-moe 2 -t "$T" -r 3 --json > "$OUT/bench_n_cpu_moe2.json"
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| placement | API pp512 t/s | raw pp512 t/s | API tg128 t/s | raw tg128 t/s | tg ratio | load s |")
print("|---|---|---|---|---|---|---|")
for name in ("bench_gpu", "bench_n_cpu_moe2", "bench_experts_on_cpu"):
    r = json.loads((out / f"{name}.json").read_text())
    a, c = r["api"], r["llama_cpp"]
    print(f"| {name.removeprefix('bench_')} | {a['pp']:.0f} | {c['pp']:.0f} | {a['tg']:.1f} | {c['tg']:.1f} "
          f"| {r['ratio']['tg']:.3f} | {a['load_s']:.2f} |")
PY
