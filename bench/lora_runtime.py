#!/usr/bin/env python3
"""What a run-time LoRA adapter costs per token, against the same model without it.

    python bench/lora_runtime.py [--layers 4] [--rank 16] [--threads 2] [--rounds 3] [--tokens 64]

Takes the Q4_K_M file of the Nano-shaped checkpoint (bench/out/marco-nano-L{layers}-Q4_K_M.gguf,
made with `marco-gguf convert --quant Q4_K_M` if missing) and the rank-16 attention + router +
experts adapter of bench/lora_merge.py, exported with `marco-gguf export-lora` (f32), then times
prompt processing (128 tokens) and greedy generation through the Python API, with and without the
adapter, in interleaved rounds (median). Results: bench/out/lora_runtime-L{layers}.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from common import OUT, nano_checkpoint
from lora_merge import make_adapter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()

    from marco_gguf.convert.lora_export import export_lora
    from marco_gguf.runtime.model import load_model

    model = OUT / f"marco-nano-L{args.layers}-Q4_K_M.gguf"
    if not model.is_file():
        subprocess.run([sys.executable, "-m", "marco_gguf", "convert", str(nano_checkpoint(args.layers)), "-o",
                        str(model), "--quant", "Q4_K_M", "--json"], check=True)
    adapter = OUT / f"lora-L{args.layers}-r{args.rank}.gguf"
    if not adapter.is_file():
        export_lora(make_adapter(args.layers, args.rank), model, adapter)
    prompt = list(range(1000, 1128))
    sides = {"model": None, "model + adapter": [(adapter, 1.0)]}
    pp: dict[str, list[float]] = {k: [] for k in sides}
    tg: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(args.rounds):
        for name in list(sides) if r % 2 == 0 else reversed(list(sides)):
            m = load_model(model, n_ctx=512, threads=args.threads, lora=sides[name])
            c = m.complete(prompt, temperature=0.0, max_tokens=args.tokens)
            pp[name].append(c.prompt_tokens_per_second or 0.0)
            tg[name].append(c.generation_tokens_per_second or 0.0)
            m.close()
            print(f"  {name}: pp {pp[name][-1]:.1f} t/s, tg {tg[name][-1]:.1f} t/s", flush=True)
    result = {"layers": args.layers, "rank": args.rank, "threads": args.threads, "rounds": args.rounds,
              "adapter_bytes": adapter.stat().st_size,
              "pp_tps": {k: statistics.median(v) for k, v in pp.items()},
              "tg_tps": {k: statistics.median(v) for k, v in tg.items()}}
    result["pp_ratio"] = result["pp_tps"]["model + adapter"] / result["pp_tps"]["model"]
    result["tg_ratio"] = result["tg_tps"]["model + adapter"] / result["tg_tps"]["model"]
    (OUT / f"lora_runtime-L{args.layers}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
