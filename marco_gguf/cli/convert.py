"""`marco-gguf convert / export-lora / quantize / inspect / demo`: making GGUF files and looking into them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from marco_gguf.cli.command import command, fail, print_json, warn
from marco_gguf.cli.options import Force, Json, Threads
from marco_gguf.sizes import format_bytes
from marco_gguf.ui import console, progress_bars

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


Preset = Annotated[str | None, typer.Option("--quant", "-q", help="Quantization preset: Q8_0 Q6_K Q5_K_M Q5_K_S "
                                          "Q4_K_M Q4_K_S Q3_K_M Q2_K IQ4_XS IQ3_M IQ2_M; for phones Q4_0 IQ4_NL.")]
UntieOutput = Annotated[bool, typer.Option(
    "--untie-output", help="Write the tied embedding twice: output.weight at the recipe's output type (override "
    "with --tensor-type output=TYPE), token_embd at its own. Fewer bytes per token with a smaller output type, "
    "and llama.cpp's repacked CPU kernels for it; the file grows by the output matrix.")]
TensorTypes = Annotated[list[str] | None, typer.Option(
    "--tensor-type", help="Override: PATTERN=TYPE (regex searched in GGUF tensor names, as llama-quantize); "
                          "repeatable, first match wins.")]
RecipeFile = Annotated[Path | None, typer.Option("--recipe", help="A whole recipe table from a TOML file.")]
Imatrix = Annotated[Path | None, typer.Option("--imatrix", help="Importance matrix (llama.cpp GGUF or .dat format), "
                                              "from `marco-gguf imatrix` or llama-imatrix.")]
MaxSize = Annotated[str | None, typer.Option("--max-size", help="Re-choose types so the file fits, e.g. 3.5GB.")]
FitRam = Annotated[str | None, typer.Option("--fit-ram", help="Re-choose types so file + KV cache for --ctx + "
                                            "llama.cpp's buffers fit this RAM, e.g. 6GB.")]
Ctx = Annotated[int, typer.Option("--ctx", help="Context length --fit-ram plans the KV cache for.")]
LoraScales = Annotated[list[float] | None, typer.Option(
    "--lora-scale", help="Strength of the --lora adapters: once for all, or once per --lora in order (default 1).")]


def _recipe(preset_name: str | None, recipe_file: Path | None, tensor_types: list[str] | None,
            default: str | None = None, untie_output: bool = False):
    """The recipe the options describe: a preset or a TOML table, plus --tensor-type overrides."""
    from marco_gguf.quantize.recipe import load_recipe, preset, uniform

    if preset_name and recipe_file:
        raise typer.BadParameter("give either a preset or --recipe, not both")
    if recipe_file:
        base = load_recipe(recipe_file)
    elif preset_name:
        base = uniform(preset_name) if preset_name.lower() in OUTTYPES[:3] else preset(preset_name)
    elif default:
        base = uniform(default)
    elif tensor_types:
        raise typer.BadParameter("--tensor-type needs a preset, --outtype or --recipe to override")
    elif untie_output:
        raise typer.BadParameter("--untie-output needs a preset, --outtype or --recipe")
    else:
        return None
    return base.with_overrides(tensor_types or []).untied(untie_output or base.untie_output)


def _budget(max_size: str | None, fit_ram: str | None, ctx: int):
    from marco_gguf.quantize.budget import Budget
    from marco_gguf.sizes import parse_size

    if max_size and fit_ram:
        raise typer.BadParameter("give either --max-size or --fit-ram, not both")
    if not (max_size or fit_ram):
        return None
    return Budget(max_size=parse_size(max_size) if max_size else None,
                  fit_ram=parse_size(fit_ram) if fit_ram else None, ctx=ctx)


def _print_plan(recipe, classes) -> None:
    table = Table("class", "type", "tensors", "weights", "bytes", "bpw", "error", title=f"plan {recipe.name}",
                  caption="error: relative RMS error of sampled rows")
    for c in sorted(classes, key=lambda c: -c.options[0][1]):
        t, size, error = c.options[0]
        table.add_row(c.cls, t.name, str(len(c.jobs)), f"{c.n_weights:,}", format_bytes(size),
                      f"{8 * size / c.n_weights:.2f}", f"{error:.4f}")
    console.print(table)


def _load_imatrix(path: Path | None):
    from marco_gguf.quantize.imatrix import load_imatrix

    if path is None:
        return None
    warnings: list[str] = []
    means = load_imatrix(path, warnings)
    for warning in warnings:
        warn(warning)
    return means


def _report(out: Path, recipe, jobs, as_json: bool, **extra) -> None:
    weights = sum(j.n_rows * j.row_len for j in jobs)
    summary = {"output": str(out), "recipe": recipe.name, "bytes": out.stat().st_size, "tensors": len(jobs),
               "bpw": 8 * sum(j.nbytes for j in jobs) / weights, **extra}
    if as_json:
        print_json(summary)
    else:
        details = ", ".join(str(v) for v in extra.values())
        console.print(f"wrote {out} ({format_bytes(summary['bytes'])}, {recipe.name}, {summary['bpw']:.2f} bits per "
                      f"weight{', ' + details if details else ''}, {len(jobs)} tensors)")


@command()
def convert(
    src: Annotated[str, typer.Argument(help="Checkpoint folder (or a Hub id such as AIDC-AI/Marco-Nano-Instruct).")],
    out: Annotated[Path, typer.Option("--output", "-o", help="GGUF file to write.")],
    outtype: Annotated[str | None, typer.Option(help="Unquantized output type: f32, f16, bf16 or q8_0 "
                                                     "(default: the checkpoint's dtype).")] = None,
    quant: Preset = None,
    tensor_type: TensorTypes = None,
    recipe_file: RecipeFile = None,
    untie_output: UntieOutput = False,
    imatrix: Imatrix = None,
    max_size: MaxSize = None,
    fit_ram: FitRam = None,
    ctx: Ctx = 4096,
    lora: Annotated[list[Path] | None, typer.Option(
        "--lora", help="PEFT LoRA adapter folder to merge into the weights while converting; repeatable.")] = None,
    lora_scale: LoraScales = None,
    threads: Threads = None,
    force: Force = False,
    as_json: Json = False,
) -> None:
    """Convert a Marco checkpoint folder to GGUF in one streaming pass, quantizing on the way with --quant."""
    from marco_gguf.convert import convert as run_convert
    from marco_gguf.convert.lora import pair_scales

    if outtype and (quant or recipe_file):
        raise typer.BadParameter("give either --outtype or --quant/--recipe, not both")
    if outtype and outtype.lower() not in OUTTYPES:
        raise typer.BadParameter(f"--outtype must be one of {', '.join(OUTTYPES)}")
    recipe = _recipe(quant, recipe_file, tensor_type, default=outtype, untie_output=untie_output)
    budget = _budget(max_size, fit_ram, ctx)
    loras = pair_scales(lora, lora_scale)
    result = run_convert(src, out, recipe, threads=threads, force=force, imatrix=_load_imatrix(imatrix),
                         progress=None if as_json else progress_bars, budget=budget,
                         on_plan=None if as_json else _print_plan, loras=loras)
    for warning in result.warnings:
        warn(warning)
    merged = {"merged": ", ".join(f"{p.name} x{s:g}" for p, s in loras)} if loras else {}
    _report(out, result.recipe, result.jobs, as_json, size_label=result.size_label, **merged)


@command("export-lora")
def export_lora(
    adapter: Annotated[Path, typer.Argument(help="PEFT LoRA adapter folder (adapter_config.json, "
                                            "adapter_model.safetensors).")],
    base: Annotated[str, typer.Option("--base", help="The model it adapts: its checkpoint folder or GGUF file.")],
    out: Annotated[Path, typer.Option("--output", "-o", help="LoRA adapter GGUF to write.")],
    outtype: Annotated[str, typer.Option(help="Type of the adapter tensors: f16 or f32 (exact, twice the size).")]
    = "f16",
    force: Force = False,
    as_json: Json = False,
) -> None:
    """Write llama.cpp's LoRA adapter GGUF, for chat/run/serve --lora (llama.cpp adapts experts too)."""
    from marco_gguf.convert.lora_export import export_lora as run_export

    result = run_export(adapter, base, out, outtype, force)
    for warning in result.warnings:
        warn(warning)
    summary = {"output": str(out), "bytes": out.stat().st_size, "tensors": result.tensors}
    if as_json:
        print_json(summary)
    else:
        console.print(f"wrote {out} ({format_bytes(summary['bytes'])}, LoRA on {result.tensors} tensors); "
                      f"use it with: marco-gguf chat MODEL.gguf --lora {out}")


