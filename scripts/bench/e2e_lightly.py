"""`e2e_lightly`: end to end against lightly as its users run it, DINO and MAE, on the same folder
of JPEG files (written once under --out, at the recipe's 28 px or --img, RGB): lightly's
`DINOTransform` / `MAETransform` as the transform of a torchvision `ImageFolder`, a `DataLoader`
with min(2, CPUs) workers and lightly's training step (the one the `lightly` section times,
scripts/bench_lightly.py) in a plain PyTorch loop, as lightly's examples write it; against vfm's
`Trainer.fit` with `dataset=imagefolder` on the same files: the same backbone, heads, crops, batch,
number of workers, steps and precision. images/s over the steps after the warm-up on both sides,
and vfm / lightly. The difference kept on purpose is the data pipeline: lightly transforms each
image in PIL, vfm's collate crops and jitters the whole batch as uint8 tensors. Skipped, with a
note, when lightly is not installed."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from .common import Context, release, row, sync, table
from .configs import compose_cfg, default_batch, is_imagenet_sized, parse_batch, quick_overrides
from .e2e import trainer_rate

METHODS = ("dino", "mae")
RECIPE_IMG = 28  # the Fashion-MNIST recipes' image size


def section_e2e_lightly(ctx: Context) -> dict[str, Any]:
    """vfm's trainer vs lightly's transforms + DataLoader + step, on the same JPEG files."""
    import bench_lightly  # scripts/ is on sys.path (see __main__)

    try:
        bench_lightly._require_lightly()
    except ImportError as e:
        return {"markdown": f"### End to end vs lightly\n\nskipped: {e}", "rows": []}
    args = ctx.args
    methods = [m for m in METHODS if m in args.methods] or list(METHODS)
    workers = min(2, os.cpu_count() or 1)
    interval, timed = steps_of(args)
    size = args.img or RECIPE_IMG
    configs = {m: _config(ctx, m, size, interval, interval + timed) for m in methods}
    n_images = max(batch for _, batch in configs.values()) * (interval + timed + 1)
    root = write_image_folder(Path(args.out).resolve() / f"e2e-lightly-{size}px", n_images, size)
    rows, notes = [], []
    for i, m in enumerate(methods):
        base, batch = configs[m]
        try:
            rows.append(_compare(ctx, m, [*base, f"dataset.root='{root}'"], root, batch, workers, interval, timed,
                                 lightly_first=i % 2 == 0))
        except Exception as e:  # noqa: BLE001 - report, keep the other method and sections
            if args.strict:
                raise
            notes.append(f"- {m}: failed: {type(e).__name__}: {e}")
            print(f"e2e_lightly {m}: FAILED {type(e).__name__}: {e}", flush=True)
    return {"rows": rows, "markdown": _markdown(ctx, rows, notes, workers, interval, timed, size, n_images)}


def steps_of(args: Any) -> tuple[int, int]:
    """(warm-up steps, timed steps). The trainer logs its rate every `warm-up` steps and the first
    interval (worker start-up, first calls) is dropped, so the timed steps are whole intervals:
    --steps rounded up to a multiple of --warmup."""
    interval = max(1, args.warmup)
    return interval, interval * max(1, math.ceil(args.steps / interval))


def _config(ctx: Context, method: str, size: int, log_every: int, max_steps: int) -> tuple[list[str], int]:
    """`pretrain` overrides for one method on the image folder (but its root), and the batch.
    At 28 px the method's Fashion-MNIST recipe (model, crops, batch) on RGB files; with --img > 32
    the method's paper defaults (DINO: --n-local local crops), as the other sections."""
    args = ctx.args
    ov = [f"method={method}", "dataset=imagefolder", f"dataset.img_size={size}", f"dataset.load_size={size}",
          "dataset.in_chans=3", "dataset.val_fraction=0"]
    if is_imagenet_sized(args):
        ov += ["~recipe"] + ([f"method.augment.n_local={args.n_local}"] if method == "dino" else [])
    else:
        ov.append(f"recipe={method}_fashion_mnist")
    if args.backbone:
        ov.append(f"backbone={args.backbone}")
    if args.quick:
        ov += quick_overrides(method)
    default, per = parse_batch(args.batch)
    batch = per.get(method, default) or default_batch(method, compose_cfg(ov), args, ctx.device)
    ov += ["logger=none", "evaluator=[]", "eval.baseline=false", "trainer.progress=false", "trainer.resume=never",
           f"trainer.batch_size={batch}", f"trainer.max_steps={max_steps}", f"trainer.log_every_n_steps={log_every}",
           f"trainer.device={ctx.device.type}", f"trainer.precision={args.precision}"]
    return ov, int(batch)


