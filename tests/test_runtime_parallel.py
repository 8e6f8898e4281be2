"""Parallel decoding (issue 12): the engine from Python, `serve --parallel` through the openai client and
httpx, and batch mode (`run --file`). The single-request server tests run again here against the engine."""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from test_runtime_server import (  # noqa: F401  (collected again here, against the parallel server)
    openai_client,
    serving,
    test_chat_completion_with_and_without_streaming,
    test_malformed_requests_get_4xx_and_the_server_keeps_running,
    test_text_completion,
)
from typer.testing import CliRunner

from marco_gguf.cli import app
from marco_gguf.runtime import server
from marco_gguf.runtime.batch import BatchItem, completed_lines, read_prompts, run_batch
from marco_gguf.runtime.engine import GreedySplit, compare_greedy
from marco_gguf.runtime.guided import TokenLogprob
from marco_gguf.runtime.model import load_model

PROMPTS = ["Marco runs on phones", "Hello", "The capital of France is Paris, and the capital of Italy is",
           "1 2 3 4 5 6", "Ciao! Come stai oggi?"]


@pytest.fixture(scope="module")
def model(tiny_f32):
    m = load_model(tiny_f32, n_ctx=512, threads=1)
    yield m
    m.close()


@pytest.fixture(scope="module")
def engine(model):
    """Two sequences sharing the 512-token pool (unified: each may use all of it, as the single-request tests
    expect)."""
    e = model.engine(2, unified=True)
    yield e
    e.close()


class Recording:
    """The engine, with every stream the server starts kept in `streams` (to see how each one ended)."""

    def __init__(self, engine):
        self.engine, self.streams = engine, []

    def stream(self, *args, **kwargs):
        s = self.engine.stream(*args, **kwargs)
        self.streams.append(s)
        return s

    def __getattr__(self, name):
        return getattr(self.engine, name)


@pytest.fixture(scope="module")
def recording(engine):
    return Recording(engine)


