"""`ablation`: DINO and MAE at the CPU recipe size, one optimisation switched at a time against the
project's defaults (off vs on, ratio on/off; a few steps each): bf16 autocast vs fp32; fused SDPA
vs plain-op attention in every block (backbone and MAE decoder: `timm.layers.set_fused_attn` is
read at construction and the Backbone overrides it from `backbone.attn_impl`, so the flags are
set on the built modules); torch.compile vs eager (compile time = the first two steps minus two
steady ones; skipped with --quick or --no-compile-ablation, reported when it fails); AdamW
for-loop vs foreach vs fused (whole step, and `optimizer.step()` alone); MAE's encoder on the
visible 25% vs on every patch (same decoder and loss); DINO's teacher forward vs the student's
forward+backward; batched uint8 multi-crop (`MultiCropCollate`) vs a per-image torchvision v2 /
PIL pipeline of the same crops (augmentation alone, in the main process: torch's intra-op threads
vs single-threaded PIL; at the recipe size and at 224 px with 2 x 224 + 10 x 96 crops);
channels_last vs contiguous ResNet-50."""

from __future__ import annotations

from typing import Any

import torch

from .augment import reference_multicrop
from .common import Context, autocast, best_time, one_line, release, row, table, timed_device
from .configs import (
    build_collate,
    compose_cfg,
    crops_of,
    make_samples,
    method_overrides,
    recipe_args,
    uint8_images,
    with_args,
)
from .flops import count_step_flops
from .measure import OPT_NAMES, Spec, build_optimizer, measure

Result = dict[str, Any]


def ab_row(setting: str, method: str, off: float | None, on: float | None, unit: str, note: str = "") -> Result:
    ratio = on / off if (off and on) else None
    return {"setting": setting, "method": method, "off": off, "on": on, "ratio": ratio, "unit": unit, "note": note}


class Ablation:
    """Runs the training step with one switch changed and collects the off/on rows."""

    def __init__(self, ctx: Context) -> None:
        self.ctx, self.args = ctx, ctx.args
        self.steps, self.warmup = (2 if self.args.quick else max(2, self.args.steps - 2)), 1
        self.rows: list[Result] = []

    def run(self, method: str, **kw: Any) -> Result:
        """The training step of `method` with the Spec fields in `kw` changed; {"error": ...} if it fails."""
        spec = Spec(method, kw.pop("overrides", method_overrides(method, recipe_args(self.args))),
                    precision=kw.pop("precision", self.args.precision), steps=kw.pop("steps", self.steps),
                    warmup=kw.pop("warmup", self.warmup), count_flops=False, measure_data=False, **kw)
        try:
            return measure(self.ctx, spec)
        except Exception as e:  # noqa: BLE001 - report and go on
            if self.args.strict:
                raise
            print(f"ablation {method} {kw}: FAILED {type(e).__name__}: {e}", flush=True)
            return {"error": f"{type(e).__name__}: {e}"}

    def add(self, setting: str, method: str, off: Result | None, on: Result | None, note: str = "") -> None:
        """A row of two training-step results (img/s), or a skipped row naming the failure."""
        bad = [r["error"] for r in (off, on) if r and "error" in r]
        if bad:
            self.rows.append(ab_row(setting, method, None, None, "img/s", f"skipped: {bad[0][:200]}"))
        else:
            self.rows.append(ab_row(setting, method, off["img_s"], on["img_s"], "img/s (training step)", note))
        r = self.rows[-1]
        print(f"ablation {method}: {setting}: {r['off']} -> {r['on']} {r['note']}", flush=True)


def section_ablation(ctx: Context) -> dict[str, Any]:
    ab = Ablation(ctx)
    for m in ("dino", "mae"):
        _method_rows(ab, m)
    ab.rows += augmentation_rows(ctx)
    print(f"ablation augmentation: {ab.rows[-1]}", flush=True)
    _channels_last_rows(ab)
    md = table(f"### Ablations ({ctx.device.type}, {ctx.args.precision} unless the row says otherwise; "
               f"{ab.steps} timed steps after {ab.warmup} warmup; ratio = on / off)",
               ["optimisation (on vs off)", "method", "off", "on", "on/off", "unit", "note"])
    for r in ab.rows:
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        md.append(row([r["setting"], r["method"], _num(r["off"]), _num(r["on"]), ratio, r["unit"], one_line(r["note"])]))
    return {"rows": ab.rows, "markdown": "\n".join(md)}


