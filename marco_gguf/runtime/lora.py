"""LoRA adapter GGUF files applied at run time, through llama.cpp's own adapter API.

llama-cpp-python's `Llama(lora_path=...)` takes one adapter and turns memory mapping off for the
whole model (a leftover from when adapters were merged into the weights on load), which costs a full
read of the model into anonymous memory. llama.cpp no longer needs that: adapters are separate
tensors added at every matrix product. So the adapters are loaded here with
`llama_adapter_lora_init` and activated together with `llama_set_adapters_lora`, the model stays
mapped, and any number of adapters with their own scales apply. llama.cpp frees them with the model.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from marco_gguf.errors import MarcoError
from marco_gguf.gguf_file import GGUFFile


def check_adapter(path: Path, architecture: str) -> None:
    """A clear error before llama.cpp sees a file that is not a LoRA adapter for this architecture."""
    f = GGUFFile(path)
    if f.get("general.type") != "adapter" or f.get("adapter.type") != "lora":
        hint = " (a PEFT folder? make the file with marco-gguf export-lora, or merge it with convert --lora)" \
            if path.is_dir() else ""
        raise MarcoError(f"{path} is not a LoRA adapter GGUF{hint}")
    if f.architecture != architecture:
        raise MarcoError(f"LoRA adapter {path.name} is for {f.architecture} models, not {architecture}")


def attach_loras(llama, loras: list[tuple[Path, float]], architecture: str) -> list:
    """Load adapter files into `llama`'s model and activate them with their scales; returns the handles."""
    import llama_cpp

    handles = []
    for path, _ in loras:
        path = Path(path)
        if path.is_dir():
            raise MarcoError(f"{path} is a folder: --lora takes a LoRA adapter GGUF at run time (make one with "
                             "marco-gguf export-lora), or merge a PEFT folder with convert --lora")
        check_adapter(path, architecture)
        handle = llama_cpp.llama_adapter_lora_init(llama.model, str(path).encode())
        if not handle:
            raise MarcoError(f"llama.cpp could not load LoRA adapter {path.name} (made for another model? its "
                             "tensors must match this model's shapes)")
        handles.append(handle)
    if handles:
        llama.marco_lora_scales = [float(s) for _, s in loras]  # other contexts on this model (engine.py) reuse them
        arr = (llama_cpp.llama_adapter_lora_p_ctypes * len(handles))(*handles)
        scales = (ctypes.c_float * len(handles))(*[float(s) for _, s in loras])
        if llama_cpp.llama_set_adapters_lora(llama.ctx, arr, len(handles), scales):
            raise MarcoError("llama.cpp could not activate the LoRA adapters")
    return handles
