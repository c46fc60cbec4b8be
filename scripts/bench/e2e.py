"""`e2e`: `Trainer.fit` of the DINO recipe (whatever --backbone/--img say) on decoded Fashion-MNIST
(synthetic images when it is absent) with `trainer.num_workers` 0 and 2: the trainer's own
images/s (its `perf/images_per_s` over the logged intervals after the first, which holds worker
start-up), next to the compute-only and the serial data+compute numbers of `throughput` for the
same configuration, so a data bottleneck shows; and with 2 workers plus
`trainer.augment_on_device=true` (the workers only stack uint8 images, the training process
augments after the transfer)."""

from __future__ import annotations

import tempfile
import time
from typing import Any

from .common import Context, release, row, table
from .configs import build_collate, compose_cfg, method_overrides, recipe_args
from .measure import Spec, measure

SETTINGS = ((0, False), (2, False), (2, True))  # (num_workers, augment_on_device)


def section_e2e(ctx: Context) -> dict[str, Any]:
    """Trainer.fit of the DINO recipe on decoded images, num_workers 0 and 2."""
    base, splits, dataset_note = _dataset(ctx)
    rows = [trainer_rate(ctx, base, splits, workers, on_device) | {"dataset": dataset_note}
            for workers, on_device in SETTINGS]
    thr = _throughput_row(ctx, rows[0]["batch"])
    md = table(f"### End to end: `Trainer.fit`, DINO recipe, {dataset_note}, batch {rows[0]['batch']}, "
               f"{ctx.args.precision}",
               ["num_workers", "augmentation", "trainer img/s (steady)", "trainer img/s (incl. start-up)",
                "compute-only img/s (`throughput`)", "data+compute serial img/s (`throughput`)",
                "trainer / compute-only"])
    for r in rows:
        r["compute_only_img_s"], r["serial_img_s"] = thr["img_s"], thr.get("img_s_with_data")
        where = f"on the {ctx.device.type} (augment_on_device)" if r["augment_on_device"] else "in the loader"
        md.append(row([str(r["num_workers"]), where, f"{r['img_s']:.1f}", f"{r['img_s_incl_startup']:.1f}",
                       f"{thr['img_s']:.1f}", f"{thr.get('img_s_with_data', float('nan')):.1f}",
                       f"{r['img_s'] / thr['img_s']:.2f}"]))
    return {"rows": rows, "markdown": "\n".join(md)}


def _dataset(ctx: Context) -> tuple[list[str], Any, str]:
    """The run's overrides, its dataset splits (Fashion-MNIST, else synthetic) and a note saying which."""
    from hydra.utils import instantiate

    args = ctx.args
    log_every = 2 if args.quick else 5
    max_steps = log_every * (3 if args.quick else 5)
    base = method_overrides("dino", recipe_args(args))
    base += ["logger=none", "evaluator=[]", "eval.baseline=false", "trainer.progress=false", "trainer.resume=never",
             f"trainer.max_steps={max_steps}", f"trainer.log_every_n_steps={log_every}",
             f"trainer.device={ctx.device.type}", f"trainer.precision={args.precision}"]
    if args.quick:
        base.append("trainer.batch_size=16")
    try:
        return base, instantiate(compose_cfg(base).dataset), "Fashion-MNIST (decoded, in memory)"
    except Exception as e:  # noqa: BLE001 - any reason the files are missing
        print(f"e2e: Fashion-MNIST unavailable ({type(e).__name__}: {e}); using dataset=synthetic", flush=True)
        base += ["dataset=synthetic", "dataset.num_train=8192"]
        return base, instantiate(compose_cfg(base).dataset), "synthetic (Fashion-MNIST not found)"


def trainer_rate(ctx: Context, base: list[str], splits: Any, workers: int, on_device: bool,
                 label: str = "e2e") -> dict[str, Any]:
    """One short `Trainer.fit` of the config `base` composes on `splits.train`; its steady images/s
    is the harmonic mean of the logged intervals after the first (equal intervals, so: their images
    over their time), the first holding the workers' start-up."""
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from vfm.engine.logging import NullLogger
    from vfm.pretrain import build_method, encoder_prefix

    class Recorder(NullLogger):
        def __init__(self) -> None:
            super().__init__()
            self.ips: list[float] = []

        def log_scalars(self, values: dict[str, float], step: int) -> None:
            if "perf/images_per_s" in values:
                self.ips.append(float(values["perf/images_per_s"]))

    c = compose_cfg(base + [f"trainer.num_workers={workers}", f"trainer.augment_on_device={on_device}"])
    with tempfile.TemporaryDirectory(dir=ctx.tmp) as run_dir, open_dict(c):
        c.paths.output_dir = run_dir
        method = build_method(c)
        collate = build_collate(c, method)
        schedules = {k: instantiate(v) for k, v in (c.method.get("schedules") or {}).items()}
        trainer = instantiate(c.trainer)
        rec = Recorder()
        t0 = time.perf_counter()
        res = trainer.fit(method, splits.train, collate, optim=instantiate(c.optim), schedules=schedules,
                          run_dir=run_dir, logger=rec, extra_state={"encoder_prefix": encoder_prefix(method)})
        wall = time.perf_counter() - t0
    steady = rec.ips[1:] or rec.ips
    steady_ips = len(steady) / sum(1.0 / x for x in steady)
    hist = res["history"][-1]["images_per_s"] if res["history"] else float("nan")
    print(f"{label} num_workers={workers} augment_on_device={on_device}: {steady_ips:.1f} img/s (steady), "
          f"{hist:.1f} incl. start-up", flush=True)
    del method, trainer
    release(ctx.device)
    return {"num_workers": workers, "augment_on_device": on_device, "batch": int(c.trainer.batch_size),
            "steps": res["step"], "img_s": steady_ips, "img_s_incl_startup": hist, "wall_s": wall}


def _throughput_row(ctx: Context, batch: int) -> dict[str, Any]:
    """`throughput`'s DINO recipe row at this batch and precision, measured here when that section
    did not run it."""
    args = ctx.args
    thr = next((r for r in ctx.results.get("throughput", []) if r.get("method") == "dino" and "error" not in r
                and r.get("setting") == "recipe" and r.get("precision") == args.precision and not r.get("compile")
                and r.get("batch") == batch), None)
    if thr is None:
        thr = measure(ctx, Spec("dino", method_overrides("dino", recipe_args(args)), batch=batch,
                                precision=args.precision, count_flops=False, steps=args.steps, warmup=args.warmup))
    return thr
