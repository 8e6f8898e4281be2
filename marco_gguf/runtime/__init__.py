"""The local runtime over llama-cpp-python.

Importing it prepares the process for llama.cpp before its libraries load, since both choices are only
possible then: OpenMP's waiting (openmp.py) and the CPU kernels (kernels.py: AVX-512 variants where this
CPU runs them).
"""

from marco_gguf.runtime import kernels as _kernels
from marco_gguf.runtime import openmp as _openmp

_openmp.configure()
_kernels.activate()
