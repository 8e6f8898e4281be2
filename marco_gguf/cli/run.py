"""`marco-gguf chat / run / tokenize / serve`: a Marco GGUF on llama.cpp from the command line."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from marco_gguf.cli.command import command, print_json, warn
from marco_gguf.cli.options import Json
from marco_gguf.errors import MarcoError
from marco_gguf.runtime.model import DEFAULT_CTX, KV_TYPES, MarcoModel, load_model
from marco_gguf.runtime.reasoning import FORMATS as REASONING_FORMATS
from marco_gguf.runtime.sampling import Sampling
from marco_gguf.ui import console, err

LOAD = "Loading"
SAMPLE = "Sampling"
Model = Annotated[Path, typer.Argument(help="Marco GGUF file.", show_default=False)]
Ctx = Annotated[int | None, typer.Option("--ctx", "-c", help="Context length in tokens (default: "
                                         "min(4096, the trained context)).", rich_help_panel=LOAD)]
LoadThreads = Annotated[int | None, typer.Option("--threads", "-t", help="CPU threads (default: all cores).",
                                             rich_help_panel=LOAD)]
GpuLayers = Annotated[int, typer.Option("--gpu-layers", "-ngl", help="Layers to offload to the GPU (-1: all; "
                                        "needs a GPU build).", rich_help_panel=LOAD)]
ExpertsOnCpu = Annotated[bool, typer.Option("--experts-on-cpu", help="Keep the expert weights in host memory and "
                                          "the rest on the GPU (with --gpu-layers).", rich_help_panel=LOAD)]
NCpuMoe = Annotated[int, typer.Option("--n-cpu-moe", help="Keep the expert weights of the first N layers in host "
                                      "memory.", rich_help_panel=LOAD)]
Rpc = Annotated[str | None, typer.Option("--rpc", help="llama.cpp RPC workers HOST:PORT[,HOST:PORT] (`marco-gguf "
                                        "rpc-server` on each); the layers are split across them (all unless "
                                        "--gpu-layers says).", rich_help_panel=LOAD)]
FlashAttn = Annotated[bool, typer.Option("--flash-attn", "-fa", help="Use flash attention.", rich_help_panel=LOAD)]
KvType = Annotated[str, typer.Option("--kv-type", help=f"KV-cache type: {', '.join(KV_TYPES)} "
                                     "(q8_0/q4_0 need --flash-attn).", rich_help_panel=LOAD)]
Mmap = Annotated[bool, typer.Option("--mmap/--no-mmap", help="Map the file instead of reading it into memory.",
                                    rich_help_panel=LOAD)]
Mlock = Annotated[bool, typer.Option("--mlock", help="Lock the weights in RAM (no swapping).", rich_help_panel=LOAD)]
Template = Annotated[Path | None, typer.Option("--chat-template", help="Jinja chat template file to use instead "
                                               "of the one in the GGUF.", rich_help_panel=LOAD)]
TemplateKwargs = Annotated[str | None, typer.Option(
    "--chat-template-kwargs", help='JSON object of extra template variables, e.g. \'{"enable_thinking": false}\'.')]
Temp = Annotated[float | None, typer.Option("--temp", help="Temperature (default: the model's "
                                            "general.sampling.temp, else 0.7).", rich_help_panel=SAMPLE)]
TopP = Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling (default 0.8).", rich_help_panel=SAMPLE)]
TopK = Annotated[int | None, typer.Option("--top-k", help="Top-k sampling, 0 off (default 20).",
                                          rich_help_panel=SAMPLE)]
MinP = Annotated[float | None, typer.Option("--min-p", help="Min-p sampling (default 0).", rich_help_panel=SAMPLE)]
RepeatPenalty = Annotated[float | None, typer.Option("--repeat-penalty", help="Repetition penalty (default 1, off).",
                                                     rich_help_panel=SAMPLE)]
Seed = Annotated[int | None, typer.Option("--seed", "-s", help="Random seed, for reproducible sampling.",
                                          rich_help_panel=SAMPLE)]
Greedy = Annotated[bool, typer.Option("--greedy", help="Greedy decoding (temperature 0).", rich_help_panel=SAMPLE)]
Lora = Annotated[list[Path] | None, typer.Option("--lora", help="LoRA adapter GGUF applied at run time (`marco-gguf "
                                                 "export-lora` makes one); repeatable.", rich_help_panel=LOAD)]
Parallel = Annotated[int, typer.Option(
    "--parallel", "-np", min=1, help="Sequences decoded together in one batch per step (llama-server's -np). The "
    "context (--ctx) is split evenly between them unless --kv-unified.", rich_help_panel=LOAD)]
KvUnified = Annotated[bool, typer.Option(
    "--kv-unified", help="With --parallel: one KV pool all sequences share (each may use the whole --ctx while "
    "the sum fits) instead of an even split.", rich_help_panel=LOAD)]
ExpertsPerToken = Annotated[int | None, typer.Option(
    "--experts-per-token", min=1, help="Experts each token runs (default: the trained count, 8 on Marco). "
    "Fewer read fewer bytes per token: faster generation, lower quality (BENCHMARKS.md has the trade).",
    rich_help_panel=LOAD)]
LoraScale = Annotated[list[float] | None, typer.Option("--lora-scale", help="Strength of the --lora adapters: once "
                                                       "for all, or once per --lora (default 1).",
                                                       rich_help_panel=LOAD)]


def _load(path: Path, ctx: int | None, threads: int | None, gpu_layers: int = 0, flash_attn: bool = False,
          kv_type: str = "f16", mmap: bool = True, mlock: bool = False, template: Path | None = None,
          vocab_only: bool = False, experts_on_cpu: bool = False, n_cpu_moe: int = 0,
          rpc: str | None = None, lora: list[Path] | None = None,
          lora_scale: list[float] | None = None, experts_per_token: int | None = None) -> MarcoModel:
    from marco_gguf.convert.lora import pair_scales
    from marco_gguf.runtime.rpc import parse_endpoints

    model = load_model(path, n_ctx=ctx, threads=threads, n_gpu_layers=gpu_layers, flash_attn=flash_attn,
                       kv_type=kv_type, mmap=mmap, mlock=mlock, vocab_only=vocab_only,
                       experts_on_cpu=experts_on_cpu, n_cpu_moe=n_cpu_moe, rpc=parse_endpoints(rpc),
                       lora=pair_scales(lora, lora_scale), experts_per_token=experts_per_token)
    for warning in model.warnings:
        warn(warning)
    if template is not None:
        model.set_chat_template(template.read_text(encoding="utf-8"))
    return model


# With an engine the model's own llama.cpp context serves nothing; a small one spares the memory of a second
# full KV cache (470 MiB at 4096 tokens on Marco-Nano).
ENGINE_HOST_CTX = 256


def _engine_ctx(model: MarcoModel, ctx: int | None) -> int:
    """The engine's whole context: --ctx, else what load_model would have given the model."""
    return ctx or min(DEFAULT_CTX, model.n_ctx_train or DEFAULT_CTX)


