"""The GGUF writer every output file goes through: `stream` writes tensors one chunk at a time (read, widen,
quantize, write, overlapped); `model_file` writes a model file the same way for convert and quantize."""
