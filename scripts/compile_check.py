"""Does `trainer.compile=true` work for every method? Train each method's tiny synthetic config
(the test suite's) for a few steps eagerly and compiled, and compare the per-step losses.

    python scripts/compile_check.py                  # every conf/method/*.yaml, CPU
    python scripts/compile_check.py dino mae --steps 6

Too slow for the test suite (compiling takes tens of seconds per method on a CPU); run it after
changing a method or the trainer. Prints one row per method: compile wall time, the largest
relative loss difference over the steps (inductor reorders float reductions, so ~1e-5, not 0)
and the steady step time eager vs compiled.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import compose_cfg, tiny_method_overrides  # noqa: E402
from vfm import pretrain  # noqa: E402


def artifacts(root: Path) -> dict[str, Path]:
    """The tiny teacher and tokenizer files EVA / BEiT / VQ-KD need (as tests/conftest.py makes them)."""
    import torch

    from vfm.backbones import Backbone
    from vfm.heads.tokenizer import Tokenizer

    torch.manual_seed(0)
    kw = dict(img_size=28, patch_size=7, in_chans=1, model_kwargs=dict(depth=1, embed_dim=24, num_heads=2))
    teacher = Backbone("vit_tiny_patch16_224", **kw).export(root / "teacher.safetensors")
    tokenizer = Tokenizer(Backbone("vit_tiny_patch16_224", **kw), num_codes=16, code_dim=8, kmeans_init=False)
    return {"teacher": teacher, "tokenizer": tokenizer.save(root / "tokenizer.pt")}


def losses(method: str, art: dict[str, Path], run: Path, steps: int, compile: bool) -> tuple[list[float], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = compose_cfg([*tiny_method_overrides(method, art), "trainer.precision=fp32", f"trainer.max_steps={steps}",
                       "trainer.log_every_n_steps=1", "evaluator=[]", "eval.baseline=false", "logger=tensorboard",
                       f"trainer.compile={str(compile).lower()}"], run)
    t0 = time.perf_counter()
    pretrain.run(cfg)
    wall = time.perf_counter() - t0
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars("train/loss")], wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("methods", nargs="*", default=sorted(p.stem for p in (ROOT / "conf/method").glob("*.yaml")))
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args(argv)
    import torch

    rows, failed = ["| method | eager s | compiled s (incl. compiling) | max rel. loss diff |", "|---|---|---|---|"], 0
    with tempfile.TemporaryDirectory() as tmp:
        art = artifacts(Path(tmp))
        for m in args.methods:
            # a fresh compiler cache per method: every method's forward is the base class's, and
            # after 8 recompilations of one code object dynamo silently falls back to eager
            torch._dynamo.reset()
            try:
                eager, t_e = losses(m, art, Path(tmp) / f"{m}-eager", args.steps, False)
                comp, t_c = losses(m, art, Path(tmp) / f"{m}-compiled", args.steps, True)
                diff = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(eager, comp, strict=True))
                rows.append(f"| {m} | {t_e:.1f} | {t_c:.1f} | {diff:.1e} |")
                failed += diff > 1e-3
            except Exception as e:  # report and go on: one broken method must not hide the others
                rows.append(f"| {m} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120]} | | |")
                failed += 1
            print(rows[-1], flush=True)
    print("\n".join(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
