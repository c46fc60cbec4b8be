"""`throughput`: per method, one synthetic uint8 batch is collated (augmentation, masks, RandAugment
and Mixup, caption tokenization: `data` time, on the CPU as in DataLoader workers) and then
pre-collated batches, moved to the device, are trained on (`compute` time: forward, backward,
gradient clipping, `before_optimizer_step`, the optimizer step and `on_step_end`, under the
chosen precision, with a realistic `sched` of steps 0..N as `Trainer.fit` builds it, and the
trainer's one loss read-back per step), averaged over --steps after --warmup, synchronising CUDA.
img/s incl. data = batch / (data + compute): the two done one after the other in one process
(what `trainer.num_workers=0` does); data share = data / (data + compute).
FLOPs: counted with `torch.utils.flop_counter.FlopCounterMode` on one real training step of the
eager model (forward + `loss.backward()`, divided by the batch): the FLOPs of matrix products,
convolutions and scaled-dot-product attention (2*M*N*K per product; SDPA's own formula, also for
PyTorch's CPU flash kernel, which the counter does not know by default). Everything the step
computes is counted, including work that is not the student's: DINO's teacher forward, EVA's
teacher and BEiT's tokenizer forward, CLIP's text tower, the MAE decoder. Not counted: elementwise
and reduction ops (norms, softmax, GELU, losses, the optimizer, EMA updates, gradient clipping),
which are real time but not FLOPs an MFU is measured in. achieved TFLOP/s = FLOPs/img * img/s
(compute only); MFU = achieved / peak. Peak memory: CUDA `max_memory_allocated` over the timed
steps (weights, optimizer state, activations); CPU: the growth of the resident set size from
before the method is built to its peak during the steps, sampled from /proc/self/statm every
10 ms ("RSS growth"; freed memory reused from an earlier section reads as no growth)."""

from __future__ import annotations

from typing import Any

from .common import Context, one_line, row, table
from .configs import is_imagenet_sized, method_overrides, parse_batch
from .measure import Spec, measure
from .peak import device_datasheet_peak


def section_throughput(ctx: Context) -> dict[str, Any]:
    args = ctx.args
    default, per = parse_batch(args.batch)
    rows = []
    for m in args.methods:
        spec = Spec(m, method_overrides(m, args), batch=per.get(m, default), precision=args.precision,
                    compile=args.compile, steps=args.steps, warmup=args.warmup)
        try:
            r = measure(ctx, spec)
        except Exception as e:  # noqa: BLE001 - one broken method must not hide the others
            if args.strict:
                raise
            rows.append({"method": m, "error": f"{type(e).__name__}: {e}"})
            print(f"throughput {m}: FAILED {type(e).__name__}: {e}", flush=True)
            continue
        r["setting"] = "recipe" if not is_imagenet_sized(args) else "imagenet"
        rows.append(r)
        print(f"throughput {m}: {r['img_s']:.1f} img/s compute, {r['img_s_with_data']:.1f} with data, "
              f"MFU {100 * r['mfu']:.2f}%", flush=True)
    ctx.results["throughput"] = rows
    return {"rows": rows, "markdown": throughput_markdown(ctx, rows)}


def label_of(r: dict[str, Any]) -> str:
    return f"{r['backbone']}/{r['patch_size']}, {r['img_size']} px, {r.get('views', '')}"


def throughput_markdown(ctx: Context, rows: list[dict[str, Any]]) -> str:
    prec, compiled = ctx.args.precision, ctx.args.compile
    peak = ctx.peaks.values.get(prec)
    sheet = device_datasheet_peak(ctx, prec)
    head = ["method", "setting", "batch", "data ms/batch", "compute ms/batch", "img/s (compute)",
            "img/s (incl. data, serial)", "data share", "GFLOP/img (fwd+bwd)", "achieved TFLOP/s",
            f"MFU vs measured {prec} peak ({peak:.3g} TFLOP/s)" if peak else "MFU"]
    if sheet:
        head.append(f"MFU vs datasheet ({sheet:g} TFLOP/s)")
    mem_kind = "CUDA max allocated" if ctx.device.type == "cuda" else "RSS growth"
    head.append(f"peak memory MiB ({mem_kind})")
    if compiled:
        head.append("compile s")
    md = table(f"### Training-step throughput ({prec}{', torch.compile' if compiled else ''}, "
               f"synthetic uint8 images; data = collate on the CPU, compute = fwd+bwd+clip+optimizer+on_step_end)",
               head)
    for r in rows:
        if "error" in r:
            md.append(f"| {r['method']} | failed: {one_line(r['error'])[:160]} |" + " |" * (len(head) - 2))
            continue
        cells = [r["method"], label_of(r), str(r["batch"]), f"{1000 * r['data_s']:.1f}", f"{1000 * r['compute_s']:.1f}",
                 f"{r['img_s']:.1f}", f"{r['img_s_with_data']:.1f}", f"{100 * r['data_share']:.1f}%",
                 f"{r['flops_per_img'] / 1e9:.4g}", f"{r['achieved_tflops']:.4g}", f"{100 * r['mfu']:.2f}%"]
        if sheet:
            cells.append(f"{100 * r['mfu_datasheet']:.2f}%")
        cells.append(f"{r['peak_mem_mib']:.0f}")
        if compiled:
            cells.append(f"{r.get('compile_s', 0.0):.1f}")
        md.append(row(cells))
    return "\n".join(md)
