"""`marco-gguf build-runtime / doctor / bench / rpc-server`: the machine the model runs on."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from marco_gguf.cli.command import command, print_json, warn
from marco_gguf.cli.options import Json
from marco_gguf.errors import MarcoError
from marco_gguf.sizes import format_bytes
from marco_gguf.ui import console, err


@command("build-runtime")
def build_runtime(
    profile: Annotated[str, typer.Option("--profile", help="Build profile: a cmake/NAME.cmake file "
                                         "(portable, cpu-avx2, cpu, cpu-avx512, cuda, vulkan, metal, linux-arm64).")],
    defines: Annotated[list[str] | None, typer.Option("-D", help="Extra CMake setting NAME=VALUE (repeatable), "
                                                      "e.g. -D GGML_AVX512=ON.")] = None,
    cuda_arch: Annotated[str | None, typer.Option("--cuda-arch", help="CUDA compute capability to build for, "
                                                  "e.g. 89 (nvidia-smi --query-gpu=compute_cap).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the pip command, do not run it.")] = False,
) -> None:
    """Rebuild llama-cpp-python from source with a build profile for this machine's hardware (~10 minutes)."""
    from marco_gguf.runtime.build import build_command, installed_build, run_build

    extra = list(defines or [])
    if cuda_arch:
        if profile != "cuda":
            raise MarcoError("--cuda-arch goes with --profile cuda")
        extra.append(f"CMAKE_CUDA_ARCHITECTURES={cuda_arch}")
    cmd = build_command(profile, extra)
    console.print(cmd.shell(), markup=False, highlight=False, soft_wrap=True)
    if dry_run:
        return
    code = run_build(cmd)
    if code != 0:
        raise MarcoError(f"pip failed (exit code {code}); the log above says why")
    info = installed_build()
    console.print(f"installed: {info}", markup=False, highlight=False)
    if "AMX_INT8 = 1" in info:
        err.print("warning: the new build has AMX kernels; if `marco-gguf doctor` reports SIGILL, rebuild")
    console.print("check it with: marco-gguf doctor")


@command("build-kernels")
def build_kernels(
    variants: Annotated[list[str] | None, typer.Option("--variant", help="A variant to build (repeatable; default "
                                                       "all: zen4, icelake, cascadelake, skylakex).")] = None,
    source: Annotated[Path | None, typer.Option("--source", help="A llama.cpp or ggml source folder of the "
                                                "installed version (default: its llama-cpp-python sdist).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild variants already built.")] = False,
    as_json: Json = False,
) -> None:
    """Compile ggml's CPU kernels for the AVX-512 CPU generations (~1-2 minutes); each process then loads the
    best one this CPU runs, and the installed portable kernels everywhere else."""
    from marco_gguf.runtime import kernels

    if not kernels.supported():
        message = "nothing to build: CPU kernel variants are for x86-64 Linux; this install's kernels fit it"
        if as_json:
            print_json({"variants": [], "message": message})
        else:
            console.print(message)
        return
    chosen = kernels.VARIANTS
    if variants:
        unknown = [v for v in variants if v not in kernels.BY_NAME]
        if unknown:
            raise MarcoError(f"unknown variant {unknown[0]!r}; choose from {', '.join(kernels.BY_NAME)}")
        chosen = tuple(v for v in kernels.VARIANTS if v.name in variants)
    if source is not None and not source.is_dir():
        raise MarcoError(f"{source} is not a folder")
    with err.status("building CPU kernels") as status:
        result = kernels.build(chosen, source, force, progress=lambda m: status.update(m))
    if as_json:
        print_json(asdict(result))
        return
    verb = "already built" if result.already else f"built in {result.seconds:.0f} s"
    console.print(f"CPU kernel variants {', '.join(result.variants)}: {verb}, in {result.folder}", highlight=False)
    here = ", ".join(result.runs_here) or "none (the installed portable kernels stay in use)"
    console.print(f"this CPU runs: {here}", highlight=False)
    if result.runs_here:
        console.print(f"in use from now on: {result.runs_here[0]} (MARCO_GGUF_CPU_KERNELS=portable turns it off)")