@command()
def quantize(
    src: Annotated[Path, typer.Argument(help="f32, f16 or bf16 GGUF file.")],
    out: Annotated[Path, typer.Argument(help="GGUF file to write.")],
    quant: Annotated[str | None, typer.Argument(help="Preset (Q4_K_M, ...); optional with --recipe.")] = None,
    tensor_type: TensorTypes = None,
    recipe_file: RecipeFile = None,
    untie_output: UntieOutput = False,
    imatrix: Imatrix = None,
    max_size: MaxSize = None,
    fit_ram: FitRam = None,
    ctx: Ctx = 4096,
    allow_requantize: Annotated[bool, typer.Option(help="Accept an already quantized input.")] = False,
    threads: Threads = None,
    force: Force = False,
    as_json: Json = False,
) -> None:
    """Quantize an f32/f16/bf16 GGUF file with a Marco-aware preset."""
    from marco_gguf.host import default_threads
    from marco_gguf.quantize.from_gguf import quantize_file

    recipe = _recipe(quant, recipe_file, tensor_type, untie_output=untie_output)
    if recipe is None:
        raise typer.BadParameter("name a preset (e.g. Q4_K_M) or give --recipe")
    if src.resolve() == out.resolve():
        raise typer.BadParameter("the output must be another file than the input")
    result = quantize_file(src, out, recipe, threads or default_threads(), force, allow_requantize,
                           _load_imatrix(imatrix), progress=None if as_json else progress_bars,
                           budget=_budget(max_size, fit_ram, ctx), on_plan=None if as_json else _print_plan)
    for warning in result.warnings:
        warn(warning)
    _report(out, result.recipe, result.jobs, as_json)


