#!/usr/bin/env python3
"""Merging a LoRA adapter while converting, against converting alone and against the three-step route.

    python bench/lora_merge.py [--layers 4] [--threads 2] [--rounds 2] [--rank 16] [--quant Q4_K_M] [--three-step]
                               [--lock FILE]

Uses the Marco-Nano-shaped checkpoint of common.nano_checkpoint (full width; --layers 28 is the full
16 GB model, fewer layers keep every per-layer cost) and writes beside it a PEFT LoRA adapter of rank
--rank in PEFT's own file layout for transformers >= 5: attention (target_modules), the router and the
fused experts (target_parameters), random bf16 factors. Then, in interleaved rounds from a warm page
cache: `marco-gguf convert --quant Q` and `marco-gguf convert --quant Q --lora ADAPTER`. With
--three-step, once: what users do today (transformers loads the bf16 model, PEFT loads the adapter,
merge_and_unload, save_pretrained, then convert), timed as the sum of its two processes, with the
disk the merged checkpoint takes. Goal: merge-while-converting <= 1.2x the wall of convert alone and
peak RSS within 0.5 GB of it. Each run also records its CPU seconds (user + system, of the process and
its children) and the load average before it: on a shared machine the CPU time and the per-round
ratios say more than one wall time. --lock FILE holds FILE locked (flock) during each run only, so that
another benchmark taking the same lock waits for the run, not for the whole script.
Results: bench/out/lora_merge-L{layers}-{quant}.json.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import resource
import shutil
import statistics
import sys
from pathlib import Path

from common import NANO, OUT, Run, nano_checkpoint, timed, warm

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
PARAMETERS = ["mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def make_adapter(layers: int, rank: int) -> Path:
    """A PEFT LoRA adapter folder for the Nano-shaped model, as PEFT saves one (cached in bench/out)."""
    import torch
    from safetensors.torch import save_file

    folder = OUT / f"lora-L{layers}-r{rank}"
    if (folder / "adapter_model.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    H, E, I = NANO["hidden_size"], NANO["num_experts"], NANO["moe_intermediate_size"]
    q, kv = NANO["num_attention_heads"] * NANO["head_dim"], NANO["num_key_value_heads"] * NANO["head_dim"]
    gen = torch.Generator().manual_seed(1)

    def t(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * 0.01).to(torch.bfloat16)

    tensors = {}
    for bid in range(layers):
        p = f"base_model.model.model.layers.{bid}"
        for proj, (rows, cols) in {"q_proj": (q, H), "k_proj": (kv, H), "v_proj": (kv, H), "o_proj": (H, q)}.items():
            tensors[f"{p}.self_attn.{proj}.lora_A.weight"] = t(rank, cols)
            tensors[f"{p}.self_attn.{proj}.lora_B.weight"] = t(rows, rank)
        tensors[f"{p}.mlp.gate.lora_A.weight"] = t(rank, H)
        tensors[f"{p}.mlp.gate.lora_B.weight"] = t(E, rank)
        # nested ParamWrappers: the inner one (base_layer) wraps gate_up_proj, the outer one down_proj
        tensors[f"{p}.mlp.experts.base_layer.lora_A.weight"] = t(rank * E, H)
        tensors[f"{p}.mlp.experts.base_layer.lora_B.weight"] = t(2 * I, rank * E)
        tensors[f"{p}.mlp.experts.lora_A.weight"] = t(rank * E, I)
        tensors[f"{p}.mlp.experts.lora_B.weight"] = t(H, rank * E)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0, "bias": "none",
        "target_modules": ATTENTION, "target_parameters": PARAMETERS, "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": False, "init_lora_weights": True, "task_type": "CAUSAL_LM", "inference_mode": True,
        "base_model_name_or_path": None}, indent=2))
    return folder


THREE_STEP = """
import sys, torch, transformers, peft
ckpt, adapter, out = sys.argv[1:4]
model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
model = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""