@command()
def doctor(
    model: Annotated[Path | None, typer.Option("--model", "-m", help="A GGUF to check the memory for.")] = None,
    ctx: Annotated[int, typer.Option("--ctx", help="Context length to check the memory for.")] = 4096,
    measure: Annotated[bool, typer.Option("--measure", help="With --model: time the model's prompt processing and "
                                          "generation with the CPU kernels in use and with the portable ones "
                                          "(about a minute).")] = False,
    as_json: Json = False,
) -> None:
    """Check the installed llama.cpp build on this machine: features, a crash probe, memory, a better build."""
    from marco_gguf.runtime.doctor import diagnose, measure_kernels

    if ctx < 1:
        raise MarcoError("--ctx must be at least 1")
    if measure and model is None:
        raise MarcoError("--measure needs --model FILE: the kernels are timed on that model")
    report = diagnose(model, ctx)
    if measure:
        with err.status("timing the model with each set of CPU kernels"):
            report["measured"] = measure_kernels(model)
    if as_json:
        print_json(report)
    else:
        show_report(report)
    if report["problems"]:
        raise typer.Exit(1)


def show_report(r: dict) -> None:
    lc, host, probe = r["llama_cpp"], r["host"], r["probe"]
    console.print(f"[bold]llama-cpp-python {lc['version']}[/]  backends: {', '.join(lc['backends'])}  "
                  f"GPU offload: {'yes' if lc['gpu_offload'] else 'no'}")
    for section, features in lc["features"].items():
        on = [k if v == "1" else f"{k}={v}" for k, v in features.items() if v != "0"]
        console.print(f"  {section}: {' '.join(on)}", highlight=False)
    for d in lc["devices"]:
        console.print(f"  device {d['name']} ({d['type']}): {d['description']}, "
                      f"{format_bytes(d['memory_free'])} free of {format_bytes(d['memory_total'])}", highlight=False)
    gpus = ", ".join(f"{g['name']} (compute {g['compute_cap']})" for g in host["nvidia"]) or "none"
    console.print(f"[bold]this machine[/]: {host['system']} {host['machine']}, NVIDIA GPUs: {gpus}, "
                  f"Vulkan: {'yes' if host['vulkan'] else 'no'}", highlight=False)
    k = r["kernels"]
    console.print(f"[bold]CPU kernels built in[/]: {' '.join(k['built_with']) or 'none reported'}", highlight=False)
    use = k["in_use"]
    console.print(f"  in use: {use['reason']}" + (f" ({use['path']})" if use["path"] else ""), highlight=False,
                  soft_wrap=True)
    for why in use["skipped"]:
        console.print(f"  not used: {why}", highlight=False)
    if k["runs_here"]:
        answer = {True: "yes", False: "no", None: "?"}
        tried = ", ".join(f"{name} {answer[ok]}" for name, ok in k["runs_here"].items())
        console.print(f"  instruction sets this CPU runs (executed in a child process): {tried}", highlight=False)
    for note in k["notes"]:
        console.print(f"  [yellow]note:[/] {note}", highlight=False)
    if probe["ok"]:
        console.print(f"[green]prompt processing works[/]: {probe['tokens']} tokens in {probe['seconds']:.2f} s "
                      "on a tiny model (in a child process)")
    if "model" in r:
        show_fit(r["model"])
    if r.get("measured"):
        m = r["measured"]
        if m.get("note"):
            console.print(f"[bold]measured[/]: {m['note']}", highlight=False)
        else:
            console.print(f"[bold]measured on this CPU[/] ({Path(m['model']).name}, {m['threads']} threads): "
                          f"{m['variant']} kernels generate at {m['gain_tg']:.2f}x and process prompts at "
                          f"{m['gain_pp']:.2f}x the portable kernels (tg {m['kernels']['tg']:.1f} against "
                          f"{m['portable']['tg']:.1f} tokens/s)", highlight=False)
    for problem in r["problems"]:
        console.print(f"[bold red]problem:[/] {problem}", highlight=False)
    advice = r["advice"]
    if advice:
        verb = "fix" if r["problems"] else "a build that uses more of this machine"
        console.print(f"[bold]{verb}[/] ({advice['reason']}):")
        console.print(f"  {advice['command']}", markup=False, highlight=False)
        if advice["pip"]:
            console.print(f"  or: {advice['pip']}", markup=False, highlight=False, soft_wrap=True)
        if advice.get("measured_gain"):
            console.print(f"  what it gains: {advice['measured_gain']}", highlight=False, soft_wrap=True)
    else:
        console.print("the installed build fits this machine")