@command()
def inspect(file: Annotated[Path, typer.Argument(help="GGUF file.")], as_json: Json = False,
            bound: Annotated[bool, typer.Option("--bound/--no-bound", help="Measure this machine's memory read "
                                                "bandwidth (a fraction of a second) to give the generation speed "
                                                "the bytes read per token allow.")] = True,
            threads: Threads = None) -> None:
    """Show a GGUF file's architecture, tokenizer, recipe, bits per weight per tensor class and bytes per token.

    A damaged file (cut off, a key of the wrong type) is shown as far as it can be read, then one error line
    says what is wrong, with exit code 1."""
    from marco_gguf.host import default_threads
    from marco_gguf.inspect import inspect_file

    info = inspect_file(file)
    if bound and info["per_token"]:
        from marco_gguf.runtime.bench import read_bandwidth

        n = threads or default_threads()
        bandwidth = read_bandwidth(n, size=256 * 2**20, repetitions=3)
        info["per_token"] |= {"read_bandwidth": bandwidth, "threads": n,
                              "tg_bound": {k: bandwidth / b for k, b in info["per_token"]["bytes"].items()}}
    if as_json:
        print_json(info)
        _fail_if_damaged(info["problems"])
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
    _print_per_token(info["per_token"])
    if info["recipe"]:
        console.print("recipe:\n" + info["recipe"].strip(), highlight=False, markup=False)
    for lora in info["lora_merged"]:
        console.print(f"LoRA merged: {lora.get('name')} x{lora.get('scale', 1):g} (r={lora.get('r')}, "
                      f"alpha={lora.get('lora_alpha')}, sha256 {str(lora.get('sha256'))[:12]})",
                      highlight=False, markup=False)
    _fail_if_damaged(info["problems"])


def _fail_if_damaged(problems: list[str]) -> None:
    from marco_gguf.gguf_file import one_line

    if problems:
        fail(one_line(problems))


def _print_per_token(p: dict | None) -> None:
    """Bytes read per generated token for each experts-per-token setting, with this machine's bound."""
    if not p:
        return
    trained = str(p["experts_per_token"])
    cols = ["experts per token", "bytes read per token"] + (["generation bound"] if "tg_bound" in p else [])
    title = "per generated token (CPU" + (f", {p['read_bandwidth'] / 1e9:.1f} GB/s read with {p['threads']} "
                                          "threads)" if "tg_bound" in p else ")")
    table = Table(*cols, title=title)
    for k, nbytes in p["bytes"].items():
        row = [k + (" (trained)" if k == trained else " (--experts-per-token)"), format_bytes(nbytes)]
        if "tg_bound" in p:
            row.append(f"{p['tg_bound'][k]:.1f} tokens/s")
        table.add_row(*row)
    console.print(table)


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

