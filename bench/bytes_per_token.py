"""Bytes per token at full size: the output matrix's type, untying it, and the experts-per-token dial.

    python bench/bytes_per_token.py [--layers 28] [--rounds 3] [--tokens 64]

Files (cached in bench/out): our Q4_K_M (`marco-gguf convert -q Q4_K_M`), llama-quantize's Q4_K_M
(llama_model_quantize, the code the llama-quantize binary runs, from our bf16 GGUF), and variants of
our Q4_K_M that differ only in the embedding/output tensors: tied at Q5_K and Q4_K, untied with
token_embd kept at Q6_K and output.weight at Q4_K or Q4_0. The variants are spliced: every other
tensor's bytes are copied from our Q4_K_M file and the embedding/output matrices quantized from the
bf16 GGUF's token_embd (a full conversion per variant would take ~5 minutes of expert quantization
that changes nothing here); `marco-gguf convert --untie-output --tensor-type ^output=Q4_K` writes the
same tensors.

Generation speed is llama.cpp's own decode loop through its C API (runtime/bench.py's raw runner,
llama-bench's tg test: one token per llama_decode from an empty cache), 1 and 2 threads, the files
in turn within a round and in alternating order across rounds, each file read into the page cache
before its run; medians and the spread of the rounds. Bytes per token are memory.Footprint's count
(the active experts' share, every other weight, one embedding row) with the bound that this
machine's read bandwidth implies.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from common import OUT, nano_checkpoint, timed, warm

from marco_gguf.gguf_file import GGUFFile
from marco_gguf.gguf_writer.stream import to_f32
from marco_gguf.memory import Footprint
from marco_gguf.quantize import ggml
from marco_gguf.quantize.from_gguf import copy_header

VARIANTS = {  # name -> (token_embd type, output.weight type or None for tied)
    "tied Q5_K": ("Q5_K", None),
    "tied Q4_K": ("Q4_K", None),
    "untied Q6_K + output Q4_K": (None, "Q4_K"),  # None: token_embd copied (Q6_K)
    "untied Q6_K + output Q4_0": (None, "Q4_0"),
}


def splice(ours: Path, bf16: Path, dst: Path, embd_type: str | None, output_type: str | None) -> None:
    """`ours` with token_embd (and an output.weight) re-quantized from the bf16 file's embedding."""
    import gguf

    if dst.is_file():
        return
    src, ref = GGUFFile(ours), GGUFFile(bf16)
    emb_info = ref.tensor("token_embd.weight")
    rows = to_f32(np.asarray(ref.data(emb_info)).view(np.uint16).reshape(emb_info.shape), emb_info.type)
    tmp = dst.with_suffix(".partial")
    w = gguf.GGUFWriter(tmp, src.architecture, use_temp_file=False)
    copy_header(src)(w)
    w.add_file_type(int(src.get("general.file_type")))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    def add(name: str, t, data: np.ndarray, shape) -> None:
        w.add_tensor(name, data, raw_shape=ggml_shape(t, shape), raw_dtype=t)

    for info in src.tensors:
        if info.name == "token_embd.weight" and embd_type:
            t = ggml.parse_type(embd_type)
            add(info.name, t, ggml.quantize(t, rows), info.shape)
        else:
            add(info.name, info.type, np.asarray(src.data(info)), info.shape)
        if info.name == "output_norm.weight" and output_type:
            t = ggml.parse_type(output_type)
            add("output.weight", t, ggml.quantize(t, rows), emb_info.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(dst)


def ggml_shape(t, shape: tuple[int, ...]) -> tuple[int, ...]:
    """gguf-py's raw_shape for quantized bytes: rows x row bytes."""
    return (*shape[:-1], ggml.row_size(t, shape[-1]))


def llama_quantize(src: Path, dst: Path, threads: int) -> float:
    import ctypes

    import llama_cpp
    from gguf import LlamaFileType

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = int(LlamaFileType.MOSTLY_Q4_K_M), threads
    tmp = dst.with_suffix(".partial")
    t0 = time.perf_counter()
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        raise SystemExit("llama_model_quantize failed")
    tmp.rename(dst)
    return time.perf_counter() - t0


def tg(path: Path, threads: int, tokens: int, k: int | None) -> tuple[float, float]:
    """Generated tokens per wall second and per CPU second of llama.cpp's decode loop (a warm-up run, then one
    timed). At one thread the CPU-second rate counts only the work done, whatever else runs on the machine."""
    from marco_gguf.runtime.bench import Settings, raw_runner
    from marco_gguf.runtime.experts import expert_override

    overrides, _ = expert_override(GGUFFile(path).fields, k)
    runner = raw_runner(path, Settings(n_prompt=8, n_gen=tokens, threads=threads), overrides)
    try:
        runner.tg()
        return runner.tg()
    finally:
        runner.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--keep-bf16", action="store_true", help="keep the bf16 GGUF the splices read")
    ap.add_argument("--lock", help="hold this file locked (flock) while measuring, not while building")
    args = ap.parse_args()
    ckpt = nano_checkpoint(args.layers)
    stem = OUT / f"marco-nano-L{args.layers}"
    ours, bf16, anchor = Path(f"{stem}-Q4_K_M.gguf"), Path(f"{stem}-bf16.gguf"), Path(f"{stem}-lq-Q4_K_M.gguf")
    made: dict[str, float] = {}
    if not ours.is_file():
        made["ours"] = timed([sys.executable, "-m", "marco_gguf", "convert", str(ckpt), "-o", str(ours), "-q",
                              "Q4_K_M", "-t", "2", "--json"]).wall_s
    if not bf16.is_file():
        made["bf16"] = timed([sys.executable, "-m", "marco_gguf", "convert", str(ckpt), "-o", str(bf16), "--outtype",
                              "bf16", "--json"]).wall_s
    if not anchor.is_file():
        made["llama-quantize"] = llama_quantize(bf16, anchor, 2)
    files = {"llama-quantize Q4_K_M": anchor, "marco-gguf Q4_K_M": ours}
    for name, (embd, output) in VARIANTS.items():
        dst = Path(f"{stem}-Q4_K_M-{name.replace(' + ', '-').replace(' ', '-')}.gguf")
        splice(ours, bf16, dst, embd, output)
        files[f"marco-gguf Q4_K_M, {name}"] = dst
    if not args.keep_bf16:  # 16 GB at full size; only the splices read it
        bf16.unlink()
    configs = [(name, path, None) for name, path in files.items()]
    configs += [(f"marco-gguf Q4_K_M, {k} experts per token", ours, k) for k in (6, 4)]
    print(f"made: {made}", file=sys.stderr, flush=True)

    if args.lock:
        import fcntl

        lock = open(args.lock, "w")  # noqa: SIM115  (held until the process ends)
        fcntl.flock(lock, fcntl.LOCK_EX)
    runs: dict[tuple[str, int], list[float]] = {}
    cpu_runs: dict[tuple[str, int], list[float]] = {}
    for r in range(args.rounds):
        order = configs if r % 2 == 0 else configs[::-1]
        for threads in args.threads:
            for name, path, k in order:
                warm(path)
                wall, cpu = tg(path, threads, args.tokens, k)
                runs.setdefault((name, threads), []).append(wall)
                cpu_runs.setdefault((name, threads), []).append(cpu)
                print(f"round {r + 1} t{threads} {name}: {wall:.2f} ({cpu:.2f} per CPU s)", file=sys.stderr,
                      flush=True)

    from marco_gguf.runtime.bench import read_bandwidth

    bandwidth = {t: read_bandwidth(t) for t in args.threads}
    rows = []
    for name, path, k in configs:
        fp = Footprint.of(path).with_experts(k)
        per_token = fp.bytes_per_token()
        row = {"name": name, "file_bytes": path.stat().st_size, "bytes_per_token": per_token}
        for t in args.threads:
            x = runs[(name, t)]
            row[f"tg_t{t}"] = statistics.median(x)
            row[f"tg_t{t}_runs"] = x
            row[f"tg_cpu_t{t}"] = statistics.median(cpu_runs[(name, t)])
            row[f"bound_t{t}"] = bandwidth[t] / per_token
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["size_ratio"] = row["file_bytes"] / base["file_bytes"]
        for t in args.threads:
            # per-round ratios against the anchor in the same round: the spread the neighbours cause
            ratios = [a / b for a, b in zip(row[f"tg_t{t}_runs"], base[f"tg_t{t}_runs"], strict=True)]
            row[f"ratio_t{t}"] = statistics.median(ratios)
            row[f"ratio_t{t}_range"] = [min(ratios), max(ratios)]
            row[f"cpu_ratio_t{t}"] = row[f"tg_cpu_t{t}"] / base[f"tg_cpu_t{t}"]
    result = {"layers": args.layers, "rounds": args.rounds, "tokens": args.tokens, "made_s": made,
              "read_bandwidth": bandwidth, "rows": rows}
    (OUT / f"bytes_per_token-L{args.layers}.json").write_text(json.dumps(result, indent=2))
    head = "| file | size | size ratio | bytes/token | " + " | ".join(
        f"tg t{t} (bound) | ratio t{t} [range]" for t in args.threads) + " | ratio per CPU s, t1 |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        cells = [row["name"], f"{row['file_bytes'] / 2**30:.2f} GiB", f"{row['size_ratio']:.3f}",
                 f"{row['bytes_per_token'] / 2**20:.0f} MiB"]
        for t in args.threads:
            lo, hi = row[f"ratio_t{t}_range"]
            cells += [f"{row[f'tg_t{t}']:.2f} ({row[f'bound_t{t}']:.1f})",
                      f"{row[f'ratio_t{t}']:.3f} [{lo:.2f}-{hi:.2f}]"]
        cells.append(f"{row['cpu_ratio_t1']:.3f}" if "cpu_ratio_t1" in row else "")
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
