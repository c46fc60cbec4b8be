"""`lightly`: the same DINO and MAE training steps built from lightly (`pip install 'vfm[bench]'`),
side by side with ours at the CPU recipe size (or --backbone/--img): same timm backbone and
weights, batch, crops, heads, bf16 autocast, AdamW, EMA teacher; steps interleaved one by one
and the median taken per side (scripts/bench_lightly.py, which lists what still differs).
Skipped, with a note, when lightly is not installed."""

from __future__ import annotations

from typing import Any

from .common import Context


def section_lightly(ctx: Context) -> dict[str, Any]:
    """vfm vs lightly, the same steps (see scripts/bench_lightly.py)."""
    import bench_lightly  # scripts/ is on sys.path (see __main__)

    args = ctx.args
    try:
        bench_lightly._require_lightly()
    except ImportError as e:
        return {"markdown": f"### vfm vs lightly\n\nskipped: {e}", "rows": []}
    setting = "tiny" if args.quick else ("vit_b_224" if (args.img or 0) > 32 else "recipe")
    rows, notes = [], []
    for method in ("dino", "mae"):
        try:
            r = bench_lightly.compare(method, setting=setting, batch=None if not args.quick else 8,
                                      steps=max(args.steps, 3), warmup=max(args.warmup, 2), precision=args.precision,
                                      device=ctx.device.type)
        except Exception as e:  # report, keep the other sections
            notes.append(f"- {method}: failed: {type(e).__name__}: {e}")
            continue
        rows.append({k: v for k, v in r.items() if isinstance(v, (int, float, str, list))})
        notes.extend(f"- {method}: {d}" for d in r["differences"])
        print(f"lightly {method}: vfm {r['ours_img_s']:.1f} img/s, lightly {r['theirs_img_s']:.1f} img/s, "
              f"ratio {r['ratio']:.2f}", flush=True)
    md = (f"### vfm vs lightly ({ctx.device.type}, {args.precision}; median of interleaved steps)\n\n"
          + bench_lightly.format_table(rows) + "\n\nWhat still differs between the two sides:\n\n" + "\n".join(notes))
    return {"markdown": md, "rows": rows}
