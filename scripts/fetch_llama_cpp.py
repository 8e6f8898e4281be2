#!/usr/bin/env python3
"""Fetch llama.cpp's source tree (convert_hf_to_gguf.py, gguf-py, tools) into .cache/llama.cpp.

It comes from the llama-cpp-python sdist of the installed version, so the converter and tools
the tests and benchmarks compare against are the same llama.cpp the runtime links.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

DEST = Path(__file__).resolve().parent.parent / ".cache" / "llama.cpp"


def main() -> int:
    if (DEST / "convert_hf_to_gguf.py").is_file():
        print(f"llama.cpp source already in {DEST}")
        return 0
    version = importlib.metadata.version("llama-cpp-python")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp,
               f"llama-cpp-python=={version}"]
        if subprocess.run(cmd).returncode != 0:
            print("could not download the llama-cpp-python sdist", file=sys.stderr)
            return 1
        (sdist,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        (src,) = Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp")
        DEST.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(src), DEST)
    print(f"llama.cpp {version} source in {DEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
