"""scripts/bench/, the benchmark harness: `--quick` on the CPU writes sane numbers, and the FLOP
counting behind MFU counts a real forward + backward (also through PyTorch's CPU SDPA kernel)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from script_loader import load_script
from torch import nn

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture(scope="module")
def bench():
    """The package scripts/bench/: its command line is `bench.__main__`, its sections and helpers
    are its modules."""
    yield from load_script("bench")


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core box: OpenMP barriers of 2 threads cost more than the work."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_quick_throughput_json(bench, tmp_path, one_thread):
    bench.__main__.main(["peak", "throughput", "--quick", "--device", "cpu", "--methods", "dino,mae",
                         "--out", str(tmp_path), "--strict"])
    report = json.loads((tmp_path / "bench-cpu-quick.json").read_text())
    assert report["device"] == "cpu" and report["torch"] == torch.__version__
    peaks = {r["precision"]: r["tflops"] for r in report["sections"]["peak"]["rows"]}
    assert set(peaks) == {"fp32", "bf16"} and min(peaks.values()) > 0
    rows = {r["method"]: r for r in report["sections"]["throughput"]["rows"]}
    assert set(rows) == {"dino", "mae"}
    for r in rows.values():
        assert "error" not in r, r.get("error")
        assert r["img_s"] > 0 and 0 < r["img_s_with_data"] <= r["img_s"]
        assert r["flops_per_img"] > 0 and r["achieved_tflops"] > 0
        assert 0 < r["mfu"] < 1  # a fraction of the measured bf16 peak
        assert r["peak_tflops"] == pytest.approx(peaks["bf16"])
        assert 0 <= r["data_share"] <= 1
        assert r["batch"] == 16 and r["peak_mem_mib"] >= 0
    # DINO's step (teacher forward + student on 4 crops) is more work per image than MAE's (1 view, 25% visible)
    assert rows["dino"]["flops_per_img"] > rows["mae"]["flops_per_img"]
    md = (tmp_path / "bench-cpu-quick.md").read_text()
    assert "MFU vs measured bf16 peak" in md and torch.__version__ in md


def test_flops_count_forward_and_backward(bench):
    lin = nn.Linear(64, 32, bias=False)
    x = torch.randn(8, 64, requires_grad=True)
    fwd = 2 * 8 * 64 * 32  # 2*M*N*K
    assert bench.flops.count_step_flops(lambda: lin(x)) == fwd
    # backward: the gradients of the input and of the weight, one product each
    assert bench.flops.count_step_flops(lambda: lin(x).sum().backward()) == 3 * fwd
    x.requires_grad_(False)  # a first layer: no input gradient, so 2x
    assert bench.flops.count_step_flops(lambda: lin(x).sum().backward()) == 2 * fwd


def test_cpu_sdpa_flops_match_plain_attention(bench):
    from timm.models.vision_transformer import Attention

    attn = Attention(32, num_heads=2)
    x = torch.randn(2, 17, 32, requires_grad=True)
    counts = {}
    for fused in (False, True):
        attn.fused_attn = fused
        counts[fused] = bench.flops.count_step_flops(lambda: attn(x).sum().backward())
    assert counts[True] > 0
    assert counts[True] == pytest.approx(counts[False], rel=0.05)


def test_batch_spec(bench):
    assert bench.configs.parse_batch("64") == (64, {})
    assert bench.configs.parse_batch("dino=64,mae=256") == (None, {"dino": 64, "mae": 256})
    assert bench.configs.parse_batch("32,dino=8") == (32, {"dino": 8})
    assert bench.peak.datasheet_peak("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert bench.peak.datasheet_peak("NVIDIA H200", "bf16") == 989.0
    assert bench.peak.datasheet_peak("NVIDIA H100 PCIe", "bf16") is None


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPTS / "gpu_check.sh")], check=True)


def test_quick_augment_section_moves_fewer_bytes_deferred(bench, tmp_path, one_thread):
    report = bench.__main__.main(["augment", "--quick", "--device", "cpu", "--out", str(tmp_path), "--strict"])
    plain, deferred = report["sections"]["augment"]["rows"]
    assert plain["img_s"] > 0 and deferred["img_s"] > 0
    # uint8 images instead of 2 + 10 float crops
    assert deferred["transfer_mib"] < plain["transfer_mib"] / 4


def test_quick_e2e_lightly_section(bench, tmp_path, one_thread):
    """lightly's transforms + DataLoader + step against vfm's Trainer on the same JPEG files: a table
    with both rates and their ratio for DINO and MAE, and the machine it ran on."""
    pytest.importorskip("lightly")
    report = bench.__main__.main(["e2e_lightly", "--quick", "--device", "cpu", "--out", str(tmp_path), "--strict"])
    section = report["sections"]["e2e_lightly"]
    rows = {r["method"]: r for r in section["rows"]}
    assert set(rows) == {"dino", "mae"}
    for r in rows.values():
        assert r["lightly_img_s"] > 0 and r["vfm_img_s"] > 0
        assert r["ratio"] == pytest.approx(r["vfm_img_s"] / r["lightly_img_s"]) and r["ratio"] > 0
        assert r["batch"] == 16 and r["num_workers"] == min(2, os.cpu_count() or 1)
        assert r["timed_steps"] >= 1 and r["warmup_steps"] >= 1
    assert rows["dino"]["views"] == "2x28 + 2x14" and rows["mae"]["views"] == "1x28"
    md = section["markdown"]
    assert "| method | model, crops | batch | lightly img/s | vfm img/s | vfm / lightly |" in md
    for method in ("dino", "mae"):
        assert f"| {method} |" in md
    machine = next(line for line in md.splitlines() if line.startswith("machine: "))
    assert f"torch {torch.__version__}" in machine and "AMX" in machine and "thread(s)" in machine
    # the JPEG folder both sides read is written once and reused
    folder = tmp_path / "e2e-lightly-28px"
    assert len(list((folder / "train").rglob("*.jpg"))) >= 16 * (1 + rows["dino"]["timed_steps"])
    stamp = (folder / "done.json").stat().st_mtime_ns
    assert bench.e2e_lightly.write_image_folder(folder, 16, 28) == folder
    assert (folder / "done.json").stat().st_mtime_ns == stamp


def test_e2e_lightly_steps_are_whole_log_intervals(bench):
    steps_of = bench.e2e_lightly.steps_of
    assert steps_of(argparse.Namespace(warmup=2, steps=5)) == (2, 6)
    assert steps_of(argparse.Namespace(warmup=1, steps=2)) == (1, 2)
    assert steps_of(argparse.Namespace(warmup=0, steps=3)) == (1, 3)


def test_e2e_lightly_without_lightly(bench, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lightly", None)  # `import lightly` raises ImportError
    report = bench.__main__.main(["e2e_lightly", "--quick", "--device", "cpu", "--out", str(tmp_path)])
    section = report["sections"]["e2e_lightly"]
    assert section["rows"] == [] and "skipped: pip install 'vfm[bench]' (lightly)" in section["markdown"]


def test_runs_as_a_folder_and_documents_every_section(bench, monkeypatch, capsys):
    """`python scripts/bench` runs the package's __main__ (runpy.run_path is what it does); --help
    describes each section from its module."""
    import runpy

    monkeypatch.setattr("sys.argv", ["bench", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(SCRIPTS / "bench"), run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for section in ("peak", "throughput", "e2e", "augment", "ablation", "lightly", "e2e_lightly", "mae"):
        assert f"* `{section}`:" in out