def _sampling(model: MarcoModel, temp: float | None, top_p: float | None, top_k: int | None, min_p: float | None,
              repeat_penalty: float | None, seed: int | None, greedy: bool, max_tokens: int | None) -> Sampling:
    return model.sampling.replace(temperature=0.0 if greedy else temp, top_p=top_p, top_k=top_k, min_p=min_p,
                                  repeat_penalty=repeat_penalty, seed=seed, max_tokens=max_tokens)


def _template_kwargs(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MarcoError(f"--chat-template-kwargs is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise MarcoError("--chat-template-kwargs must be a JSON object")
    return value


@command()
def chat(
    model_path: Model,
    system: Annotated[str | None, typer.Option("--system", help="System prompt.")] = None,
    tools: Annotated[Path | None, typer.Option("--tools", help="JSON file of OpenAI tool definitions to offer the "
                                               "model; its calls are shown, /tool answers them.")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", "-n", help="Longest reply in tokens "
                                                   "(default: until the end of the turn).")] = None,
    ctx: Ctx = None, threads: LoadThreads = None, gpu_layers: GpuLayers = 0, flash_attn: FlashAttn = False,
    experts_on_cpu: ExpertsOnCpu = False, n_cpu_moe: NCpuMoe = 0, rpc: Rpc = None,
    lora: Lora = None, lora_scale: LoraScale = None, experts_per_token: ExpertsPerToken = None,
    kv_type: KvType = "f16", mmap: Mmap = True, mlock: Mlock = False, chat_template: Template = None,
    chat_template_kwargs: TemplateKwargs = None,
    temp: Temp = None, top_p: TopP = None, top_k: TopK = None, min_p: MinP = None,
    repeat_penalty: RepeatPenalty = None, seed: Seed = None, greedy: Greedy = False,
) -> None:
    """Chat with the model; replies stream as they are generated. /help lists the commands."""
    from marco_gguf.runtime.chat import ChatSession, run_repl

    kwargs = _template_kwargs(chat_template_kwargs)
    model = _load(model_path, ctx, threads, gpu_layers, flash_attn, kv_type, mmap, mlock, chat_template,
                  experts_on_cpu=experts_on_cpu, n_cpu_moe=n_cpu_moe, rpc=rpc, lora=lora, lora_scale=lora_scale,
                  experts_per_token=experts_per_token)
    model.render([{"role": "user", "content": "hi"}], **kwargs)  # no template: fail now, not at the first message
    session = ChatSession(model, system, _sampling(model, temp, top_p, top_k, min_p, repeat_penalty, seed, greedy,
                                                   max_tokens), kwargs, tools=_read_json(tools, "--tools", list))
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
        err.print(f"[bold]{model.name}[/] ({model.n_ctx} tokens of context). /help for commands, Ctrl-D to leave.")

    def lines() -> Any:
        while True:
            try:
                yield input(">>> " if interactive else "")
            except EOFError:
                return

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    run_repl(session, lines(), write, lambda text: err.print(text, markup=False, highlight=False, soft_wrap=True))
    model.close()


@command()
def run(
    model_path: Model,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Prompt text; - reads it from stdin.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Tokens to generate at most.")] = 128,
    file: Annotated[Path | None, typer.Option(
        "--file", "-f", help="Batch mode: one prompt per line (.jsonl: a JSON string, {\"prompt\": ...} or "
        "{\"messages\": [...]} per line); one result per line in input order, each a JSON string (--json: an "
        "object).")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Batch mode: write the results here (default stdout). Rerunning resumes: lines "
        "already in the file are kept and their prompts skipped.")] = None,
    parallel: Parallel = 1, kv_unified: KvUnified = False,
    as_chat: Annotated[bool, typer.Option("--chat", help="Send the prompt as a user message through the "
                                          "chat template.")] = False,
    as_json: Json = False,
    json_schema: Annotated[Path | None, typer.Option("--json-schema", help="JSON schema file: the output is JSON "
                                                     "that validates against it (constrained decoding).")] = None,
    ctx: Ctx = None, threads: LoadThreads = None, gpu_layers: GpuLayers = 0, flash_attn: FlashAttn = False,
    experts_on_cpu: ExpertsOnCpu = False, n_cpu_moe: NCpuMoe = 0, rpc: Rpc = None,
    lora: Lora = None, lora_scale: LoraScale = None, experts_per_token: ExpertsPerToken = None,
    kv_type: KvType = "f16", mmap: Mmap = True, mlock: Mlock = False, chat_template: Template = None,
    chat_template_kwargs: TemplateKwargs = None,
    temp: Temp = None, top_p: TopP = None, top_k: TopK = None, min_p: MinP = None,
    repeat_penalty: RepeatPenalty = None, seed: Seed = None, greedy: Greedy = False,
) -> None:
    """Generate once from a prompt (prompt and generation speed go to stderr), or from every line of --file."""
    if (prompt is None) == (file is None):
        raise typer.BadParameter("give exactly one of --prompt or --file")
    if file is None and (output is not None or parallel > 1):
        raise typer.BadParameter("--output and --parallel go with --file (batch mode)")

    def load(n_ctx: int | None) -> MarcoModel:
        return _load(model_path, n_ctx, threads, gpu_layers, flash_attn, kv_type, mmap, mlock, chat_template,
                     experts_on_cpu=experts_on_cpu, n_cpu_moe=n_cpu_moe, rpc=rpc, lora=lora, lora_scale=lora_scale,
                     experts_per_token=experts_per_token)

    def sampling_of(model: MarcoModel) -> Sampling:
        return _sampling(model, temp, top_p, top_k, min_p, repeat_penalty, seed, greedy, max_tokens)

    if file is not None:
        _run_batch(load, sampling_of, file, output, parallel, kv_unified, ctx, max_tokens, as_chat, as_json,
                   json_schema, chat_template_kwargs)
        return
    assert prompt is not None
    if prompt == "-":
        prompt = sys.stdin.read()
    if max_tokens < 1:
        raise typer.BadParameter("--max-tokens must be at least 1")
    kwargs = _template_kwargs(chat_template_kwargs)
    schema = _read_json(json_schema, "--json-schema", dict)
    model = load(ctx)
    sampling = sampling_of(model)
    text = model.render([{"role": "user", "content": prompt}], **kwargs) if as_chat else prompt
    stream = model.stream(text, sampling, json_schema=schema)
    for piece in stream:
        if not as_json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    c = stream.completion
    assert c is not None
    pps, gps = c.prompt_tokens_per_second, c.generation_tokens_per_second
    if as_json:
        print_json({"prompt": prompt, "text": c.text, "finish_reason": c.finish_reason,
                    "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                    "prompt_tokens_per_second": pps, "generation_tokens_per_second": gps})
    else:
        sys.stdout.write("\n")
    err.print(f"prompt: {c.prompt_tokens} tokens, {_rate(pps)}; generation: {c.completion_tokens} tokens, "
              f"{_rate(gps)} ({c.finish_reason})", highlight=False)
    model.close()


def _run_batch(load: Callable[[int | None], MarcoModel], sampling_of: Callable[[MarcoModel], Sampling], file: Path,
               output: Path | None, parallel: int, kv_unified: bool, ctx: int | None, max_tokens: int, as_chat: bool,
               as_json: bool, json_schema: Path | None, chat_template_kwargs: str | None) -> None:
    """`run --file`: the prompts through the parallel engine, results in input order, resumable (batch.py).
    `load` and `sampling_of` carry run's loading and sampling options."""
    from marco_gguf.runtime.batch import completed_lines, read_prompts, run_batch
    from marco_gguf.runtime.grammar import json_schema_grammar
    from marco_gguf.ui import count_progress

    if max_tokens < 1:
        raise typer.BadParameter("--max-tokens must be at least 1")
    items = read_prompts(file)
    start = completed_lines(output) if output is not None else 0
    if start > len(items):
        raise MarcoError(f"{output} has {start} lines but {file} only {len(items)} prompts: another job's output?")
    if start:
        err.print(f"{output}: {start} of {len(items)} results already there; generating the rest", highlight=False,
                  soft_wrap=True)
    if start == len(items):
        return
    kwargs = _template_kwargs(chat_template_kwargs)
    schema = _read_json(json_schema, "--json-schema", dict)
    model = load(ENGINE_HOST_CTX)
    sampling = sampling_of(model)
    if schema is not None:
        sampling = sampling.replace(grammar=json_schema_grammar(schema))
    failed = []

    def note(i: int, result: Any) -> None:
        if isinstance(result, MarcoError):
            failed.append(i)

    try:
        with model.engine(parallel, _engine_ctx(model, ctx), unified=kv_unified) as engine, \
                (output.open("a", encoding="utf-8") if output is not None else contextlib.nullcontext(sys.stdout)) \
                as out, count_progress(len(items), "generating", enabled=output is not None) as advance:
            advance(start)
            for _ in run_batch(model, engine, items, out, start, as_chat, sampling, as_json, kwargs, note):
                advance(1)
    except KeyboardInterrupt:
        raise MarcoError(f"interrupted; rerun the same command to resume{f' from {output}' if output else ''}") \
            from None
    finally:
        model.close()
    if failed:
        raise MarcoError(f"{len(failed)} of {len(items) - start} prompts could not run (first: line {failed[0] + 1}; "
                         "its result line is empty, with --json it says why)")


def _rate(tps: float | None) -> str:
    return f"{tps:.1f} tokens/s" if tps else "- tokens/s"


@command()
def tokenize(
    model_path: Model,
    text: Annotated[str | None, typer.Argument(help="Text to tokenize.", show_default=False)] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="Tokenize each line of this file; "
                                              "one id list per line.")] = None,
    messages: Annotated[Path | None, typer.Option("--messages", "-m", help="JSON conversation (a message list, or "
                                                  "an object with messages and optional tools) to render with the "
                                                  "chat template and tokenize.")] = None,
    generation_prompt: Annotated[bool | None, typer.Option(
        "--add-generation-prompt/--no-add-generation-prompt",
        help="With --messages: end with the assistant header (default: yes unless the last message is the "
             "assistant's).")] = None,
    split_special: Annotated[bool, typer.Option("--split-special", help="Treat control tokens in the text "
                                                "(<|im_start|>, ...) as plain text.")] = False,
    chat_template: Template = None,
    chat_template_kwargs: TemplateKwargs = None,
    as_json: Json = False,
) -> None:
    """Token ids exactly as the runtime makes them (NFC-normalised, Hugging Face-compatible)."""
    if sum(x is not None for x in (text, file, messages)) != 1:
        raise typer.BadParameter("give exactly one of TEXT, --file or --messages")
    model = _load(model_path, None, None, template=chat_template, vocab_only=True)
    special = not split_special
    if messages is not None:
        conv = _read_conversation(messages)
        add = generation_prompt if generation_prompt is not None else conv.get(
            "add_generation_prompt", conv["messages"][-1].get("role") != "assistant")
        kwargs = conv.get("chat_template_kwargs", {}) | _template_kwargs(chat_template_kwargs)
        prompt = model.render(conv["messages"], tools=conv.get("tools"), add_generation_prompt=add, **kwargs)
        ids = model.tokenize(prompt, special=True)
        if as_json:
            print_json({"prompt": prompt, "ids": ids})
        else:
            console.file.write(prompt + "\n" + " ".join(map(str, ids)) + "\n")
    elif file is not None:
        lines = file.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        out = []
        for line in lines:
            ids = model.tokenize(line.removesuffix("\r"), special=special)
            out.append(json.dumps(ids) if as_json else " ".join(map(str, ids)))
        console.file.write("".join(line + "\n" for line in out))
    else:
        ids = model.tokenize(text, special=special)
        if as_json:
            print_json({"text": text, "ids": ids, "tokens": [model.vocab.text(i) for i in ids]})
        else:
            console.file.write(" ".join(map(str, ids)) + "\n")


