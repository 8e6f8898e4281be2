"""More than one machine through llama.cpp's RPC backend: two loopback workers plus the local CPU give
the local greedy tokens; a worker that dies mid-generation is a clear error, not a hang."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from marco_gguf.cli import app
from marco_gguf.runtime.placement import backends

pytestmark = pytest.mark.skipif("RPC" not in backends(), reason="llama.cpp built without GGML_RPC")

CLIENT = r"""
import json, sys
from marco_gguf.runtime.model import load_model
rpc = [w for w in sys.argv[2].split(",") if w]
model = load_model(sys.argv[1], n_ctx=int(sys.argv[4]), threads=1, rpc=rpc, n_gpu_layers=int(sys.argv[3]))
stream = model.stream("Marco runs on laptops, phones and desktops together.", max_tokens=int(sys.argv[5]),
                      temperature=0)
for i, _ in enumerate(stream):
    if i == 0:
        print("STARTED", flush=True)
print(json.dumps(stream.tokens), flush=True)
while len(sys.argv) > 6:  # "forever": keep generating (a random model may end its reply early) until killed
    model.complete(f"Turn {len(stream.tokens)}: keep talking.", max_tokens=64, temperature=0.8)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "marco_gguf", "rpc-server", "--port", str(port), "-t", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, f"worker exited: {proc.stderr.read()}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, f"127.0.0.1:{port}"
        except OSError:
            assert time.monotonic() < deadline, "worker did not start listening"
            time.sleep(0.2)


@pytest.fixture
def workers():
    started = [start_worker(), start_worker()]
    yield started
    for proc, _ in started:
        proc.kill()
        proc.wait(10)


def client(model, endpoints: list[str], gpu_layers: int, n_ctx: int = 256, max_tokens: int = 24, **kw):
    return subprocess.run([sys.executable, "-c", CLIENT, str(model), ",".join(endpoints), str(gpu_layers),
                           str(n_ctx), str(max_tokens)], capture_output=True, text=True, **kw)


def tokens(proc: subprocess.CompletedProcess) -> list[int]:
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_two_loopback_workers_and_the_local_cpu_give_the_local_tokens(tiny_f32, workers):
    alone = tokens(client(tiny_f32, [], 0, timeout=300))
    # 3 layers: two go to the workers, one stays on the local CPU with the embeddings
    split = tokens(client(tiny_f32, [w for _, w in workers], 2, timeout=300))
    assert len(alone) == 24 and split == alone


def test_a_worker_that_dies_mid_generation_is_a_clear_error(tiny_f32, workers):
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, str(tiny_f32), ",".join(w for _, w in workers), "-1",
                             "2048", "200", "forever"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "STARTED", proc.stderr.read()
        workers[1][0].kill()
        _, stderr = proc.communicate(timeout=120)  # a hang fails here
    finally:
        proc.kill()
    assert proc.returncode == 1
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("error: llama.cpp stopped:") and "RPC workers" in line


def test_an_unreachable_worker_is_one_line(tiny_f32):
    port = free_port()  # nothing listens there
    result = CliRunner().invoke(app, ["run", str(tiny_f32), "-p", "hi", "-n", "2", "--rpc", f"127.0.0.1:{port}"])
    assert result.exit_code == 1
    assert f"cannot reach the RPC worker at 127.0.0.1:{port}" in result.output
    bad = CliRunner().invoke(app, ["run", str(tiny_f32), "-p", "hi", "--rpc", "nohost"])
    assert bad.exit_code == 1 and "HOST:PORT" in bad.output


def test_rpc_server_refuses_a_port_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "marco_gguf", "rpc-server", "--port", str(port)],
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in proc.stderr


def test_rpc_server_warns_off_loopback():
    with socket.socket() as s:  # the port is taken, so the worker warns and stops instead of serving the network
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "marco_gguf", "rpc-server", "--host", "0.0.0.0", "--port",
                               str(port)], capture_output=True, text=True, timeout=60)
    assert "no authentication" in proc.stderr and proc.returncode == 1
