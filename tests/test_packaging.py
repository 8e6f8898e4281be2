"""A plain `pip install marco-gguf` from a built wheel, in a fresh virtual environment with no extras:
what a laptop or phone user who only converts and chats installs. CI's own environment has every
extra installed, so only a separate environment can show a missing dependency (click was one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = "Scripts" if sys.platform == "win32" else "bin"


def run(argv: list, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def bare(tmp_path_factory) -> Path:
    """A venv holding marco-gguf's wheel and its required dependencies only (llama-cpp-python from pip's
    wheel cache: the one the README's install built)."""
    root = tmp_path_factory.mktemp("bare")
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", root / "dist",
                 REPO], timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (root / "dist").glob("marco_gguf-*.whl")
    venv.create(root / "venv", with_pip=True)
    # should pip's cache miss, it builds llama-cpp-python the README's way
    env = dict(os.environ, CMAKE_ARGS=f"-C {REPO / 'cmake' / 'portable.cmake'}")
    installed = run([root / "venv" / BIN / "python", "-m", "pip", "install", "-q", wheel], env=env, timeout=1800)
    assert installed.returncode == 0, installed.stderr[-2000:]
    return root


def marco(bare: Path, *args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return run([bare / "venv" / BIN / "marco-gguf", *args], cwd=cwd or bare, timeout=900)


def test_the_bare_install_has_no_extras(bare):
    code = "import importlib.util as u; print([m for m in ('torch', 'fastapi', 'uvicorn', 'click') if u.find_spec(m)])"
    assert run([bare / "venv" / BIN / "python", "-c", code]).stdout.strip() == "[]"


def test_bare_install_converts_inspects_and_runs(bare):
    python = bare / "venv" / BIN / "python"
    made = run([python, "-c", "import sys; from pathlib import Path; from marco_gguf.tiny_checkpoint import "
                "write_tiny_checkpoint; write_tiny_checkpoint(Path(sys.argv[1]))",
                bare / "ckpt"], timeout=300)
    assert made.returncode == 0, made.stderr
    converted = marco(bare, "convert", bare / "ckpt", "-o", bare / "tiny.gguf", "-q", "Q4_K_M")
    assert converted.returncode == 0, converted.stderr
    inspected = marco(bare, "inspect", bare / "tiny.gguf", "--json")
    assert inspected.returncode == 0 and json.loads(inspected.stdout)["architecture"] == "qwen3moe"
    ran = marco(bare, "run", bare / "tiny.gguf", "-p", "Ciao", "-n", "4", "--greedy", "--json")
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["completion_tokens"] >= 1


def test_commands_needing_an_extra_say_which(bare):
    calibrate = marco(bare, "imatrix", bare, "-o", bare / "x.imatrix.gguf")
    assert calibrate.returncode == 1 and "pip install 'marco-gguf[calibrate]'" in calibrate.stderr
    assert "Traceback" not in calibrate.stderr
    serve = marco(bare, "serve", bare / "missing.gguf")
    assert serve.returncode == 1 and "pip install 'marco-gguf[serve]'" in serve.stderr


def test_profiles_ship_in_the_wheel(bare):
    dry = marco(bare, "build-runtime", "--profile", "portable", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    path = Path(dry.stdout.split("-C ", 1)[1].split()[0].strip("'\""))
    assert path.name == "portable.cmake" and path.is_file() and "site-packages" in str(path)
    assert "llama-cpp-python==" in dry.stdout