def _num(v: float | None) -> str:
    return "—" if v is None else f"{v:.4g}"


def _method_rows(ab: Ablation, m: str) -> None:
    """Every switch for one method, against its baseline (the project's defaults: bf16, attention
    auto, eager, OptimSpec's AdamW)."""
    args, device = ab.args, ab.ctx.device
    base = ab.run(m)
    if "error" in base:
        ab.rows.append(ab_row("baseline", m, None, None, "img/s", f"failed: {base['error'][:200]}"))
        return
    base_note = f"{base['backbone']}/{base['patch_size']}, {base['img_size']} px, batch {base['batch']}"
    other = ab.run(m, precision="fp32" if args.precision == "bf16" else "bf16")
    ab.add("bf16 autocast vs fp32", m, *((other, base) if args.precision == "bf16" else (base, other)), base_note)
    share = base["attention"].split()[0].split("/")  # the project's choice, e.g. "0/4" on the CPU
    manual = base if share[0] == "0" else ab.run(m, attention="manual")
    fused = base if share[0] == share[1] else ab.run(m, attention="fused")
    ab.add("fused SDPA vs plain-op attention (all blocks)", m, manual, fused,
           f"{manual.get('attention', '')} -> {fused.get('attention', '')}; project default on {device.type}: "
           f"{base['attention']}")
    _compile_row(ab, m, base)
    variants = {"fused" if device.type != "cpu" else "foreach": base}
    for kind in ("forloop", "foreach", "fused"):
        if kind not in variants:
            variants[kind] = ab.run(m, optimizer=kind)
    ab.add("AdamW foreach vs for-loop (training step)", m, variants["forloop"], variants["foreach"])
    ab.add("AdamW fused vs foreach (training step)", m, variants["foreach"], variants["fused"])
    ov = method_overrides(m, recipe_args(args))
    ab.rows.append(optimizer_only_row(ab.ctx, ov, m, "forloop", "foreach"))
    ab.rows.append(optimizer_only_row(ab.ctx, ov, m, "foreach", "fused"))
    if m == "mae":
        ab.add("MAE encoder on visible patches only vs on every patch", m, ab.run(m, mae_encode_all=True), base,
               "mask ratio 0.75 either way; the decoder and loss are the same")
    if m == "dino":
        ab.rows.append(teacher_row(ab.ctx, ov, ab.steps))
        release(device)
        print(f"ablation dino: teacher {ab.rows[-1]}", flush=True)


def _compile_row(ab: Ablation, m: str, base: Result) -> None:
    setting = "torch.compile (mode default) vs eager"
    if ab.args.no_compile_ablation or ab.args.quick:
        why = "--quick: compiling takes minutes on a CPU" if ab.args.quick else "--no-compile-ablation"
        ab.rows.append(ab_row(setting, m, None, None, "img/s", f"skipped ({why})"))
        return
    comp = ab.run(m, compile=True, warmup=2, steps=ab.steps)
    note = ("compile (first 2 steps minus steady time) "
            f"{comp['compile_s']:.0f} s, {comp.get('compiled_graphs', '?')} graph(s)") if "error" not in comp else ""
    ab.add(setting, m, base, comp, note)


def _channels_last_rows(ab: Ablation) -> None:
    """channels_last for a CNN: ResNet-50 at 64 px (RGB synthetic), supervised and DINO."""
    quick = ab.args.quick
    cnn_args = with_args(ab.args, img=None, backbone="resnet50", quick=False)
    size = 32 if quick else 64
    for m, batch in (("supervised", 8 if quick else 32), ("dino", 4 if quick else 16)):
        ov = method_overrides(m, cnn_args) + ["dataset=synthetic", f"dataset.img_size={size}", "dataset.in_chans=3",
                                              "dataset.mean=[0.5,0.5,0.5]", "dataset.std=[0.25,0.25,0.25]"]
        if m == "dino":
            ov += ["method.out_dim=4096", "method.augment.n_local=2", f"method.augment.local_crop_size={size // 2}"]
        off = ab.run(m, overrides=ov, batch=batch)
        on = ab.run(m, overrides=ov, batch=batch, channels_last=True)
        ab.add("channels_last vs contiguous (ResNet-50)", m, off, on, f"{size} px RGB, batch {batch}")


