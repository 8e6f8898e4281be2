"""`marco-gguf demo`: the tiny checkpoint -> GGUF (Q4_K_M) -> llama.cpp generation and a chat, offline."""

from __future__ import annotations

from pathlib import Path

from marco_gguf.tiny_checkpoint import write_tiny_checkpoint


def run_demo(folder: Path, threads: int | None, force: bool) -> None:
    """Write the checkpoint, convert it to Q4_K_M, load it in llama.cpp and generate a few tokens."""
    import time

    from marco_gguf.convert import convert
    from marco_gguf.quantize.recipe import preset
    from marco_gguf.runtime.model import load_model
    from marco_gguf.sizes import format_bytes
    from marco_gguf.ui import console, progress_bars

    ckpt = folder / "tiny-marco"
    console.print(f"1. writing a tiny random Marco-architecture checkpoint to {ckpt}")
    write_tiny_checkpoint(ckpt)
    out = folder / "tiny-marco-Q4_K_M.gguf"
    console.print(f"2. converting it to {out.name} in one streaming pass")
    t0 = time.perf_counter()
    result = convert(ckpt, out, preset("Q4_K_M"), threads=threads, force=force, progress=progress_bars)
    console.print(f"   {format_bytes(out.stat().st_size)}, {result.size_label}, {len(result.jobs)} tensors, "
                  f"{time.perf_counter() - t0:.1f} s")
    console.print("3. loading it with llama.cpp (llama-cpp-python) and generating greedily")
    model = load_model(out, n_ctx=256, threads=threads)
    prompt = "Marco speaks 29 languages:"
    t0 = time.perf_counter()
    text = model.generate(prompt, max_tokens=16, temperature=0.0)
    console.print(f"   prompt {prompt!r} -> {text!r} ({time.perf_counter() - t0:.2f} s; random weights, "
                  "so the words are noise)", markup=False)
    console.print("4. a short chat through the Python API: the GGUF's own chat template, streamed reply")
    messages = [{"role": "system", "content": "You are Marco, a multilingual assistant."},
                {"role": "user", "content": "Ciao! Come stai?"}]
    prompt_ids = model.tokenize(model.render(messages), special=True)
    console.print(f"   {len(messages)} messages -> a {len(prompt_ids)}-token prompt; reply: ", end="", markup=False)
    stream = model.chat(messages, stream=True, max_tokens=16, temperature=0.0)
    for piece in stream:
        console.print(piece, end="", markup=False, highlight=False)
    c = stream.completion
    console.print(f"\n   {c.completion_tokens} tokens ({c.finish_reason}), "
                  f"{c.generation_tokens_per_second or 0:.1f} tokens/s")
    model.close()
