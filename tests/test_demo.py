"""`marco-gguf demo` end to end, as a user runs it: its files and what it prints, against hand-counted
expectations, llama.cpp's own reading of the file and Hugging Face's tokenizer. Needs no torch."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import llama_cpp
from gguf import GGMLQuantizationType as T
from test_doctor import llama_log

from marco_gguf.gguf_file import GGUFFile

N_LAYER = 4  # the demo checkpoint (marco_gguf/tiny_checkpoint.py): 4 layers, 16 experts (4 per token), hidden 256,
# experts 96 wide, 4 query and 2 KV heads of 64, tied embeddings of the 151936-token vocabulary
# Q4_K_M by hand: rows of 256 take Q4_K; the 96-wide down projections Q4_0 in every layer; attention V Q5_K and
# Q6_K in the more-bits layers (of 4: the 3rd and the last); the tied embedding is the output layer: Q6_K
DEMO_TYPES = {
    "token_embd.weight": T.Q6_K,
    **{f"blk.{i}.{name}.weight": t for i in range(N_LAYER) for name, t in (
        ("ffn_gate_exps", T.Q4_K), ("ffn_up_exps", T.Q4_K), ("ffn_down_exps", T.Q4_0),
        ("attn_q", T.Q4_K), ("attn_k", T.Q4_K), ("attn_output", T.Q4_K),
        ("attn_v", T.Q6_K if i >= 2 else T.Q5_K))},
}
# parameters by hand: per layer attention 256 x 64 x (2 x 4 + 2 x 2), norms 2 x 256 + 2 x 64, router 16 x 256,
# experts 16 x 3 x 256 x 96; the embedding 151936 x 256 once, the output norm 256
PARAMS = N_LAYER * (196_608 + 640 + 4_096 + 16 * 73_728) + 151_936 * 256 + 256  # 44,419,840


def test_demo_converts_runs_and_prints_what_llama_cpp_computes(tmp_path, hf_tokenizer):
    env = os.environ | {"COLUMNS": "1000"}  # one printed line per line, whatever the terminal
    proc = subprocess.run([sys.executable, "-m", "marco_gguf", "demo", "--dir", str(tmp_path), "-t", "2"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    path = tmp_path / "tiny-marco-Q4_K_M.gguf"
    assert (tmp_path / "tiny-marco" / "model.safetensors").is_file() and path.is_file()

    f = GGUFFile(path)
    assert {t.name: t.type for t in f.tensors if t.type != T.F32} == DEMO_TYPES
    assert f.get("general.size_label") == "0.044B-A0.041B"  # 44.4M weights, 40.9M of them per token
    assert re.search(r"\n   [\d.]+ MiB, 0\.044B-A0\.041B, 50 tensors, [\d.]+ s\n", out), out

    # llama.cpp reads the hyper-parameters the checkpoint's config has, and counts the same weights
    with llama_log() as log:
        llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=2, verbose=True)
    info = {m.group(1): m.group(2) for line in log if (m := re.match(r"print_info: (.+?)\s+= (.+?)\s*$", line))}
    assert {k: info.get(k) for k in ("n_layer", "n_expert", "n_expert_used", "n_ff_exp", "n_head", "n_head_kv")} \
        == {"n_layer": "4", "n_expert": "16", "n_expert_used": "4", "n_ff_exp": "96", "n_head": "4", "n_head_kv": "2"}
    assert info["model params"] == f"{PARAMS / 1e6:.2f} M"

    # step 3: the greedy continuation llama.cpp's own sampler gives on the file
    prompt = "Marco speaks 29 languages:"
    (printed,) = re.findall(r"   prompt 'Marco speaks 29 languages:' -> ('.*') \([\d.]+ s; random weights", out)
    ids = []
    for token in llm.generate(llm.tokenize(prompt.encode(), add_bos=False), temp=0.0):
        ids.append(token)
        if len(ids) == 16:
            break
    greedy = llm.detokenize(ids).decode("utf-8", errors="replace")
    llm.close()
    assert ast.literal_eval(printed) == greedy

    # step 4: the chat prompt as Hugging Face's template and tokenizer count it, and a reply of all 16 tokens
    messages = [{"role": "system", "content": "You are Marco, a multilingual assistant."},
                {"role": "user", "content": "Ciao! Come stai?"}]
    text = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert f"   2 messages -> a {len(hf_tokenizer(text)['input_ids'])}-token prompt; reply: " in out
    assert re.search(r"\n   16 tokens \(length\), [\d.]+ tokens/s\n$", out), out