def augmentation_rows(ctx: Context) -> list[Result]:
    """Batched uint8 multi-crop vs the per-image torchvision / PIL reference, augmentation alone."""
    from hydra.utils import instantiate

    from vfm.data.collate import MultiCropCollate

    args = ctx.args
    settings = [("Fashion-MNIST recipe", method_overrides("dino", recipe_args(args)), None)]
    if not args.quick:
        settings.append(("224 px RGB, ImageNet DINO crops",
                         method_overrides("dino", with_args(args, img=224, backbone=None)), 16))
    rows = []
    for name, ov, batch in settings:
        cfg = compose_cfg(ov)
        aug = instantiate(cfg.method.augment)
        batch = batch or (16 if args.quick else int(cfg.trainer.batch_size))
        images = uint8_images(cfg, batch, seed=0)
        samples = [(images[i], 0, 0) for i in range(batch)]
        ours, ref = MultiCropCollate(aug), reference_multicrop(aug)
        reps = 2 if args.quick else 3
        on_s = best_time(lambda ours=ours, samples=samples: ours(samples), reps)
        off_s = best_time(lambda ref=ref, images=images: ref(images), reps)
        c, s = images.shape[1], images.shape[-1]
        rows.append(ab_row("batched uint8 multi-crop (MultiCropCollate) vs per-image torchvision v2 / PIL", "dino",
                           batch / off_s, batch / on_s, "img/s (augmentation only)",
                           f"{name}: {c}x{s}x{s} -> {crops_of(aug)}, batch {batch}, best of {reps}; "
                           f"{torch.get_num_threads()} torch thread(s) vs 1 PIL thread"))
    return rows


def teacher_row(ctx: Context, overrides: list[str], steps: int) -> Result:
    """DINO: the teacher's forward (no_grad, global crops) vs the student's forward+backward (all crops)."""
    from vfm.engine.device import to_device
    from vfm.pretrain import build_method

    device, prec = ctx.device, ctx.args.precision
    cfg = compose_cfg(overrides)
    method = build_method(cfg).to(device).train()
    batch = 16 if ctx.args.quick else int(cfg.trainer.batch_size)
    collate = build_collate(cfg, method)
    crops = to_device(collate(make_samples(cfg, "dino", batch, 0)), device)["crops"]
    n_g = method.n_global_crops

    def teacher() -> None:
        with torch.no_grad(), autocast(device, prec):
            method.teacher(crops[:n_g])

    def student() -> None:
        with autocast(device, prec):
            out = method.student(crops)
        out.float().sum().backward()

    t_flops, s_flops = count_step_flops(teacher), count_step_flops(student)
    method.zero_grad(set_to_none=True)
    t_s, s_s = timed_device(teacher, steps, device), timed_device(student, steps, device)
    return ab_row("DINO teacher forward (no_grad, global crops) vs student forward+backward (all crops)", "dino",
                  1000 * s_s, 1000 * t_s, "ms/batch (off: student, on: teacher)",
                  f"teacher/student FLOPs {t_flops / s_flops:.2f}; batch {batch}")


def optimizer_only_row(ctx: Context, overrides: list[str], method_name: str, off: str, on: str) -> Result:
    """optimizer.step() alone (random gradients) for two AdamW implementations."""
    from hydra.utils import instantiate

    from vfm.pretrain import build_method

    cfg = compose_cfg(overrides)
    method = build_method(cfg).to(ctx.device)
    optim = instantiate(cfg.optim)
    times = {}
    for kind in (off, on):
        opt = build_optimizer(kind, optim, method, ctx.device)
        for g in opt.param_groups:
            g["lr"], g["weight_decay"] = 1e-4, 0.05
            for p in g["params"]:
                p.grad = torch.randn_like(p) * 1e-3
        times[kind] = timed_device(opt.step, 5 if ctx.args.quick else 10, ctx.device, warmup=2)
    n_params = sum(p.numel() for p in method.parameters() if p.requires_grad)
    del method
    release(ctx.device)
    return ab_row(f"AdamW {OPT_NAMES[on]} vs {OPT_NAMES[off]}: optimizer.step() alone", method_name, 1 / times[off],
                  1 / times[on], "optimizer steps/s",
                  f"{1000 * times[off]:.2f} -> {1000 * times[on]:.2f} ms; {n_params / 1e6:.2f} M trainable parameters")
