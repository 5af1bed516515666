"""benchmarks/gpu_check.py: its dry mode runs the whole check on the CPU; without CUDA it fails loudly."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("gpu_check", BENCH / "gpu_check.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.slow
def test_dry_mode_trains_both_variants_in_both_precisions(gpu_check, capsys):
    assert gpu_check.main(["--device", "cpu", "--small", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    for variant in gpu_check.PAPER_TABLE5:
        for precision in ("fp32", "bf16"):
            row = next(line for line in out.splitlines() if line.startswith(f"| SAND_{variant} | {precision} |"))
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert float(cells[2]) > 0 and float(cells[4]) > 0  # measured epoch and evaluation times
            assert float(cells[5]) > 0  # measured peak memory
            first, last = (float(loss) for loss in cells[7].split("->"))
            assert math.isfinite(first) and math.isfinite(last)
            assert 0.0 <= float(cells[8]) <= 1.0
        assert f"SAND_{variant}: bf16 speed-up" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gets")
def test_without_cuda_it_fails_loudly(gpu_check, capsys):
    assert gpu_check.main([]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