def write_image_folder(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    """`folder/train/<class>/<i>.jpg`: `n` smooth random RGB images of `size` px (JPEG quality 90)
    in 2 class folders, as torchvision's `ImageFolder` and vfm's `dataset=imagefolder` read them.
    Written once: a folder that already holds at least `n` is reused."""
    import numpy as np
    from PIL import Image

    done = folder / "done.json"
    if done.exists() and json.loads(done.read_text()).get("n", 0) >= n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        # a few colour blobs (bicubic from 4x4) plus grain: JPEG sizes like a photo's, not like noise
        blobs = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        pixels = np.asarray(blobs, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3), dtype=np.int16)
        path = tmp / "train" / f"class_{i % 2}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    (tmp / "done.json").write_text(json.dumps({"n": n, "size": size, "seed": seed}))
    tmp.rename(folder)
    return folder


def lightly_transform(method: str, cfg: Any) -> Any:
    """lightly's transform with the settings of vfm's augmentation in `cfg` (crop sizes and scales,
    the number of local crops, the probabilities, normalisation). lightly's colour jitter is
    `cj_strength` times each `cj_*` (and its second global view always uses strength 0.5), so
    strength 0.5 with twice vfm's values; vfm's blur sigma is in pixels of a 224 px crop, scaled
    with the global crop size, so lightly gets it scaled."""
    from lightly.transforms import DINOTransform, MAETransform

    aug = cfg.method.augment
    normalize = {"mean": [float(x) for x in cfg.dataset.mean], "std": [float(x) for x in cfg.dataset.std]}
    if method == "mae":
        return MAETransform(input_size=int(aug.global_crop_size), min_scale=float(aug.global_scale[0]),
                            normalize=normalize)
    if int(aug.n_global) != 2:
        raise ValueError(f"lightly's DINOTransform makes 2 global crops; this config has {aug.n_global}")
    blur_scale = int(aug.global_crop_size) / 224
    return DINOTransform(
        global_crop_size=int(aug.global_crop_size), global_crop_scale=tuple(aug.global_scale),
        local_crop_size=int(aug.local_crop_size), local_crop_scale=tuple(aug.local_scale),
        n_local_views=int(aug.n_local), hf_prob=float(aug.flip_p), cj_prob=float(aug.color_jitter_p),
        cj_strength=0.5, cj_bright=2 * float(aug.brightness), cj_contrast=2 * float(aug.contrast),
        cj_sat=2 * float(aug.saturation), cj_hue=2 * float(aug.hue), random_gray_scale=float(aug.grayscale_p),
        gaussian_blur=tuple(float(p) for p in aug.blur_p),
        sigmas=tuple(float(s) * blur_scale for s in aug.blur_sigma), solarization_prob=float(aug.solarize_p[1]),
        normalize=normalize,
    )


def lightly_rate(ctx: Context, method: str, cfg: Any, root: Path, batch: int, workers: int, warmup: int,
                 timed: int) -> dict[str, Any]:
    """lightly as its examples train: `ImageFolder(transform=...)`, a shuffling `DataLoader` with
    `workers`, and per batch the views to the device, (MAE) the token mask drawn by
    `random_token_mask`, lightly's training step. images/s over the `timed` steps after `warmup`,
    the data waits included."""
    import bench_lightly
    import torchvision
    from lightly.models.utils import random_token_mask
    from torch.utils.data import DataLoader

    device = ctx.device
    ours, theirs = bench_lightly.sides_for_cfg(method, cfg, batch, precision=ctx.args.precision, device=device.type)
    dataset = torchvision.datasets.ImageFolder(str(root / "train"), transform=lightly_transform(method, cfg))
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                        pin_memory=device.type == "cuda")
    batches = iter(loader)
    t0 = time.perf_counter()
    for step in range(warmup + timed):
        views, _ = next(batches)
        if method == "dino":
            inputs = {"crops": [v.to(device, non_blocking=True) for v in views]}
        else:
            images = views[0].to(device, non_blocking=True)
            idx_keep, idx_mask = random_token_mask((images.shape[0], theirs.model.sequence_length),
                                                   mask_ratio=float(cfg.method.masking.ratio), device=device)
            inputs = {"images": images, "idx_keep": idx_keep, "idx_mask": idx_mask}
        theirs.step(inputs, step)  # reads the loss back: synchronises, as the trainer does
        if step + 1 == warmup:
            sync(device)
            t0 = time.perf_counter()
    sync(device)
    seconds = time.perf_counter() - t0
    del batches, ours, theirs  # the workers stop here
    release(device)
    ips = batch * timed / seconds
    print(f"e2e_lightly {method} lightly: {ips:.1f} img/s (steady)", flush=True)
    return {"img_s": ips, "seconds": seconds}