def show_fit(m: dict) -> None:
    console.print(f"[bold]{Path(m['model']).name}[/] at context {m['n_ctx']}:")
    table = Table("", "bytes")
    for label, key in (("weights", "weights"), ("  of which experts", "experts"), ("KV cache (f16)", "kv_cache"),
                       ("compute buffers", "compute"), ("needed", "need"), ("RAM available", "ram_available")):
        if m.get(key) is not None:
            table.add_row(label, format_bytes(m[key]))
    if "gpu_free" in m:
        table.add_row("GPU memory free", format_bytes(m["gpu_free"]))
        table.add_row("GPU needs with --experts-on-cpu", format_bytes(m["gpu_need_experts_on_cpu"]))
    console.print(table)
    if m.get("fits_on_gpu") is False and m.get("fits_with_experts_on_cpu"):
        console.print("the whole model does not fit the GPU; with --experts-on-cpu it does")


@command()
def bench(
    model: Annotated[Path, typer.Argument(help="GGUF file.")],
    threads: Annotated[int | None, typer.Option("--threads", "-t", help="Threads (default: all cores).")] = None,
    repetitions: Annotated[int, typer.Option("--repetitions", "-r", help="Timed runs of each test.")] = 5,
    n_prompt: Annotated[int, typer.Option("-p", help="Prompt tokens (llama-bench's pp test).")] = 512,
    n_gen: Annotated[int, typer.Option("-n", help="Generated tokens (llama-bench's tg test).")] = 128,
    n_gpu_layers: Annotated[int, typer.Option("--gpu-layers", "-ngl", help="Layers on the GPU (-1: all).")] = 0,
    experts_on_cpu: Annotated[bool, typer.Option("--experts-on-cpu", help="Keep expert weights in host memory.")]
    = False,
    n_cpu_moe: Annotated[int, typer.Option("--n-cpu-moe", help="Keep the experts of the first N layers in host "
                                           "memory.")] = 0,
    rpc: Annotated[str | None, typer.Option("--rpc", help="llama.cpp RPC workers HOST:PORT[,HOST:PORT] "
                                            "(`marco-gguf rpc-server`); layers go to them.")] = None,
    experts_per_token: Annotated[int | None, typer.Option(
        "--experts-per-token", min=1, help="Experts each token runs (default: the trained count).")] = None,
    as_json: Json = False,
) -> None:
    """Tokens/s of the Python API against llama.cpp's raw decode loop, and against the memory-bandwidth bound."""
    from marco_gguf.runtime.bench import Settings, run_bench

    if threads is not None and threads < 1:
        raise MarcoError("--threads must be at least 1")
    from marco_gguf.runtime.rpc import parse_endpoints

    settings = Settings(n_prompt, n_gen, repetitions, threads, n_gpu_layers, experts_on_cpu, n_cpu_moe,
                        rpc=tuple(parse_endpoints(rpc)), experts_per_token=experts_per_token)
    with err.status("benchmarking: the Python API, then llama.cpp's decode loop"):
        result = run_bench(model, settings)
    for warning in result["warnings"]:
        warn(warning)
    if as_json:
        print_json(result)
    else:
        show_bench(result)


