#!/usr/bin/env python3
"""Build llama.cpp's own llama-quantize into .cache/llama-quantize, against the installed llama-cpp-python.

Compiles only the tool (tools/quantize) and common's imatrix loader from the source that
scripts/fetch_llama_cpp.py fetched (the same llama.cpp the runtime links), and links them to the
installed libllama and libggml; the rest of llama.cpp's common library, which the tool uses for
logging, build info and --override-kv, is replaced by a few lines. About a minute on 2 cores, instead
of a full llama.cpp build. The tests that need it skip without it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / ".cache" / "llama.cpp"
OUT = REPO / ".cache" / "llama-quantize"

STUBS = r"""
#include "build-info.h"
#include "common.h"
#include "log.h"

#include <cstdarg>
#include <cstdio>

int common_log_get_verbosity_thold(void) { return LOG_LEVEL_INFO; }
struct common_log * common_log_main() { return nullptr; }
void common_log_add(struct common_log *, enum ggml_log_level, const char * fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vfprintf(stderr, fmt, args);
    va_end(args);
}
bool string_parse_kv_override(const char *, std::vector<llama_model_kv_override> &) {
    fprintf(stderr, "--override-kv is not built into this llama-quantize\n");
    return false;
}
int llama_build_number(void) { return 0; }
const char * llama_commit(void) { return "llama-cpp-python"; }
const char * llama_compiler(void) { return "marco-gguf scripts/build_llama_quantize.py"; }
const char * llama_build_target(void) { return "host"; }
const char * llama_build_info(void) { return "llama-cpp-python"; }
void llama_print_build_info(const char * version, FILE * stream) { fprintf(stream, "version: %s\n", version); }
"""


def main() -> int:
    binary = OUT / "llama-quantize"
    if binary.is_file():
        print(f"llama-quantize already in {OUT}")
        return 0
    if not (SRC / "tools" / "quantize" / "quantize.cpp").is_file():
        print("llama.cpp source not fetched: run python scripts/fetch_llama_cpp.py first", file=sys.stderr)
        return 1
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        print("no C++ compiler found", file=sys.stderr)
        return 1
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    OUT.mkdir(parents=True, exist_ok=True)
    stubs = OUT / "stubs.cpp"
    stubs.write_text(STUBS)
    includes = [f"-I{SRC / d}" for d in ("include", "ggml/include", "common", "tools/quantize")]
    sources = [SRC / "tools/quantize/main.cpp", SRC / "tools/quantize/quantize.cpp", SRC / "common/imatrix-loader.cpp",
               stubs]
    libs = [f"-L{lib}", f"-Wl,-rpath,{lib}", "-lllama", "-lggml", "-lggml-base", "-lpthread"]
    cmd = [cxx, "-std=c++17", "-O1", *includes, *map(str, sources), "-o", str(binary), *libs]
    print(" ".join(cmd))
    if subprocess.run(cmd).returncode != 0:
        return 1
    print(f"llama-quantize in {binary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
