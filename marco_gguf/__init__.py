"""marco-gguf: Marco-MoE checkpoints to GGUF, quantized for llama.cpp, and run locally."""

__version__ = "0.1.0"