def _compare(ctx: Context, method: str, base: list[str], root: Path, batch: int, workers: int, warmup: int,
             timed: int, lightly_first: bool) -> dict[str, Any]:
    """Both sides of one method, one after the other (the order alternates between methods)."""
    from hydra.utils import instantiate

    cfg = compose_cfg(base)
    sides: dict[str, dict[str, Any]] = {}
    for side in (("lightly", "vfm") if lightly_first else ("vfm", "lightly")):
        if side == "lightly":
            sides[side] = lightly_rate(ctx, method, cfg, root, batch, workers, warmup, timed)
        else:
            splits = instantiate(cfg.dataset)
            sides[side] = trainer_rate(ctx, base, splits, workers, False, label=f"e2e_lightly {method} vfm")
    aug = cfg.method.augment
    views = f"{aug.n_global}x{aug.global_crop_size}" + (f" + {aug.n_local}x{aug.local_crop_size}" if aug.n_local else "")
    vfm_ips, lightly_ips = sides["vfm"]["img_s"], sides["lightly"]["img_s"]
    return {"method": method, "backbone": str(cfg.backbone.name), "patch_size": int(cfg.backbone.patch_size),
            "img_size": int(cfg.dataset.img_size), "views": views, "batch": batch, "num_workers": workers,
            "warmup_steps": warmup, "timed_steps": timed, "lightly_img_s": lightly_ips, "vfm_img_s": vfm_ips,
            "ratio": vfm_ips / lightly_ips, "order": "lightly, vfm" if lightly_first else "vfm, lightly",
            "vfm_img_s_incl_startup": sides["vfm"]["img_s_incl_startup"]}


def machine_line(ctx: Context, workers: int) -> str:
    """The machine and the libraries, as the report's header gives them, plus AMX and the workers."""
    import lightly
    import torchvision

    where = ctx.name
    if ctx.device.type == "cpu":
        where += ", AMX" if "AMX" in ctx.name else ", no AMX"
        where += f", {torch.get_num_threads()} thread(s)"
    return (f"machine: {where}; {os.cpu_count()} CPU(s), {workers} DataLoader worker(s) per side; "
            f"torch {torch.__version__}, torchvision {torchvision.__version__}, lightly {lightly.__version__}")


DIFFERENCES = [
    "the data pipeline, the comparison itself: lightly's workers transform each image in PIL (RandomResizedCrop, "
    "flip, colour jitter, grayscale, blur, solarize, ToTensor, Normalize, per view); vfm's workers decode each "
    "file to uint8 and its collate crops and jitters the whole batch as tensors (bicubic grid_sample without "
    "antialiasing, an exact Gaussian blur where PIL approximates it; same crop boxes and probabilities)",
    "decoding: torchvision's ImageFolder opens each file with PIL and converts it to RGB; vfm's imagefolder does "
    "the same, then shrinks it to at most dataset.load_size on the shorter side (a no-op here: the files are "
    "smaller)",
    "MAE: lightly's MAETransform crops with bicubic resampling (PIL's, antialiased); its token mask is drawn in the training loop "
    "(random_token_mask, as lightly's MAE example), vfm's in the collate, in the workers",
    "the loop: lightly's side is a plain PyTorch loop (lightly's examples), so no PyTorch Lightning overhead is "
    "counted; vfm's is the Trainer (its logging, non-finite check and gradient norm included); vfm's loader "
    "keeps its workers (persistent) and seeds each batch, which does not matter within one epoch",
    "the training steps themselves differ as the `lightly` section lists (attention kernel, DINO head and loss "
    "precision, EMA placement, MAE decoder gathering)",
]


def _markdown(ctx: Context, rows: list[dict[str, Any]], notes: list[str], workers: int, warmup: int, timed: int,
              size: int, n_images: int) -> str:
    md = table(f"### End to end vs lightly ({ctx.device.type}, {ctx.args.precision}; {n_images} RGB JPEGs of "
               f"{size} px, {workers} DataLoader worker(s) per side, {timed} timed steps after {warmup})",
               ["method", "model, crops", "batch", "lightly img/s", "vfm img/s", "vfm / lightly"])
    md += [row([r["method"], f"{r['backbone']}/{r['patch_size']}, {r['views']}", str(r["batch"]),
                f"{r['lightly_img_s']:.1f}", f"{r['vfm_img_s']:.1f}", f"{r['ratio']:.2f}"]) for r in rows]
    md += ["", machine_line(ctx, workers), "",
           "lightly: its transform on a torchvision ImageFolder, a DataLoader, its training step; vfm: "
           "`Trainer.fit` with `dataset=imagefolder` on the same files. What differs:", ""]
    md += [f"- {d}" for d in DIFFERENCES] + notes
    return "\n".join(md)