def measured(cmd: list[str], lock: str | None) -> tuple[Run, float, float]:
    """A timed run (under the lock, if any): the Run, its CPU seconds and the 1-minute load average before it."""
    with open(lock, "w") if lock else contextlib.nullcontext() as held:
        if held:
            fcntl.flock(held, fcntl.LOCK_EX)
        load = os.getloadavg()[0]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        run = timed(cmd)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return run, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--three-step", action="store_true")
    ap.add_argument("--lock", help="hold this file locked (flock) during each timed run")
    args = ap.parse_args()

    ckpt = nano_checkpoint(args.layers)
    adapter = make_adapter(args.layers, args.rank)
    out = OUT / "lora-bench.gguf"
    convert = [sys.executable, "-m", "marco_gguf", "convert", str(ckpt), "-o", str(out), "--quant", args.quant,
               "--threads", str(args.threads), "--force", "--json"]
    sides = {"convert": convert, "convert --lora": [*convert, "--lora", str(adapter)]}
    runs: dict[str, list[Run]] = {k: [] for k in sides}
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    loads: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(args.rounds):
        for name in list(sides) if r % 2 == 0 else reversed(list(sides)):
            out.unlink(missing_ok=True)  # at full size two outputs at once may not fit on the disk
            warm(ckpt)
            warm(adapter)
            try:
                run, seconds, load = measured(sides[name], args.lock)
            except BaseException:
                out.unlink(missing_ok=True)
                raise
            runs[name].append(run)
            cpu[name].append(seconds)
            loads[name].append(load)
            print(f"  round {r} {name}: wall {run.wall_s:.1f} s, CPU {seconds:.1f} s, peak RSS {run.peak_rss_mib:.0f} "
                  f"MiB (load average before: {load:.2f})", flush=True)
    out.unlink(missing_ok=True)
    wall = {k: statistics.median(x.wall_s for x in v) for k, v in runs.items()}
    rss = {k: max(x.peak_rss_mib for x in v) for k, v in runs.items()}
    cpu_s = {k: statistics.median(v) for k, v in cpu.items()}
    per_round = [b.wall_s / a.wall_s for a, b in zip(runs["convert"], runs["convert --lora"], strict=True)]
    result = {"layers": args.layers, "threads": args.threads, "rounds": args.rounds, "rank": args.rank,
              "quant": args.quant, "adapter_bytes": (adapter / "adapter_model.safetensors").stat().st_size,
              "wall_s": wall, "peak_rss_mib": rss, "wall_ratio": wall["convert --lora"] / wall["convert"],
              "rss_delta_mib": rss["convert --lora"] - rss["convert"], "cpu_s": cpu_s,
              "cpu_ratio": cpu_s["convert --lora"] / cpu_s["convert"], "wall_ratio_per_round": per_round,
              "runs": {k: [{"wall_s": x.wall_s, "cpu_s": c, "peak_rss_mib": x.peak_rss_mib, "load_before": ld}
                           for x, c, ld in zip(v, cpu[k], loads[k], strict=True)] for k, v in runs.items()}}

    if args.three_step:
        merged = OUT / f"lora-merged-L{args.layers}"
        shutil.rmtree(merged, ignore_errors=True)
        warm(ckpt)
        merge = timed([sys.executable, "-c", THREE_STEP, str(ckpt), str(adapter), str(merged)])
        shutil.copy(ckpt / "tokenizer.json", merged)
        shutil.copy(ckpt / "tokenizer_config.json", merged)
        disk = sum(p.stat().st_size for p in merged.iterdir())
        step3 = timed([*convert[:4], str(merged), *convert[5:]])
        shutil.rmtree(merged)
        out.unlink(missing_ok=True)
        result["three_step"] = {"merge_save_s": merge.wall_s, "merge_save_rss_mib": merge.peak_rss_mib,
                                "convert_s": step3.wall_s, "convert_rss_mib": step3.peak_rss_mib,
                                "wall_s": merge.wall_s + step3.wall_s,
                                "peak_rss_mib": max(merge.peak_rss_mib, step3.peak_rss_mib),
                                "intermediate_disk_bytes": disk}
        result["vs_three_step"] = wall["convert --lora"] / result["three_step"]["wall_s"]
        print(f"  three-step: merge+save {merge}, convert {step3}, {disk / 2**30:.2f} GiB on disk", flush=True)

    (OUT / f"lora_merge-L{args.layers}-{args.quant}.json").write_text(json.dumps(result, indent=2))
    print(f"\n| route ({args.layers} layers, {args.quant}, rank {args.rank}) | wall (s) | CPU (s) | peak RSS (MiB) |")
    print("|---|---|---|---|")
    for k in runs:
        print(f"| {k} | {wall[k]:.1f} | {cpu_s[k]:.1f} | {rss[k]:.0f} |")
    if args.three_step:
        ts = result["three_step"]
        print(f"| transformers merge + save, then convert | {ts['wall_s']:.1f} | {ts['peak_rss_mib']:.0f} |")
    print(f"\nmerge-while-converting: {result['wall_ratio']:.2f}x the wall of convert alone (per round: "
          f"{', '.join(f'{x:.2f}' for x in per_round)}), {result['cpu_ratio']:.2f}x its CPU time, "
          f"peak RSS {result['rss_delta_mib']:+.0f} MiB")


if __name__ == "__main__":
    main()