def show_bench(r: dict) -> None:
    s, api, raw = r["settings"], r["api"], r["llama_cpp"]
    k = f", {s['experts_per_token']} experts per token" if s.get("experts_per_token") else ""
    table = Table("", "Python API", "llama.cpp decode loop", "ratio",
                  title=f"{Path(r['model']).name}, {s['threads']} threads{k}, median of {s['repetitions']}")
    table.add_row(f"pp{s['n_prompt']} tokens/s", f"{api['pp']:.1f}", f"{raw['pp']:.1f}", f"{r['ratio']['pp']:.3f}")
    table.add_row(f"tg{s['n_gen']} tokens/s", f"{api['tg']:.2f}", f"{raw['tg']:.2f}", f"{r['ratio']['tg']:.3f}")
    cpu = r["cpu_time_ratio"]
    table.add_row("pp per CPU second", f"{api['pp_cpu']:.1f}", f"{raw['pp_cpu']:.1f}", f"{cpu['pp']:.3f}")
    table.add_row("tg per CPU second", f"{api['tg_cpu']:.2f}", f"{raw['tg_cpu']:.2f}", f"{cpu['tg']:.3f}")
    table.add_row("load s", f"{api['load_s']:.2f}", f"{raw['load_s']:.2f}", "")
    console.print(table)
    console.print(f"peak RSS {format_bytes(r['peak_rss'])}; read bandwidth {r['read_bandwidth'] / 1e9:.1f} GB/s")
    if r["tg_bound"]:
        of = r["tg_of_bound"]
        console.print(f"generation reads {format_bytes(r['host_bytes_per_token'])} of host memory per token: "
                      f"bound {r['tg_bound']:.1f} tokens/s; the API reaches {100 * of['api']:.0f}%, "
                      f"llama.cpp {100 * of['llama_cpp']:.0f}%")


@command("rpc-server")
def rpc_server(
    host: Annotated[str, typer.Option("--host", help="Address to listen on. The RPC protocol has no "
                                      "authentication: anything but loopback lets anyone who reaches it "
                                      "run code on this machine's llama.cpp.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", help="TCP port.")] = 50052,
    threads: Annotated[int | None, typer.Option("--threads", "-t", help="CPU threads (default: all cores).")] = None,
    cache: Annotated[Path | None, typer.Option("--cache", help="Keep received tensors in this folder, so a "
                                               "client loading the same model again sends hashes, not weights.")]
    = None,
) -> None:
    """Offer this machine's CPU to other machines' llama.cpp (its RPC backend): they pass --rpc HOST:PORT."""
    import threading

    from marco_gguf.host import default_threads
    from marco_gguf.runtime.rpc import is_loopback_host, serve_worker

    if not 0 < port < 65536:
        raise typer.BadParameter(f"--port must be in 1..65535, got {port}")
    if not is_loopback_host(host):
        err.print(f"[bold yellow]warning:[/] listening on {host}: the RPC protocol has no authentication or "
                  "encryption; anyone who can reach this port can use this machine. Use it on a trusted network "
                  "only.", highlight=False)
    failure: list[BaseException] = []

    def work() -> None:
        try:
            serve_worker(host, port, threads or default_threads(), str(cache) if cache else None)
        except BaseException as exc:  # noqa: BLE001 (handed to the main thread, which reports it)
            failure.append(exc)

    # ggml's server loop never returns to Python: run it in a thread so Ctrl-C still ends the process
    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    err.print(f"RPC worker on {host}:{port}, {threads or default_threads()} threads; clients use --rpc "
              f"{host}:{port}. Ctrl-C stops.", highlight=False)
    while worker.is_alive():
        worker.join(0.5)
    if failure:
        raise failure[0]
