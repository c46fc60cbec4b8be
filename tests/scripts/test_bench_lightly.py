"""scripts/bench_lightly.py: vfm vs lightly step throughput, on the tiny model (a few seconds)."""

from __future__ import annotations

import sys

import pytest
from script_loader import load_script


@pytest.fixture(scope="module")
def bl():
    yield from load_script("bench_lightly")


@pytest.mark.parametrize("method", ["dino", "mae"])
def test_compare_tiny(bl, method):
    pytest.importorskip("lightly")
    r = bl.compare(method, setting="tiny", batch=8, steps=2, warmup=1)
    assert r["ours_img_s"] > 0 and r["theirs_img_s"] > 0
    assert r["ratio"] == pytest.approx(r["ours_img_s"] / r["theirs_img_s"])
    assert len(r["ours_step_s"]) == len(r["theirs_step_s"]) == 2
    ours, theirs = r["params"]["ours"], r["params"]["theirs"]
    # the same timm ViT on both sides; lightly's wrapper adds only its unused mask token [1, 1, D]
    assert ours["backbone"] == theirs["backbone"] > 0
    assert ours["backbone_trainable"] == theirs["backbone_trainable"]
    assert ours["head_trainable"] == theirs["head_trainable"]
    assert theirs["optimized"] - ours["optimized"] == theirs["backbone_wrapper_extra"] == 32
    # same weights and inputs: the first step's losses agree up to bf16 rounding
    assert r["first_loss"]["ours"] == pytest.approx(r["first_loss"]["theirs"], rel=2e-2)
    assert r["differences"] and all(isinstance(d, str) for d in r["differences"])
    assert "| vfm img/s |" in bl.format_table([r])


def test_fp32_losses_match_exactly(bl):
    pytest.importorskip("lightly")
    r = bl.compare("mae", setting="tiny", batch=4, steps=1, warmup=1, precision="fp32")
    assert r["first_loss"]["ours"] == pytest.approx(r["first_loss"]["theirs"], rel=1e-5)


def test_without_lightly(bl, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lightly", None)  # `import lightly` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'vfm\[bench\]' \(lightly\)"):
        bl.compare("dino", setting="tiny", batch=4, steps=1, warmup=0)
    assert bl.main(["--methods", "dino", "--setting", "tiny"]) == 2
    assert "pip install 'vfm[bench]' (lightly) for the side-by-side comparison" in capsys.readouterr().err
