#!/usr/bin/env bash
# The nearest thing to a phone on an x86-64 machine: cross-compile llama.cpp for 64-bit ARM Linux with
# cmake/linux-arm64.cmake, run greedy decoding of a tiny converted Marco Q4_K_M GGUF under qemu-aarch64
# emulation, and compare the tokens with the x86-64 runtime's (the installed llama-cpp-python's libllama).
#
#   apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user   # once
#   bash bench/arm64_check.sh                                              # ~20 min on 2 cores, mostly the build
#
# Too slow for CI; the result goes to BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench/out
SRC=.cache/llama.cpp
ARM=$OUT/llama.cpp-arm64
N=${N_TOKENS:-32}
PROMPT=${PROMPT:-"Marco läuft auf Telefonen. Marco chạy trên điện thoại. মার্কো ফোনে চলে। Marco runs on phones:"}
mkdir -p "$OUT"

if [ ! -f "$ARM/bin/libllama.so" ]; then
  cmake -C cmake/linux-arm64.cmake -S "$SRC" -B "$ARM" -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_COMMON=OFF \
    -DLLAMA_OPENSSL=OFF
  time nice -n 10 cmake --build "$ARM" --target llama -j2
fi
X86_LIB=$(python -c "import llama_cpp, pathlib; print(pathlib.Path(llama_cpp.__file__).parent / 'lib')")
INC="-I$SRC/include -I$SRC/ggml/include"
aarch64-linux-gnu-gcc -O2 $INC bench/greedy.c -L"$ARM/bin" -Wl,-rpath-link,"$ARM/bin" -lllama -o "$OUT/greedy-arm64"
gcc -O2 $INC bench/greedy.c -L"$X86_LIB" -Wl,-rpath-link,"$X86_LIB" -lllama -o "$OUT/greedy-x86"

# the demo's tiny random Marco checkpoint (vocab 151936, hidden 256, 4 layers, 16 experts of 96), as
# F16 (ARM and x86 differ only in summation order), Q4_K_M and the phone presets Q4_0 and IQ4_NL (each
# architecture has its own quantized dot products; ARM repacks Q4_0 and IQ4_NL for its dotprod kernels)
python - "$OUT" <<'PY'
import sys, tempfile
from pathlib import Path
from marco_gguf.convert import convert
from marco_gguf.tiny_checkpoint import write_tiny_checkpoint
from marco_gguf.quantize.recipe import preset, uniform
out = Path(sys.argv[1])
with tempfile.TemporaryDirectory() as tmp:
    ckpt = write_tiny_checkpoint(Path(tmp) / "tiny")
    for name, recipe in (("F16", uniform("F16")), ("Q4_K_M", preset("Q4_K_M")), ("Q4_0", preset("Q4_0")),
                         ("IQ4_NL", preset("IQ4_NL"))):
        if not (out / f"tiny-{name}.gguf").is_file():
            convert(ckpt, out / f"tiny-{name}.gguf", recipe, progress=False)
PY

file "$OUT/greedy-arm64" | sed 's/, BuildID.*//'
status=0
for q in F16 Q4_K_M Q4_0 IQ4_NL; do
  MODEL=$OUT/tiny-$q.gguf
  LD_LIBRARY_PATH=$X86_LIB "$OUT/greedy-x86" "$MODEL" "$PROMPT" "$N" > "$OUT/greedy-x86-$q.txt"
  /usr/bin/time -f "  qemu-aarch64 run: %e s" qemu-aarch64 -cpu max -L /usr/aarch64-linux-gnu \
    -E LD_LIBRARY_PATH="$ARM/bin" "$OUT/greedy-arm64" "$MODEL" "$PROMPT" "$N" > "$OUT/greedy-arm64-$q.txt"
  python - "$q" "$OUT/greedy-x86-$q.txt" "$OUT/greedy-arm64-$q.txt" <<'PY' || status=1
import sys
name, (x86, arm) = sys.argv[1], (open(p).read().split("\n") for p in sys.argv[2:])
assert x86[0] == arm[0], f"prompt tokens differ:\n{x86[0]}\n{arm[0]}"
a, b = ([[float(x) for x in line.split()] for line in t[1:] if line] for t in (x86, arm))
first = next((i for i, (p, q) in enumerate(zip(a, b)) if p[0] != q[0]), len(a))
diff = max((abs(p[1] - q[1]) for p, q in zip(a[:first], b[:first])), default=0.0)
print(f"{name}: prompt {len(x86[0].split()) - 1} tokens identical; greedy {first}/{len(a)} tokens identical; "
      f"largest top-1 logit difference before that {diff:.2e}")
if first == len(a):
    sys.exit(0)
# a divergence is explained only by a near-tie: a winner's lead smaller than the builds' logit differences
tie = min(a[first][2], b[first][2]) < diff
print(f"  step {first}: x86 picks {int(a[first][0])} by {a[first][2]:.4f}, ARM picks {int(b[first][0])} by "
      f"{b[first][2]:.4f}: {'a near-tie' if tie else 'NOT a near-tie'}")
sys.exit(0 if tie else 1)
PY
done
exit $status
