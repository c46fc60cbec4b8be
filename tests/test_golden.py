"""Golden-loss regression: 20 fp32 optimisation steps of every method config on synthetic data from
a fixed seed, compared step by step with the reference in tests/golden/<method>.json.

The training loss and the gradient norm (which catches backward-pass changes that leave the loss
alone) are read back from the run's TensorBoard event files (float32). Tolerance rtol=1e-4: on a
2-core CPU, 1 vs 2 intra-op threads moved them by at most 1.5e-6 (relative), while a mere 1% change
of the learning rate moves them by 1e-4 to 6e-3 within these 20 steps (the first update, at lr 0,
shows from step 3); a change of a loss, a schedule or an augmentation moves them far more.

Regenerate deliberately (and review the diff of tests/golden/) after an intended change:

    VFM_UPDATE_GOLDEN=1 pytest tests/test_golden.py
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from conftest import compose_cfg, tiny_method_overrides
from vfm import pretrain
from vfm.config import CONF_DIR

GOLDEN_DIR = Path(__file__).parent / "golden"
METHODS = sorted(p.stem for p in (Path(CONF_DIR) / "method").glob("*.yaml"))
STEPS = 20
# 512 synthetic images / batch 64 = 8 steps per epoch: 20 steps lie inside a 3-epoch schedule
GOLDEN_OVERRIDES = ["trainer.precision=fp32", f"trainer.max_steps={STEPS}", "trainer.max_epochs=3",
                    "trainer.log_every_n_steps=1", "evaluator=[]", "eval.baseline=false", "logger=tensorboard"]
TAGS = ("train/loss", "train/grad_norm")
RTOL, ATOL = 1e-4, 1e-6
UPDATE_ENV = "VFM_UPDATE_GOLDEN"
REGENERATE = f"regenerate deliberately: {UPDATE_ENV}=1 pytest tests/test_golden.py"


def golden_overrides(method: str, artifacts: dict[str, Path]) -> list[str]:
    return tiny_method_overrides(method, artifacts) + GOLDEN_OVERRIDES


def portable(overrides: list[str], artifacts: dict[str, Path]) -> list[str]:
    """The overrides as recorded: the session's teacher/tokenizer folder replaced by a placeholder."""
    roots = {str(Path(p).parent) for p in artifacts.values()}
    out = []
    for o in overrides:
        for root in roots:
            o = o.replace(root, "<mim_artifacts>")
        out.append(o)
    return out


def read_scalars(tb_dir: Path, tags: tuple[str, ...]) -> dict[str, dict[int, list[float]]]:
    """Every logged value of `tags` per step (size_guidance 0: none dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={SCALARS: 0})
    acc.Reload()
    available = set(acc.Tags()["scalars"])
    out: dict[str, dict[int, list[float]]] = {}
    for tag in tags:
        assert tag in available, f"{tag} not logged in {tb_dir} (scalars: {sorted(available)})"
        per_step: dict[int, list[float]] = {}
        for event in acc.Scalars(tag):
            per_step.setdefault(event.step, []).append(event.value)
        out[tag] = per_step
    return out


def first_mismatch(expected: list[float], got: list[float]) -> int | None:
    """Index of the first value outside |got - expected| <= ATOL + RTOL * |expected| (NaN never matches)."""
    for i, (e, g) in enumerate(zip(expected, got)):
        if not (math.isfinite(g) and abs(g - e) <= ATOL + RTOL * abs(e)):
            return i
    return None


@pytest.mark.parametrize("method", METHODS)
def test_golden_losses(method, mim_artifacts, tmp_path, capsys):
    overrides = golden_overrides(method, mim_artifacts)
    run_dir = tmp_path / "run"
    pretrain.run(compose_cfg(overrides, run_dir))

    scalars = read_scalars(run_dir / "tb", TAGS)
    steps = list(range(1, STEPS + 1))
    got: dict[str, list[float]] = {}
    for tag, per_step in scalars.items():
        assert sorted(per_step) == steps and all(len(v) == 1 for v in per_step.values()), (
            f"{method}: expected exactly one {tag} per step 1..{STEPS}, got "
            f"{ {s: len(v) for s, v in sorted(per_step.items())} }"
        )
        got[tag] = [per_step[s][0] for s in steps]

    path = GOLDEN_DIR / f"{method}.json"
    recorded = portable(overrides, mim_artifacts)
    if os.environ.get(UPDATE_ENV) == "1":
        GOLDEN_DIR.mkdir(exist_ok=True)
        ref = {"method": method, "overrides": recorded, "steps": steps, **got, "torch": torch.__version__,
               "note": REGENERATE}
        # one key a line; json writes Python floats exactly (their repr), float32 values included
        path.write_text("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in ref.items()) + "\n}\n")
        with capsys.disabled():
            print(f"\n[golden] wrote {path} ({method}: {STEPS} steps, loss {got['train/loss'][0]:.6g} -> "
                  f"{got['train/loss'][-1]:.6g})")
        return

    if not path.is_file():  # never created silently: a new reference is a deliberate, reviewed change
        pytest.fail(f"{method}: no golden reference {path}; {REGENERATE}", pytrace=False)
    ref = json.loads(path.read_text())
    assert ref["steps"] == steps, f"{method}: {path} records steps {ref['steps']}, expected 1..{STEPS}; {REGENERATE}"
    bad = {tag: i for tag in TAGS if (i := first_mismatch(ref[tag], got[tag])) is not None}
    if not bad:
        return
    first = min(bad.values())
    lines = [f"{method}: training diverges from {path.name} first at step {steps[first]} "
             f"(tolerance rtol={RTOL}, atol={ATOL})"]
    for tag, i in bad.items():
        e, g = ref[tag][i], got[tag][i]
        rel = abs(g - e) / abs(e) if e else math.inf
        lines += [
            f"  {tag}: first differs at step {steps[i]}: expected {e!r}, got {g!r} (relative difference {rel:.3g})",
            f"    expected: {' '.join(f'{v:.7g}' for v in ref[tag])}",
            f"    got:      {' '.join(f'{v:.7g}' for v in got[tag])}",
        ]
    old_ov = ref.get("overrides") or []
    if old_ov != recorded:
        lines.append(f"  note: overrides changed since recorded: removed {[o for o in old_ov if o not in recorded]}, "
                     f"added {[o for o in recorded if o not in old_ov]}")
    if ref.get("torch") != torch.__version__:
        lines.append(f"  note: recorded with torch {ref.get('torch')}, running {torch.__version__}")
    lines.append(f"  if the change is intended, {REGENERATE}")
    pytest.fail("\n".join(lines), pytrace=False)