def _read_json(path: Path | None, option: str, kind: type) -> Any:
    """The JSON value in the file an option names (None without one); one clear line when it is not JSON."""
    if path is None:
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MarcoError(f"{option} {path}: not valid JSON ({exc})") from None
    if not isinstance(value, kind):
        raise MarcoError(f"{option} {path} must hold a JSON {'object' if kind is dict else 'list'}")
    return value


def _read_conversation(path: Path) -> dict[str, Any]:
    """{"messages": [...], ...} from a JSON file holding a message list or an object with "messages"."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MarcoError(f"{path} is not valid JSON: {exc}") from None
    conv = {"messages": data} if isinstance(data, list) else data
    if not isinstance(conv, dict) or not isinstance(conv.get("messages"), list) or not conv["messages"] \
            or not all(isinstance(m, dict) for m in conv["messages"]):
        raise MarcoError(f"{path} must hold a non-empty list of messages, or an object with one under \"messages\"")
    return conv


@command()
def serve(
    model_path: Model,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (other than loopback "
                                      "needs --api-key).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8080,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="MARCO_GGUF_API_KEY",
                                                help="Require this key (Authorization: Bearer KEY).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Model id the API reports (default: the "
                                             "model's name).")] = None,
    allowed_hosts: Annotated[list[str] | None, typer.Option(
        "--allowed-hosts", help="Host names clients may use besides localhost and the --host address "
        "(comma-separated or repeated; '*': any). Others get a 403, so that a web page cannot reach the "
        "server by rebinding its domain to this address.")] = None,
    cors_origin: Annotated[list[str] | None, typer.Option(
        "--cors-origin", help="Let web pages from this origin (e.g. http://localhost:3000) call the API; "
        "repeatable, '*' for any. Default: none.")] = None,
    max_body: Annotated[float, typer.Option("--max-body", help="Largest request body in MiB (larger: 413).",
                                            min=0.001)] = 4,
    reasoning_format: Annotated[str, typer.Option(
        "--reasoning-format", help="deepseek: a reply's <think> text goes to reasoning_content (llama-server's "
        "default); none: it stays in the content. Requests may choose with reasoning_format.")] = "deepseek",
    parallel: Parallel = 1, kv_unified: KvUnified = False,
    ctx: Ctx = None, threads: LoadThreads = None, gpu_layers: GpuLayers = 0, flash_attn: FlashAttn = False,
    experts_on_cpu: ExpertsOnCpu = False, n_cpu_moe: NCpuMoe = 0, rpc: Rpc = None,
    lora: Lora = None, lora_scale: LoraScale = None, experts_per_token: ExpertsPerToken = None,
    kv_type: KvType = "f16", mmap: Mmap = True, mlock: Mlock = False, chat_template: Template = None,
    chat_template_kwargs: TemplateKwargs = None,
    temp: Temp = None, top_p: TopP = None, top_k: TopK = None, min_p: MinP = None,
    repeat_penalty: RepeatPenalty = None, seed: Seed = None,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models)."""
    from marco_gguf.runtime import server

    server.require_packages()
    server.check_host(host, api_key)
    kwargs = _template_kwargs(chat_template_kwargs)
    if reasoning_format not in REASONING_FORMATS:
        raise MarcoError(f"--reasoning-format must be one of {', '.join(REASONING_FORMATS)}")
    with server.bind(host, port) as sock:  # before the (slow) load: a port in use fails at once
        model = _load(model_path, ENGINE_HOST_CTX if parallel > 1 else ctx, threads, gpu_layers, flash_attn,
                      kv_type, mmap, mlock, chat_template, experts_on_cpu=experts_on_cpu, n_cpu_moe=n_cpu_moe,
                      rpc=rpc, lora=lora, lora_scale=lora_scale, experts_per_token=experts_per_token)
        model.sampling = _sampling(model, temp, top_p, top_k, min_p, repeat_penalty, seed, False, None)
        engine = model.engine(parallel, _engine_ctx(model, ctx), unified=kv_unified) if parallel > 1 else None
        try:
            app = server.create_app(model, name, api_key, kwargs, host=host, allowed_hosts=allowed_hosts,
                                    cors_origins=cors_origin, max_body=int(max_body * (1 << 20)),
                                    reasoning_format=reasoning_format, engine=engine)
            room = f"{model.n_ctx} tokens of context" if engine is None else \
                f"{parallel} parallel sequences, {engine.n_ctx_seq} tokens of context each"
            err.print(f"serving [bold]{name or model.name}[/] at http://{host}:{sock.getsockname()[1]}/v1 "
                      f"({room}); Ctrl-C stops", highlight=False)
            if host in server.WILDCARD_HOSTS and not allowed_hosts:  # else LAN clients' 403 would be a surprise
                err.print("clients on other machines must use a name or address given with --allowed-hosts "
                          "(only localhost, 127.0.0.1 and [::1] are answered)", highlight=False)
            server.make_server(app, sock, log_level="warning").run(sockets=[sock])
        finally:
            if engine is not None:
                engine.close()
            model.close()
