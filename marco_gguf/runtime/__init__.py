"""The local runtime over llama-cpp-python.

Importing it picks the CPU kernels first (kernels.py: AVX-512 variants where this CPU runs them), since
that choice is only possible before llama.cpp's libraries are loaded.
"""

from marco_gguf.runtime import kernels as _kernels

_kernels.activate()
