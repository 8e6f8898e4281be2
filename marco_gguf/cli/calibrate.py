"""`marco-gguf imatrix` and `marco-gguf verify`: calibration and quality checks against the original weights."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from marco_gguf.cli.command import command, fail, print_json, warn
from marco_gguf.cli.options import Force, Json, Threads
from marco_gguf.ui import console, count_progress, progress_bars

Text = Annotated[Path | None, typer.Option("--text", help="Text to run: a .jsonl file of {\"lang\", \"text\"} "
                                           "records or a plain text file (default: the bundled prompts, "
                                           "31 languages).")]
BELOW_MIN_TOP1 = 3  # verify's exit code when the top-1 agreement is below --min-top1


@command()
def imatrix(
    src: Annotated[str, typer.Argument(help="Checkpoint folder (the original weights).")],
    out: Annotated[Path, typer.Option("--output", "-o", help="Importance matrix to write: llama.cpp's GGUF "
                                      "format, or its legacy format if the name ends in .dat.")],
    text: Text = None,
    max_tokens: Annotated[int, typer.Option(help="Calibration tokens, split equally over the languages.")] = 16384,
    threads: Threads = None,
    force: Force = False,
    as_json: Json = False,
) -> None:
    """Importance matrix for low-bit quantization, per expert, with a report of the experts it reached."""
    from marco_gguf.calibrate.collect import ImatrixCollector
    from marco_gguf.calibrate.reference import ReferenceModel
    from marco_gguf.calibrate.text import load_samples
    from marco_gguf.output_files import check_destination
    from marco_gguf.quantize.imatrix import write_imatrix

    check_destination(out, force)
    with ReferenceModel(src, threads) as ref:
        samples, source = load_samples(ref.path, text, "calibration", max_tokens)
        collector = ImatrixCollector(ref, samples)
        n, layers = len(collector.token_lang), ref.hp.n_layer
        with count_progress(n * layers, f"calibrating: {n:,} tokens x {layers} layers", not as_json) as advance:
            ref.hidden([s.ids for s in samples], collector, advance)
    write_imatrix(collector.imatrix(source), out, force)
    coverage = collector.coverage()
    idle = coverage.idle()
    if as_json:
        print_json({"output": str(out), "text": source, "tokens": n, "tensors": len(collector.sums),
                    "coverage": coverage.to_json()})
    else:
        for table in coverage.tables():
            console.print(table)
        console.print(f"wrote {out} ({len(collector.sums)} tensors, {source})")
    if idle:
        n_idle = sum(len(e) for _, e in idle)
        warn(f"{n_idle} experts in {len(idle)} layers got no calibration tokens (first: layer {idle[0][0]}, "
             f"expert {idle[0][1][0]}); they will be quantized with a neutral importance (all ones), as "
             "llama-quantize does. More text, or text in more languages, reaches more experts.")


@command()
def verify(
    model: Annotated[Path, typer.Argument(help="GGUF file to check.")],
    reference: Annotated[str, typer.Option("--reference", "-r", help="Checkpoint folder it was made from.")],
    text: Text = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens to compare, split equally over the languages.")] = 4096,
    min_top1: Annotated[float | None, typer.Option(help="Fail (exit code 3) when the overall top-1 agreement is "
                                                   "below this fraction, e.g. 0.9.")] = None,
    floor: Annotated[bool, typer.Option(help="Also measure an unquantized conversion of the reference at its own "
                                        "precision (bf16 for Marco: the weights as trained) as the floor: what "
                                        "llama.cpp's kernels account for without quantization. Needs scratch disk "
                                        "for it, as much as the checkpoint (16 GB for Marco-Nano), and a second "
                                        "llama.cpp run.")] = False,
    lora: Annotated[list[Path] | None, typer.Option(
        "--lora", help="PEFT LoRA adapter folder merged into the file (convert --lora): the reference (and the "
                       "floor) merge it too; repeatable.")] = None,
    lora_scale: Annotated[list[float] | None, typer.Option(
        "--lora-scale", help="Strength of the --lora adapters, as given to convert: once for all, or once per "
                             "--lora in order (default 1).")] = None,
    threads: Threads = None,
    as_json: Json = False,
) -> None:
    """Compare a GGUF file's predictions with the original weights: top-1 agreement and KL divergence."""
    # torch and llama.cpp take turns here; spinning OpenMP workers of one would starve the other
    # (10x slower on 2 cores). Must be set before either loads its OpenMP runtime.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from marco_gguf.calibrate.reference import ReferenceModel
    from marco_gguf.calibrate.text import load_samples
    from marco_gguf.calibrate.verify import verify as run_verify
    from marco_gguf.convert.lora import LoraSpec, pair_scales

    if min_top1 is not None and not 0 <= min_top1 <= 1:
        raise typer.BadParameter("--min-top1 is a fraction between 0 and 1")
    loras = [LoraSpec(path, scale) for path, scale in pair_scales(lora, lora_scale)]
    with ReferenceModel(reference, threads, loras) as ref:
        samples, source = load_samples(ref.path, text, "evaluation", max_tokens)
        report = run_verify(model, ref, samples, threads, floor, progress=None if as_json else progress_bars)
    for warning in report["warnings"]:
        warn(warning)
    overall = report["model"]["overall"]["top1"]
    passed = min_top1 is None or overall >= min_top1
    if as_json:
        print_json({"model": str(model), "reference": reference, "text": source, **report,
                    "min_top1": min_top1, "passed": passed})
    else:
        console.print(_table(report, model.name))
        console.print(f"text: {source}")
    if not passed:
        fail(f"top-1 agreement {overall:.4f} is below --min-top1 {min_top1}", code=BELOW_MIN_TOP1)


def _table(report: dict, name: str) -> Table:
    floor = report["floor"]
    table = Table("language", "tokens", "top-1", "KL mean", "KL p99", title=f"{name} against the original weights")
    if floor:
        for column in ("top-1", "KL mean", "KL p99"):
            table.add_column(f"{report['floor_type'].lower()} {column}", style="dim")

    def row(label: str, m: dict, f: dict | None) -> list[str]:
        cells = [label, f"{m['tokens']:,}", f"{100 * m['top1']:.2f}%", f"{m['kl_mean']:.5f}", f"{m['kl_p99']:.4f}"]
        if f:
            cells += [f"{100 * f['top1']:.2f}%", f"{f['kl_mean']:.6f}", f"{f['kl_p99']:.5f}"]
        return cells

    for lang, m in report["model"]["languages"].items():
        table.add_row(*row(lang, m, floor["languages"][lang] if floor else None))
    table.add_section()
    table.add_row(*row("[bold]overall", report["model"]["overall"], floor["overall"] if floor else None))
    return table
