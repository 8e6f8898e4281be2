"""The library prints nothing: convert, quantize and verify hand their warnings back and report progress to a
callback only when given one; the CLI prints both (test_convert_errors.py sees its warning lines)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_convert_errors import SMALL

from marco_gguf.convert import convert
from marco_gguf.quantize.from_gguf import quantize_file
from marco_gguf.quantize.recipe import preset
from marco_gguf.tiny_checkpoint import write_tiny_checkpoint

NO_MATCH = "--tensor-type no_such_tensor=Q4_0 matches no tensor"


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("quiet") / "small", SMALL)


def stale_partial(out: Path) -> Path:
    """The partial a killed writer of `out` would have left (its PID is that of an ended process)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    path = out.with_name(f".{out.name}.{proc.pid}.partial")
    path.write_bytes(b"GGUF")
    return path


class Recorder:
    """A Progress callback that keeps what it was told."""

    def __init__(self) -> None:
        self.bars: list[list] = []

    @contextlib.contextmanager
    def __call__(self, total: int, description: str, unit: str):
        bar = [total, description, unit, 0]
        self.bars.append(bar)

        def advance(n: int) -> None:
            bar[3] += n

        yield advance


def test_convert_and_quantize_print_nothing_and_return_their_warnings(small_ckpt, tmp_path, capfd):
    recipe = preset("Q8_0").with_overrides(["no_such_tensor=Q4_0"])
    imatrix = {"blk.0.attn_q.weight": np.ones((1, 64), np.float32)}  # no data for the other tensors
    out = tmp_path / "small-Q8_0.gguf"
    stale = stale_partial(out)
    result = convert(small_ckpt, out, recipe, threads=1, imatrix=imatrix)
    requantized = tmp_path / "again-Q8_0.gguf"
    again = quantize_file(convert(small_ckpt, tmp_path / "small-f16.gguf").path, requantized, recipe, threads=1)
    assert capfd.readouterr() == ("", "")

    assert result.warnings[0].startswith("the importance matrix has no data for blk.0.attn_k.weight and ")
    assert result.warnings[1:] == [NO_MATCH, f"removed {stale} (4 B), left by an earlier write of {out.name} that did "
                                   f"not finish (process {stale.name.split('.')[3]} no longer runs)"]
    assert again.warnings == [NO_MATCH] and again.path == requantized
    assert again.recipe.name == "Q8_0" and len(again.jobs) == len(result.jobs)


def test_progress_goes_to_the_callback_it_is_given(small_ckpt, tmp_path, capfd):
    progress = Recorder()
    result = convert(small_ckpt, tmp_path / "small.gguf", preset("Q8_0"), threads=2, progress=progress)
    assert capfd.readouterr() == ("", "")
    ((total, description, unit, done),) = progress.bars
    assert unit == "bytes" and description == "writing Q8_0"
    assert total == done == sum(j.source_nbytes for j in result.jobs)


def test_verify_prints_nothing(small_ckpt, tmp_path, capfd):
    pytest.importorskip("torch")
    from marco_gguf.calibrate.reference import ReferenceModel
    from marco_gguf.calibrate.text import load_samples
    from marco_gguf.calibrate.verify import verify

    model = convert(small_ckpt, tmp_path / "small-Q8_0.gguf", preset("Q8_0")).path
    capfd.readouterr()
    progress = Recorder()
    with ReferenceModel(small_ckpt, threads=1) as ref:
        samples, _ = load_samples(ref.path, None, "evaluation", 64)
        report = verify(model, ref, samples, threads=1, floor=True, progress=progress)
    assert capfd.readouterr() == ("", "")
    assert report["floor_type"] == "F16" and report["floor"]["overall"]["top1"] >= report["model"]["overall"]["top1"]
    assert [unit for _, _, unit, _ in progress.bars] == ["tokens", "tokens", "bytes", "tokens"]
    assert all(total == done for total, _, _, done in progress.bars)
