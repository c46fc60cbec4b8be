"""scripts/microbench.py --changes: the training-loader rows (persistent workers, prefetch depth) on a
tiny loader, and scripts/bench_fsdp.py (FSDP vs DDP state memory per process) through the
subprocess microbench runs it with, on a tiny DINO."""

from __future__ import annotations

import math

import pytest
from script_loader import load_script

TINY_LOADER = dict(epochs=2, batches=2, batch_size=4, num_workers=2, consume_ms=1.0)
# a 2-block ViT-Ti with a small DINO head on 32 px images: a few seconds per strategy on 2 cores
TINY_FSDP = ["--depth", "2", "--img-size", "32", "--local-crop-size", "16", "--precision", "fp32",
             "method.out_dim=256", "method.hidden_dim=64", "method.bottleneck_dim=32", "method.augment.n_local=2"]


@pytest.fixture(scope="module")
def mb():
    yield from load_script("microbench")


@pytest.mark.parametrize("setting", [{"persistent_workers": False}, {"persistent_workers": True, "prefetch_factor": 4}])
def test_loader_seconds_per_epoch(mb, setting):
    seconds = mb.loader_seconds_per_epoch(**setting, **TINY_LOADER)
    assert len(seconds) == TINY_LOADER["epochs"]
    # each epoch waits at least for its consumer's sleeps
    floor = TINY_LOADER["batches"] * TINY_LOADER["consume_ms"] / 1000
    assert all(math.isfinite(s) and s >= floor for s in seconds)


def test_loader_rows(mb):
    rows = mb.loader_rows(rounds=1, **TINY_LOADER)
    assert len(rows) == 2
    assert "persistent_workers False -> True" in rows[0] and "prefetch_factor 2 -> 4" in rows[1]
    for row in rows:
        assert row.startswith("| training DataLoader, 2 workers, 2 epochs x 2 batches of 4") and row.endswith("x) |")
        before, after = row.split("| ")[-1].split(" s/epoch")[0].split(" -> ")
        assert 0 < float(before) < math.inf and 0 < float(after) < math.inf


def test_unknown_section_is_rejected(mb):
    with pytest.raises(SystemExit):
        mb.main(["--changes", "--only", "loader,bogus"])


@pytest.mark.slow
def test_fsdp_shards_the_training_state(mb):
    report = mb.fsdp_vs_ddp("vit_tiny", steps=1, extra=TINY_FSDP, timeout_s=240)
    by = {r["strategy"]: r for r in report["rows"]}
    ddp, fsdp = by["ddp"]["per_rank"], by["fsdp"]["per_rank"]
    assert report["world_size"] == len(ddp) == len(fsdp) == 2
    assert ddp[0]["params"] == ddp[1]["params"] > 0 and ddp[0]["grads"] == ddp[1]["grads"] > 0  # replicas
    # FSDP partitions the parameters and gradients: the shards add up to one replica exactly, so
    # nothing is held twice (an unsharded root unit would be) or dropped
    for key in ("params", "grads"):
        assert sum(r[key] for r in fsdp) == ddp[0][key], key
    # and evenly: rank 0 also holds the 1-row tensors (class token, position embedding) whole,
    # +0.06% here; leaving the root unit (embeddings, DINO head) unsharded would give ~0.54
    for key in ("params", "grads", "optim", "total"):
        assert 0.49 < max(r[key] for r in fsdp) / ddp[0][key] < 0.51, key
    assert 1.95 < report["ratio_total_ddp_over_fsdp"] < 2.05
    # the same step under both strategies (fp32: same weights, data and updates up to reduction order)
    for d, f in zip(ddp, fsdp):
        assert f["loss"] == pytest.approx(d["loss"], rel=1e-4)
        assert d["ms_per_step"] > 0 and f["ms_per_step"] > 0
    rows = mb.fsdp_rows(report)
    assert "ddp -> fsdp" in rows[0] and "x less) |" in rows[0] and " ms (" in rows[1]