@pytest.fixture(scope="module")
def base_url(model, recording):
    with serving(server.create_app(model, "marco-tiny", engine=recording)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai_client(base_url)


def _settle(engine) -> None:
    """Wait until the engine has no sequence and no queue (streams end on the engine thread)."""
    deadline = time.monotonic() + 60
    while engine.busy() != (0, 0):
        assert time.monotonic() < deadline, f"engine still busy: {engine.busy()}"
        time.sleep(0.01)


@contextlib.contextmanager
def held(engine):
    """The engine's decode steps wait while the yielded gate is clear (admission and cancellation go on), so a
    test can line requests up in a known state instead of racing the decoder."""
    gate = threading.Event()
    step = engine._step
    engine._step = lambda: (gate.wait(), step())
    try:
        yield gate
    finally:
        gate.set()
        del engine._step


def _until(condition, what: str) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, f"waited too long for {what}"
        time.sleep(0.005)


# ---------------------------------------------------------------- the engine from Python


def test_greedy_together_equals_alone_except_near_ties(model, tiny_f32):
    """Four prompts decoded in one batch give each prompt's alone output, except where the alone run's top-2
    margin is below the measured batched-vs-single difference (then the split is a near tie, as in the ARM
    check); any other split fails."""
    alone = [model.complete(p, max_tokens=24, temperature=0, logprobs=2) for p in PROMPTS[:4]]
    with model.engine(4) as four:
        together = dict(four.complete_many(PROMPTS[:4], max_tokens=24, temperature=0, logprobs=2))
    splits = []
    for i, a in enumerate(alone):
        b = together[i]
        split = compare_greedy(a.logprobs, b.logprobs)
        if split is None:
            assert (b.text, b.finish_reason, b.completion_tokens) == (a.text, a.finish_reason, a.completion_tokens)
        else:
            assert split.explained, f"prompt {i}: {split} is not a near tie"
            splits.append(split)
    assert len(splits) < len(alone)  # a batch that changed every output is broken, whatever the margins


def test_compare_greedy_tells_near_ties_from_real_differences():
    same = [TokenLogprob(5, -0.1, ((5, -0.1), (7, -2.0)))]
    assert compare_greedy(same, same) is None
    alone = same + [TokenLogprob(1, -0.69, ((1, -0.69), (2, -0.70)))]
    flipped = [TokenLogprob(5, -0.1 + 0.02, ((5, -0.08), (7, -2.0))), TokenLogprob(2, -0.69, ((2, -0.69),))]
    split = compare_greedy(alone, flipped)
    assert split == GreedySplit(1, pytest.approx(0.01), pytest.approx(0.02)) and split.explained
    wide = same + [TokenLogprob(1, -0.1, ((1, -0.1), (2, -3.0)))]
    assert not compare_greedy(wide, flipped).explained  # a margin of 2.9 cannot flip by a 0.02 difference


def test_sampling_seeds_grammar_and_prefix_reuse(model, engine):
    """Per-sequence seeds give the single path's tokens; a grammar holds per sequence; a returning prompt that
    extends a finished one lands in its slot and reads only the new part."""
    single = model.complete("Marco", max_tokens=8, temperature=0.9, seed=11)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    with ThreadPoolExecutor(3) as pool:
        sampled = pool.submit(engine.complete, "Marco", max_tokens=8, temperature=0.9, seed=11)
        other = pool.submit(engine.complete, "Hello", max_tokens=8, temperature=0.9, seed=12)
        constrained = pool.submit(engine.complete, "Marco", max_tokens=40, temperature=0, json_schema=schema)
        assert sampled.result().text == single.text
        assert other.result().completion_tokens >= 1
        assert "n" in json.loads(constrained.result().text)
    alone = model.complete(PROMPTS[0], max_tokens=12, temperature=0)
    stop = alone.text[len(alone.text) // 2:][:3]  # a stop string from the middle of the greedy text
    stopped = model.complete(PROMPTS[0], max_tokens=12, temperature=0, stop=[stop])
    assert engine.complete(PROMPTS[0], max_tokens=12, temperature=0, stop=[stop]).text == stopped.text
    assert stopped.finish_reason == "stop" and len(stopped.text) < len(alone.text)
    ids = model.tokenize(PROMPTS[2])
    first = engine.stream(ids, max_tokens=6, temperature=0)
    first.wait()
    follow = ids + first.tokens + model.tokenize(" and then")
    again = engine.stream(follow, max_tokens=2, temperature=0)
    c = again.wait()
    assert again.slot == first.slot
    assert c.prompt_evaluated <= len(follow) - len(ids)


def test_engine_applies_the_models_lora_adapters(tiny_model, tiny_f32, tmp_path):
    """The engine's own context activates the run-time adapters the model was loaded with, at their scale: its
    greedy text is the single path's with the adapter, not the base model's."""
    pytest.importorskip("peft")
    from test_lora import ATTENTION, make_adapter

    from marco_gguf.convert.lora_export import export_lora

    make_adapter(tiny_model, tmp_path / "peft", 6, r=4, lora_alpha=8, target_modules=ATTENTION)
    adapter = tmp_path / "adapter.gguf"
    export_lora(tmp_path / "peft", tiny_f32, adapter)
    texts = []
    for lora in ([(adapter, 0.7)], None):
        m = load_model(tiny_f32, n_ctx=256, threads=1, kv_type="f32", lora=lora)
        try:
            alone = m.complete("Marco speaks", max_tokens=12, temperature=0).text
            with m.engine(2) as e:
                assert e.complete("Marco speaks", max_tokens=12, temperature=0).text == alone
            texts.append(alone)
        finally:
            m.close()
    assert texts[0] != texts[1]  # the adapter matters


def test_queueing_beyond_n_and_cancel_frees_the_slot(model, engine):
    """With both slots busy a third stream waits (not even its prompt read); cancelling one running stream
    frees its slot and KV cells at once, and the waiting one runs there."""
    import llama_cpp

    _settle(engine)
    long = dict(max_tokens=200, temperature=0)  # both fit the 512-token pool together
    a, b = engine.stream("Marco runs on phones", **long), engine.stream("Hello there", **long)
    waiting = engine.stream("1 2 3", max_tokens=5, temperature=0)
    threads = [threading.Thread(target=s.wait, daemon=True) for s in (a, b, waiting)]
    with held(engine) as gate:
        for s, t in zip((a, b, waiting), threads, strict=True):
            t.start()
            _until(lambda s=s: s.slot is not None or s in [q[0] for q in engine._queue], "the stream to arrive")
        gate.set()
        _until(lambda: a.tokens and b.tokens, "both to generate")
        assert engine.busy() == (2, 1) and waiting.slot is None and waiting.evaluated == 0
        gate.clear()  # hold the next step: a and b cannot end on their own meanwhile
        a.cancel()
        gate.set()
    threads[2].join(60)
    assert waiting.slot == a.slot
    threads[0].join(60)
    assert a.completion.finish_reason == "cancelled"
    assert waiting.completion.completion_tokens == model.complete("1 2 3", max_tokens=5, temperature=0) \
        .completion_tokens
    b.cancel()
    threads[1].join(60)
    _settle(engine)
    assert b.completion.finish_reason == "cancelled"
    # b's cells went at once: its slot holds nothing (its number was not reused since)
    assert llama_cpp.llama_memory_seq_pos_max(engine.mem, b.slot) == -1


def test_a_full_unified_pool_ends_only_the_youngest_sequence(engine):
    """Two sequences that together outgrow the shared 512-token pool: the younger one ends with an error that
    says so, the older one runs to its length."""
    from marco_gguf.errors import MarcoError

    _settle(engine)
    older, younger = engine.stream("Marco", max_tokens=300, temperature=0), \
        engine.stream("Hello", max_tokens=300, temperature=0)
    errors = []

    def run(s):
        try:
            s.wait()
        except MarcoError as exc:
            errors.append((s, str(exc)))

    with held(engine):
        threads = [threading.Thread(target=run, args=(s,), daemon=True) for s in (older, younger)]
        for s, t in zip((older, younger), threads, strict=True):
            t.start()
            _until(lambda s=s: s.slot is not None or s in [q[0] for q in engine._queue], "the stream to arrive")
    for t in threads:
        t.join(120)
    assert [(s, "is full" in message) for s, message in errors] == [(younger, True)]
    assert older.completion.finish_reason == "length" and older.completion.completion_tokens == 300
    _settle(engine)


# ---------------------------------------------------------------- serve --parallel


def test_concurrent_streams_complete_with_their_counts(client, model):
    """More requests than slots, streamed and not, each with its own max_tokens: every one gets its own text,
    token count and finish reason, as it would alone."""
    jobs = [(p, 3 + 2 * i, i % 2 == 1) for i, p in enumerate(PROMPTS)]

    def ask(job):
        prompt, n, stream = job
        if not stream:
            reply = client.completions.create(model="marco-tiny", prompt=prompt, max_tokens=n, temperature=0)
            return reply.choices[0].text, reply.choices[0].finish_reason, reply.usage.completion_tokens
        chunks = list(client.completions.create(model="marco-tiny", prompt=prompt, max_tokens=n, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        return "".join(c.choices[0].text for c in chunks if c.choices), finish, chunks[-1].usage.completion_tokens

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    for (prompt, n, _), answer in zip(jobs, answers, strict=True):
        alone = model.complete(prompt, max_tokens=n, temperature=0)
        assert answer == (alone.text, alone.finish_reason, alone.completion_tokens)


def test_disconnect_mid_batch_frees_its_slot(base_url, client, recording, model):
    """A streaming client that leaves while another request generates beside it: its sequence is cancelled and
    its cells freed, the other finishes with its full answer, and the health check shows idle slots again."""
    _settle(recording.engine)
    before = len(recording.streams)
    expected = model.complete("Ciao", max_tokens=60, temperature=0)
    with ThreadPoolExecutor(1) as pool:
        with httpx.stream("POST", base_url + "/v1/completions", json={"prompt": "Marco runs", "stream": True,
                                                                       "max_tokens": 400, "temperature": 0}) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            other = pool.submit(client.completions.create, model="marco-tiny", prompt="Ciao", max_tokens=60,
                                temperature=0)
            deadline = time.monotonic() + 60
            while len(recording.streams) < before + 2 or recording.streams[before + 1].slot is None:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            next(line for line in lines if line.startswith("data: "))
        # the first client is gone here, the other one is still being answered beside it or after it
        reply = other.result()
    assert (reply.choices[0].text, reply.usage.completion_tokens) == (expected.text, expected.completion_tokens)
    _settle(recording.engine)
    left = recording.streams[before]
    _until(lambda: left.completion is not None, "the left stream's reader to finish")
    assert left.completion.finish_reason == "cancelled" and left.completion.completion_tokens < 400
    health = httpx.get(base_url + "/health").json()
    assert health["slots_idle"] == 2 and health["slots_processing"] == 0 and health["requests_waiting"] == 0


def test_a_streaming_client_that_leaves_while_queued_costs_nothing(base_url, recording):
    """Both slots busy, a third streaming request waits; its client leaves: it is dropped from the queue without
    its prompt being read (the server does not wait for a token that would never come), and the two running
    ones are unaffected."""
    engine = recording.engine
    _settle(engine)
    before = len(recording.streams)
    body = {"stream": True, "max_tokens": 200, "temperature": 0}
    with held(engine) as gate, contextlib.ExitStack() as clients:
        first = clients.enter_context(httpx.stream("POST", base_url + "/v1/completions",
                                                   json=body | {"prompt": "Marco runs"}))
        lines = [first.iter_lines()]  # kept: a dropped iterator closes the connection
        next(lines[0])
        _until(lambda: engine.busy() == (1, 0), "the first request in a slot")
        second = clients.enter_context(httpx.stream("POST", base_url + "/v1/completions",
                                                    json=body | {"prompt": "Hello there"}))
        lines.append(second.iter_lines())
        next(lines[1])
        _until(lambda: engine.busy() == (1, 1), "the second request queued (the held step)")
        with httpx.stream("POST", base_url + "/v1/completions", json=body | {"prompt": "1 2 3"}) as third:
            lines.append(third.iter_lines())
            next(lines[2])
            _until(lambda: engine.busy() == (1, 2), "the third request queued")
            queued = recording.streams[before + 2]
        del lines[2]
        _until(queued._cancelled.is_set, "the server to cancel the queued stream of a client that left")
        gate.set()
        _until(lambda: queued.completion is not None, "the queued stream to end")
        assert queued.completion.finish_reason == "cancelled" and queued.completion.completion_tokens == 0
        assert queued.slot is None and queued.evaluated == 0
        _until(lambda: recording.streams[before + 1].slot is not None, "the second request to run after all")
    _settle(engine)


def test_serve_parallel_option_reaches_the_app(tiny_f32, monkeypatch):
    """`serve --parallel 3 --kv-unified` builds the app with a 3-sequence engine (the server itself is not run)."""
    seen = {}

    def fake_app(model, *args, engine=None, **kwargs):
        seen["engine"] = (engine.n_parallel, engine.unified, engine.n_ctx_seq)
        raise SystemExit(0)

    monkeypatch.setattr(server, "create_app", fake_app)
    result = CliRunner().invoke(app, ["serve", str(tiny_f32), "--parallel", "3", "--kv-unified", "-c", "768",
                                      "-t", "1", "--port", "0"])
    assert result.exit_code == 0, result.output
    assert seen["engine"] == (3, True, 768)


# ---------------------------------------------------------------- batch mode


def test_batch_output_is_in_input_order_and_resumes(model, engine, tmp_path):
    """Results come back out of order (short ones overtake long ones) but lines go out in input order; a run
    stopped after two lines leaves exactly those two; a torn last line is dropped; the rerun finishes the file
    to the same bytes as an uninterrupted run."""
    items = [BatchItem(prompt=p) for p in PROMPTS] + [BatchItem(prompt="")]
    sampling = model.sampling.replace(temperature=0.0, max_tokens=6)
    whole = io.StringIO()
    assert list(run_batch(model, engine, items, whole, sampling=sampling, as_json=True)) == list(range(len(items)))
    lines = whole.getvalue().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["index"] for r in records] == list(range(len(items)))
    assert records[0]["text"] == model.complete(PROMPTS[0], max_tokens=6, temperature=0).text
    assert "empty" in records[-1]["error"]

    out = tmp_path / "out.jsonl"
    with out.open("a", encoding="utf-8") as f:
        for i in run_batch(model, engine, items, f, sampling=sampling, as_json=True):
            if i == 1:
                break  # interrupted after two lines
    _settle(engine)
    assert out.read_text(encoding="utf-8").splitlines() == lines[:2]
    with out.open("a", encoding="utf-8") as f:
        f.write('{"index": 2, "te')  # killed in mid-write
    assert completed_lines(out) == 2 and out.read_text(encoding="utf-8").splitlines() == lines[:2]
    with out.open("a", encoding="utf-8") as f:
        list(run_batch(model, engine, items, f, start=2, sampling=sampling, as_json=True))
    assert out.read_text(encoding="utf-8").splitlines() == lines


def test_batch_cli_writes_lines_and_resumes(tiny_f32, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(x) + "\n" for x in
                               ["Marco", {"prompt": "Hello"}, {"messages": [{"role": "user", "content": "Hi"}]}]))
    assert [i.source() for i in read_prompts(prompts)] == ["Marco", "Hello", [{"role": "user", "content": "Hi"}]]
    out = tmp_path / "out.txt"
    args = ["run", str(tiny_f32), "--file", str(prompts), "--parallel", "2", "-n", "4", "--greedy", "-t", "1",
            "-c", "256", "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    texts = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    first = out.read_text(encoding="utf-8")
    out.write_text(first.split("\n", 1)[0] + "\n", encoding="utf-8")  # as if stopped after one line
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and "1 of 3 results already there" in result.output
    assert out.read_text(encoding="utf-8") == first
    bad = CliRunner().invoke(app, ["run", str(tiny_f32), "-p", "x", "--parallel", "2"])
    assert bad.exit_code != 0 and "--file" in bad.output
