"""`make bench` on a machine without CUDA: nothing is measured, nothing is written, one line says why."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from magic3d import bench

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")


def test_bench_without_a_gpu_skips_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "BENCHMARKS.md"
    assert bench.main(["--fine", "--append", str(report)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out
    assert not report.exists()


def test_fine_nerf_iteration_refuses_the_cpu() -> None:
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        bench.fine_nerf_iteration()


def test_fine_nerf_table_lists_each_batch_and_its_failure() -> None:
    rows = [bench.FineNerfTiming(8, 400.0, 100.0, 150.0, 140.0, 10.0, 30.5, 96.0),
            bench.FineNerfTiming(32, 0.0, 0.0, 0.0, 0.0, 0.0, 139.0, 0.0, error="out of memory")]
    table = bench.fine_nerf_markdown(rows)
    assert "| 8 | 400.0 | 100.0 | 150.0 | 140.0 | 10.0 | 30.5 | 96 |" in table
    assert "| 32 | out of memory | | | | | 139.0 | |" in table


def test_raster_benchmark_times_each_backend_and_keeps_a_failure_in_its_row() -> None:
    from magic3d.ops.raster import RasterTiming, benchmark_raster

    rows = benchmark_raster(n_faces=200, resolution=16, batch=1, device="cpu", repeats=1)
    assert [r.backend for r in rows] == ["torch"]  # triton and nvdiffrast only on CUDA
    assert rows[0].ms_forward_backward > 0 and not rows[0].error
    failed = RasterTiming("nvdiffrast", float("nan"), 100_000, 512, 8, error="ImportError: no")
    line = bench.raster_times([RasterTiming("torch", 33.0, 100_000, 512, 8),
                               RasterTiming("triton", 8.25, 100_000, 512, 8), failed])
    assert line == ("torch 33.0 ms, triton 8.2 ms (4.0x faster than torch), "
                    "nvdiffrast failed (ImportError: no)")
