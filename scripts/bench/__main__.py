"""The benchmark harness behind the performance tables (`make bench`).

    python scripts/bench                                      # every section, CPU-sized (`make bench`)
    python scripts/bench peak throughput --methods dino,mae
    python scripts/bench throughput --backbone vit_base --img 224 --batch dino=4,mae=16
    python scripts/bench peak throughput --device cuda --backbone vit_base --img 224 \\
        --batch dino=64,mae=256 --compile                     # scripts/gpu_check.sh
    python scripts/bench e2e_lightly                          # end to end vs lightly, DINO and MAE
    python scripts/bench --quick                              # tiny sizes (tests/scripts/test_bench.py)

Prints one Markdown table per section and writes `<out>/bench-<device>[-<tag>].json` and `.md`
(tag: `compile` with --compile, `quick` with --quick, or --tag). Each section is a module of this
folder; what it measures is below.

Timings are only as good as the machine is quiet: on a shared 2-core box, OpenMP threads that wait
for each other can make a step many times slower; compare numbers from one run on one device.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python scripts/bench` puts this folder first on sys.path; its module names (augment, mae, ...)
# must not shadow installed ones, so scripts/ goes there instead: `bench.*`, and the sibling
# scripts the sections use (bench_lightly).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from bench import ablation, augment, e2e, e2e_lightly, mae, peak, throughput, vs_lightly  # noqa: E402
from bench.common import PRECISIONS, RECIPE_METHODS, Context, device_name  # noqa: E402

SECTIONS = {"peak": (peak, peak.section_peak), "throughput": (throughput, throughput.section_throughput),
            "e2e": (e2e, e2e.section_e2e), "augment": (augment, augment.section_augment),
            "ablation": (ablation, ablation.section_ablation), "lightly": (vs_lightly, vs_lightly.section_lightly),
            "e2e_lightly": (e2e_lightly, e2e_lightly.section_e2e_lightly), "mae": (mae, mae.section_mae)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    epilog = "sections:\n\n" + "\n\n".join(f"* {module.__doc__}" for module, _ in SECTIONS.values())
    ap = argparse.ArgumentParser(description=__doc__, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sections", nargs="*", choices=[[], *SECTIONS], help="sections to run (default: all)")
    ap.add_argument("--sections", dest="sections_opt", default=None, help="comma-separated alternative to the positionals")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=list(PRECISIONS), default="bf16")
    ap.add_argument("--methods", default=None, help=f"comma-separated (default: {','.join(RECIPE_METHODS)})")
    ap.add_argument("--backbone", default=None, help="conf/backbone/<name> instead of the recipe's (e.g. vit_base)")
    ap.add_argument("--img", type=int, default=None, help="image size; > 32: synthetic RGB images, the paper settings")
    ap.add_argument("--n-local", type=int, default=10, help="DINO-family local 96 px crops with --img > 32")
    ap.add_argument("--batch", default=None, help='"64" or per method "dino=64,mae=256" (default: the recipe\'s)')
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: CPU 5, CUDA 20, --quick 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: CPU 2, CUDA 5, --quick 1)")
    ap.add_argument("--compile", action="store_true", help="throughput: torch.compile the method (as trainer.compile)")
    ap.add_argument("--no-compile-ablation", action="store_true", help="ablation: skip the torch.compile rows")
    ap.add_argument("--out", default="outputs/bench", help="folder for bench-<device>[-<tag>].json / .md")
    ap.add_argument("--tag", default=None, help="file-name suffix (default: compile / quick when set)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a 2-block ViT, 2 steps): a smoke test")
    ap.add_argument("--repeats", type=int, default=5, help="mae section: timed repeats")
    ap.add_argument("--peak-n", type=int, default=None, help="peak: matrix size (default: CPU 4096, CUDA 8192)")
    ap.add_argument("--strict", action="store_true", help="raise on the first failure instead of reporting it")
    args = ap.parse_args(argv)
    sections = list(args.sections) + [s for s in (args.sections_opt or "").split(",") if s]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    args.sections = [s for s in SECTIONS if s in sections] or list(SECTIONS)
    args.methods = [m for m in (args.methods or ",".join(RECIPE_METHODS)).split(",") if m]
    return _device_defaults(args)


def _device_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Steps, warmup and the peak's matrix size: small on a CPU, larger on CUDA, tiny with --quick."""
    cuda = args.device == "cuda"
    if args.steps is None:
        args.steps = 2 if args.quick else 20 if cuda else 5
    if args.warmup is None:
        args.warmup = 1 if args.quick else 5 if cuda else 2
    if args.compile:
        args.warmup = max(args.warmup, 3)
    if args.peak_n is None:
        args.peak_n = 512 if args.quick else 8192 if cuda else 4096
    return args


def _header(args: argparse.Namespace, device: torch.device, name: str) -> list[str]:
    """The report's first lines: the machine, the library versions, the settings and the date."""
    import timm

    threads = f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else ""
    return [f"# vfm benchmarks: {name}", "",
            f"device `{device.type}` ({name}{threads}), torch {torch.__version__}, timm {timm.__version__}, "
            f"precision {args.precision}{', torch.compile' if args.compile else ''}{', --quick' if args.quick else ''}, "
            f"{datetime.datetime.now().isoformat(timespec='seconds')}", ""]


def _run_sections(ctx: Context, report: dict[str, Any]) -> None:
    for section in ctx.args.sections:
        if section == "mae" and ctx.device.type != "cpu":
            print("mae: a CPU section; skipped on", ctx.device.type, flush=True)
            continue
        t0 = time.perf_counter()
        result = SECTIONS[section][1](ctx)
        result["seconds"] = time.perf_counter() - t0
        report["sections"][section] = result
        shown = "" if result.pop("streamed", False) else "\n" + result["markdown"] + "\n"
        print(shown + f"\n({section}: {result['seconds']:.0f} s)\n", flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the chosen sections; write and return the report (what the JSON file holds)."""
    args = parse_args(argv)  # before importing timm: --help stays quick
    import timm

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    name = device_name(device)
    header = _header(args, device, name)
    print("\n".join(header), flush=True)
    report: dict[str, Any] = {
        "device": device.type, "device_name": name, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "timm": timm.__version__, "cuda": torch.version.cuda, "precision": args.precision, "compile": args.compile,
        "quick": args.quick, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "args": {k: v for k, v in vars(args).items() if k != "sections_opt"}, "sections": {},
    }
    with tempfile.TemporaryDirectory(prefix="vfm-bench-") as tmp:
        ctx = Context(args=args, device=device, name=name, peaks=peak.Peaks(device, args.peak_n), tmp=Path(tmp))
        _run_sections(ctx, report)
        report["peaks_tflops"] = dict(ctx.peaks.values)
    md = "\n".join(header) + "\n" + "\n\n".join(s["markdown"] for s in report["sections"].values()) + "\n"
    report["markdown"] = md
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or ("quick" if args.quick else "compile" if args.compile else "")
    stem = f"bench-{device.type}" + (f"-{tag}" if tag else "")
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str))
    (out / f"{stem}.md").write_text(md)
    print(f"wrote {out / stem}.json and .md", flush=True)
    return report


if __name__ == "__main__":
    main()
