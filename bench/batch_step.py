#!/usr/bin/env python3
"""What batching can give on this machine at all: llama_decode's step time for B sequences of one token each.

llama.cpp's C API alone (no sampling, no engine, no Python per token beyond filling the batch): B sequences,
one new token each per step, 64 steps after 8 warm-up steps, best of --rounds, for B = 1, 2, 4, 8. If a step
of 4 costs more than 2.4x a step of one, no engine built on llama.cpp can run a batch job with --parallel 4 in
0.6x the time of --parallel 1 on this machine (issue 12's goal); tokens/s = B / step time.

    python bench/batch_step.py bench/out/marco-nano-L4-Q4_K_M.gguf --threads 2
    MARCO_GGUF_CPU_KERNELS=portable python bench/batch_step.py FILE      # the installed kernels only
"""

from __future__ import annotations

import argparse
import json
import time

from marco_gguf.runtime import kernels  # imported before llama_cpp: it chooses the CPU kernels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    args = ap.parse_args()
    import llama_cpp as ll

    ll.llama_backend_init()
    model = ll.llama_model_load_from_file(args.model.encode(), ll.llama_model_default_params())
    cp = ll.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_seq_max = 4096, 512, max(args.batches)
    cp.n_threads = cp.n_threads_batch = args.threads
    cp.kv_unified = True
    ctx = ll.llama_init_from_model(model, cp)
    mem = ll.llama_get_memory(ctx)
    batch = ll.llama_batch_init(512, 0, max(args.batches))

    def step(b: int, pos: int) -> None:
        batch.n_tokens = b
        for i in range(b):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = 100 + 7 * i + pos % 13, pos, 1
            batch.seq_id[i][0], batch.logits[i] = i, True
        if ll.llama_decode(ctx, batch) != 0:
            raise SystemExit("llama_decode failed")

    times: dict[int, list[float]] = {b: [] for b in args.batches}
    for _ in range(args.rounds):
        for b in args.batches:
            ll.llama_memory_clear(mem, True)
            for pos in range(8):
                step(b, pos)
            t0 = time.perf_counter()
            for pos in range(8, 72):
                step(b, pos)
            times[b].append((time.perf_counter() - t0) / 64)
    best = {b: min(v) for b, v in times.items()}
    one = best[min(best)]
    used = kernels.activate().variant or "installed"
    print(json.dumps({"model": args.model, "threads": args.threads, "kernels": used,
                      "steps": {b: {"ms": round(best[b] * 1000, 2), "over_one": round(best[b] / one, 2),
                                    "tokens_per_s": round(b / best[b], 1)} for b in best}}, indent=1))
    ll.llama_batch_free(batch)
    ll.llama_free(ctx)
    ll.llama_model_free(model)


if __name__ == "__main__":
    main()
