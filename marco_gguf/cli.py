"""`marco-gguf`: the command line. Each stage registers its commands on the shared app."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from marco_gguf.app import app, command, print_json
from marco_gguf.files import format_bytes
from marco_gguf.ui import console

Threads = Annotated[int | None, typer.Option("--threads", "-t", help="Worker threads (default: all cores).")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")]
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


@command()
def convert(
    src: Annotated[str, typer.Argument(help="Checkpoint folder (or a Hub id such as AIDC-AI/Marco-Nano-Instruct).")],
    out: Annotated[Path, typer.Option("--output", "-o", help="GGUF file to write.")],
    outtype: Annotated[str | None, typer.Option(help="Unquantized output type: f32, f16, bf16 or q8_0 "
                                                     "(default: the checkpoint's dtype).")] = None,
    quant: Annotated[str | None, typer.Option("--quant", "-q", help="Quantization preset, e.g. Q4_K_M.")] = None,
    threads: Threads = None,
    force: Force = False,
    as_json: Json = False,
) -> None:
    """Convert a Marco checkpoint folder to GGUF in one streaming pass."""
    from marco_gguf.convert import convert as run_convert
    from marco_gguf.quantize.recipe import preset, uniform

    if quant and outtype:
        raise typer.BadParameter("give either --outtype or --quant, not both")
    if outtype and outtype.lower() not in OUTTYPES:
        raise typer.BadParameter(f"--outtype must be one of {', '.join(OUTTYPES)}")
    recipe = preset(quant) if quant else uniform(outtype or _checkpoint_dtype(src))
    result = run_convert(src, out, recipe, threads=threads, force=force, progress=not as_json)
    summary = {"output": str(out), "recipe": recipe.name, "size_label": result.size_label,
               "bytes": out.stat().st_size, "tensors": len(result.jobs)}
    if as_json:
        print_json(summary)
    else:
        console.print(f"wrote {out} ({format_bytes(summary['bytes'])}, {recipe.name}, "
                      f"{result.size_label}, {len(result.jobs)} tensors)")


def _checkpoint_dtype(src: str) -> str:
    """The checkpoint's own float type (config dtype / torch_dtype), bf16 if it does not say."""
    import json

    try:
        config = json.loads((Path(src) / "config.json").read_text())
    except (OSError, ValueError):
        return "bf16"  # convert() reports the missing or broken config in its own words
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16")
    return {"float32": "f32", "float16": "f16"}.get(dtype, "bf16")


@command()
def inspect(file: Annotated[Path, typer.Argument(help="GGUF file.")], as_json: Json = False) -> None:
    """Show a GGUF file's architecture, tokenizer, recipe and bits per weight per tensor class."""
    from marco_gguf.inspect import inspect_file

    info = inspect_file(file)
    if as_json:
        print_json(info)
        return
    g, tok = info["general"], info["tokenizer"]
    console.print(f"[bold]{g.get('name', file.name)}[/] {g.get('size_label', '')}  "
                  f"architecture [bold]{info['architecture']}[/]  file type {g.get('file_type', '?')}")
    console.print("hyper-parameters: " + ", ".join(f"{k}={v}" for k, v in info["hparams"].items()))
    console.print(f"tokenizer: {tok.get('model')} / pre {tok.get('pre')}, {tok['tokens']} tokens, "
                  f"{tok['merges']} merges, bos {tok.get('bos_token_id')}, eos {tok.get('eos_token_id')}, "
                  f"pad {tok.get('padding_token_id')}, add_bos {tok.get('add_bos_token')}; "
                  f"chat template {'present' if info['chat_template'] else 'absent'}")
    for key in ("license", "languages", "base_model.0.name", "finetune", "basename"):
        if key in g:
            console.print(f"{key}: {g[key]}")
    table = Table("class", "type", "tensors", "weights", "bytes", "bits/weight", title="tensors")
    for r in info["tensors"]:
        table.add_row(r["class"], r["type"], str(r["tensors"]), f"{r['weights']:,}", format_bytes(r["bytes"]),
                      f"{r['bpw']:.2f}")
    t = info["total"]
    table.add_row("[bold]total", "", str(t["tensors"]), f"{t['weights']:,}", format_bytes(t["bytes"]),
                  f"[bold]{t['bpw']:.2f}")
    console.print(table)
    if info["recipe"]:
        console.print("recipe:\n" + info["recipe"].strip(), highlight=False, markup=False)


@command()
def demo(
    folder: Annotated[Path | None, typer.Option("--dir", help="Keep the demo files in this folder "
                                                "(default: a temporary folder, removed afterwards).")] = None,
    threads: Threads = None,
    force: Force = False,
) -> None:
    """Offline end-to-end run: tiny random Marco checkpoint -> GGUF (Q4_K_M) -> llama.cpp generation."""
    import tempfile

    from marco_gguf.demo import run_demo

    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        run_demo(folder, threads, force)
        return
    with tempfile.TemporaryDirectory(prefix="marco-demo-") as tmp:
        run_demo(Path(tmp), threads, force)


import marco_gguf.runtime.device_commands  # noqa: E402,F401  (registers build-runtime, doctor, bench)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
