"""Shared fixtures: tiny random Marco checkpoints built with transformers, and their GGUF files.

Checkpoints are built once per session with transformers' own Qwen3MoeForCausalLM around the
real bundled tokenizer, saved in each variant the converter must read, and converted once.
"""

from __future__ import annotations

import os

# torch and llama.cpp both run OpenMP thread pools that spin while idle; interleaved in one process
# on 2 cores they starve each other (a 10x slowdown measured). Sleeping waits must be chosen before
# either library loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import copy
import json
import shutil
from pathlib import Path

import pytest

from marco_gguf.bundled import copy_tokenizer, data_path  # noqa: E402
from marco_gguf.convert import convert  # noqa: E402
from marco_gguf.quantize.recipe import uniform  # noqa: E402
from marco_gguf.tiny_checkpoint import TINY_CONFIG, write_tiny_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LLAMA_CPP_SRC = REPO / ".cache" / "llama.cpp"  # filled by scripts/fetch_llama_cpp.py

# Widths exercise both cases: gate/up/attention rows of 256 (k-quants fit) and expert down rows
# of 96 (like Marco-Nano's 384: only 32-block types fit).
TINY = dict(
    vocab_size=151936, hidden_size=256, intermediate_size=512, moe_intermediate_size=96,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=True,
    max_position_embeddings=2048, rope_theta=1000000.0, rms_norm_eps=1e-6,
    bos_token_id=151643, eos_token_id=151645,
)
# Marco-Mini's shape where it differs from Marco-Nano: experts 768 wide, so the down projections' rows hold three
# 256-weight k-quant blocks (Nano's 384 hold none). 16 heads as in Marco-Nano: at long contexts their attention
# scores, not the logits, are llama.cpp's largest compute buffer. Written with numpy: no torch needed.
MINI = TINY_CONFIG | dict(num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=768,
                          num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768)
CHATML = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] "
          "+ '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
          "{%- endif %}")


def need_torch():
    """torch, or a skip of the one test that needs it (torch comes with the `calibrate` extra; the tests that
    do not run the reference model, build a checkpoint with transformers or import torch run without it)."""
    return pytest.importorskip("torch")


def torch_dtype(dtype):
    """A torch dtype from its name ('bfloat16') or itself."""
    return getattr(need_torch(), dtype) if isinstance(dtype, str) else dtype


def build_model(seed: int = 0, dtype="bfloat16", **overrides):
    """A random Qwen3MoeForCausalLM with weights rounded to `dtype` (kept in f32 for reference runs)."""
    torch, dtype = need_torch(), torch_dtype(dtype)
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3MoeConfig(**(TINY | overrides))
    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "mlp.gate" in name:  # a decisive router, as trained models have: routing ties are rare
                p.copy_(8 * torch.randn_like(p) / p.shape[-1] ** 0.5)
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(0.05 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
            p.copy_(p.to(dtype).float())
    return model.eval()


def save_per_expert(model, folder: Path, dtype="bfloat16") -> Path:
    """transformers' own save_pretrained: one 2-D tensor per expert, one file, template in tokenizer_config."""
    dtype = torch_dtype(dtype)
    copy.deepcopy(model).to(dtype).save_pretrained(folder)  # a copy: .to() would round the RoPE buffers too
    copy_tokenizer(folder)
    return folder


def save_fused(model, folder: Path, dtype="float16", shards: int = 2) -> Path:
    """Fused 3-D experts, sharded with an index, old config key names, template in chat_template.jinja."""
    from safetensors.torch import save_file

    dtype = torch_dtype(dtype)
    folder.mkdir(parents=True)
    state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[i::shards]}
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = model.config.to_dict() | {"architectures": ["Qwen3MoeForCausalLM"]}
    config["num_experts"] = config.pop("num_local_experts", config.get("num_experts"))
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    config.pop("dtype", None)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    copy_tokenizer(folder)
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "chat_template.jinja").write_text(tok_config.pop("chat_template"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    return folder


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run as fast on one torch thread, and steadily beside llama.cpp's threads."""
    torch = need_torch()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model():
    return build_model(seed=0)


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_model, tmp_path_factory) -> Path:
    """Tied embeddings, per-expert tensors, bf16, single file."""
    return save_per_expert(tiny_model, tmp_path_factory.mktemp("ckpt") / "Marco-Tiny-Instruct")


@pytest.fixture(scope="session")
def untied_model():
    return build_model(seed=1, dtype="float16", tie_word_embeddings=False)


@pytest.fixture(scope="session")
def fused_ckpt(untied_model, tmp_path_factory) -> Path:
    """Untied, fused 3-D experts, f16, two shards with an index, chat_template.jinja."""
    return save_fused(untied_model, tmp_path_factory.mktemp("ckpt") / "Marco-Tiny-Fused")


@pytest.fixture(scope="session")
def gguf_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="session")
def tiny_f32(tiny_ckpt, gguf_dir) -> Path:
    out = gguf_dir / "tiny-f32.gguf"
    convert(tiny_ckpt, out, uniform("F32"), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_q4(tiny_ckpt, gguf_dir) -> Path:
    """Q4_K_M with Q4_0 down projections: the quantized kernels llama.cpp repacks and runs with SIMD."""
    from marco_gguf.quantize.recipe import preset

    out = gguf_dir / "tiny-Q4_K_M.gguf"
    if not out.exists():
        convert(tiny_ckpt, out, preset("Q4_K_M"), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_bf16(tiny_ckpt, gguf_dir) -> Path:
    out = gguf_dir / "tiny-bf16.gguf"
    convert(tiny_ckpt, out, uniform("BF16"), progress=False)
    return out


@pytest.fixture(scope="session")
def fused_f32(fused_ckpt, gguf_dir) -> Path:
    out = gguf_dir / "fused-f32.gguf"
    convert(fused_ckpt, out, uniform("F32"), progress=False)
    return out


@pytest.fixture(scope="session")
def mini_ckpt(tmp_path_factory) -> Path:
    """Random f16 weights in Marco-Mini's expert width (MINI), per-expert tensors, one file."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "Marco-Mini-Tiny", MINI)


@pytest.fixture(scope="session")
def mini_f16(mini_ckpt, gguf_dir) -> Path:
    out = gguf_dir / "mini-f16.gguf"
    convert(mini_ckpt, out, progress=False)  # the checkpoint's own f16
    return out


@pytest.fixture(scope="session")
def prompts() -> list[dict]:
    """The bundled multilingual prompts (30 languages)."""
    with open(data_path("multilingual", "prompts.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def one_prompt_per_language(prompts) -> list[dict]:
    seen = {}
    for p in prompts:
        seen.setdefault(p["lang"], p)
    return list(seen.values())


@pytest.fixture(scope="session")
def hf_tokenizer():
    """Hugging Face's tokenizer for the bundled files (transformers, from the `test` extra, runs it without torch)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(data_path("tokenizer")))


@pytest.fixture(scope="session")
def llama_cpp_src() -> Path:
    """llama.cpp's source tree from the llama-cpp-python sdist (scripts/fetch_llama_cpp.py)."""
    if not (LLAMA_CPP_SRC / "convert_hf_to_gguf.py").is_file():
        pytest.skip("llama.cpp source not fetched: run python scripts/fetch_llama_cpp.py")
    return LLAMA_CPP_SRC


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A writable copy of a checkpoint folder, for tests that break it."""
    shutil.copytree(src, dst)
    return dst
