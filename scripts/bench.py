"""The benchmark harness behind the README's performance claims (`make bench`).

    python scripts/bench.py                                   # every section, CPU-sized (`make bench`)
    python scripts/bench.py peak throughput --methods dino,mae
    python scripts/bench.py throughput --backbone vit_base --img 224 --batch dino=4,mae=16
    python scripts/bench.py peak throughput --device cuda --backbone vit_base --img 224 \\
        --batch dino=64,mae=256 --compile                     # scripts/gpu_check.sh
    python scripts/bench.py --quick                           # tiny sizes (tests/scripts/test_bench.py)

Prints one Markdown table per section and writes `<out>/bench-<device>[-<tag>].json` and `.md`
(tag: `compile` with --compile, `quick` with --quick, or --tag). Sections:

* `peak`: the device's dense matmul rate measured in this run: an n x n x n product (CPU n=4096,
  CUDA n=8192) in each precision (fp32, bf16), best of several timed repeats after warmup,
  2 n^3 FLOPs per product. Every MFU below is relative to this *measured* peak of the precision
  the step runs its matrix products in (bf16 autocast -> bf16 peak; fp32 -> fp32 peak, with CUDA's
  TF32 setting as it is); on CUDA also relative to the datasheet dense peak when the device is an
  H100 SXM or H200 (989 TFLOP/s bf16; fp32 67, or 494.5 with TF32 on).
* `throughput`: per method, one synthetic uint8 batch is collated (augmentation, masks, RandAugment
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
  10 ms ("RSS growth"; freed memory reused from an earlier section reads as no growth).
* `e2e`: `Trainer.fit` of the DINO recipe (whatever --backbone/--img say) on decoded Fashion-MNIST
  (synthetic images when it is absent) with `trainer.num_workers` 0 and 2: the trainer's own
  images/s (its `perf/images_per_s` over the logged intervals after the first, which holds worker
  start-up), next to the compute-only and the serial data+compute numbers of `throughput` for the
  same configuration, so a data bottleneck shows; and with 2 workers plus
  `trainer.augment_on_device=true` (the workers only stack uint8 images, the training process
  augments after the transfer).
* `augment`: where the multi-crop augmentation of a DINO batch at the ImageNet setting (3 x 224 x 224
  -> 2 x 224 + 10 x 96 crops) runs: the plain collate in one CPU process (all its torch threads: what
  one DataLoader worker does with one thread is slower), and the deferred collate's `finish` on
  --device after the transfer (`trainer.augment_on_device=true`, CUDA synchronised), with the bytes
  one batch moves from the loader to the device either way; on CUDA also the copy of each kind of
  batch from pageable vs pinned host memory (`trainer.pin_memory`).
* `ablation`: DINO and MAE at the CPU recipe size, one optimisation switched at a time against the
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
  channels_last vs contiguous ResNet-50.
* `lightly`: the same DINO and MAE training steps built from lightly (`pip install 'vfm[bench]'`),
  side by side with ours at the CPU recipe size (or --backbone/--img): same timm backbone and
  weights, batch, crops, heads, bf16 autocast, AdamW, EMA teacher; steps interleaved one by one
  and the median taken per side (scripts/bench_lightly.py, which lists what still differs).
  Skipped, with a note, when lightly is not installed.
* `mae`: MAE's encoder cost vs the mask ratio (encoder FLOPs forward only, fwd+bwd time, full step;
  the Fashion-MNIST recipe and ViT-B/16 at 224 px; CPU only).

Timings are only as good as the machine is quiet: on a shared 2-core box, OpenMP threads that wait
for each other can make a step many times slower; compare numbers from one run on one device.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import resource
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SECTIONS = ("peak", "throughput", "e2e", "augment", "ablation", "lightly", "mae")
RECIPE_METHODS = ("dino", "ibot", "dinov2", "mae", "beit", "eva", "clip", "supervised")
DINO_FAMILY = ("dino", "ibot", "dinov2")
PRECISIONS = {"bf16": torch.bfloat16, "fp32": None}
# dense (no sparsity) tensor-core peaks from NVIDIA's datasheets, TFLOP/s
OPT_NAMES = {"forloop": "for-loop", "foreach": "foreach", "fused": "fused"}
DATASHEET = {"bf16": 989.0, "fp32": 67.0, "tf32": 494.5}
NOMINAL_TRAIN_IMAGES = {"small": 54_000, "imagenet": 1_281_167}  # Fashion-MNIST train split, ImageNet-1k


# ----------------------------------------------------------------------------------- device info
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "unknown CPU"
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("unknown CPU", platform.processor()):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    isa = [label for flag, label in (("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX-BF16"))
           if flag in flags]
    return f"{name}" + (f" ({', '.join(isa)})" if isa else "")


def datasheet_peak(name: str, precision: str) -> float | None:
    """Datasheet dense peak (TFLOP/s) for an H100 SXM or H200, else None."""
    n = name.upper()
    if not ("H200" in n or ("H100" in n and "PCIE" not in n and "NVL" not in n)):
        return None
    if precision == "fp32":
        return DATASHEET["tf32"] if torch.backends.cuda.matmul.allow_tf32 else DATASHEET["fp32"]
    return DATASHEET[precision]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


class PeakMemory:
    """CUDA: max_memory_allocated while active. CPU: growth of the resident set size over its
    value at entry (after glibc's malloc_trim), sampled every 10 ms (getrusage's high-water mark
    where /proc is missing)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_bytes = device, 0
        self.kind = "CUDA max allocated" if device.type == "cuda" else "RSS growth"
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        try:
            return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self._peak = max(self._peak, self._rss())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            gc.collect()
            with contextlib.suppress(OSError, AttributeError):  # glibc: hand freed heap pages back first
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            self._base = self._peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self._peak, self._rss()) - self._base

    @property
    def mib(self) -> float:
        return self.peak_bytes / 2**20


# ----------------------------------------------------------------------------------- peak
def matmul_peak(device: torch.device, precision: str, n: int, repeats: int = 5) -> float:
    """Best-of-`repeats` TFLOP/s of an n x n x n product after warmup (2 n^3 FLOPs each)."""
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    inner = 10 if device.type == "cuda" else 1
    for _ in range(3 if device.type == "cuda" else 1):
        for _ in range(inner):
            a @ b
    best = math.inf
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t0) / inner)
    return 2 * n**3 / best / 1e12


class Peaks:
    """Measured matmul peaks, per precision, measured once per run (lazily when `peak` is not run)."""

    def __init__(self, device: torch.device, n: int) -> None:
        self.device, self.n, self.values = device, n, {}

    def __call__(self, precision: str) -> float:
        if precision not in self.values:
            self.values[precision] = matmul_peak(self.device, precision, self.n)
        return self.values[precision]


def section_peak(ctx: Context) -> dict[str, Any]:
    rows = []
    for precision in ("fp32", "bf16"):
        tflops = ctx.peaks(precision)
        label = precision
        if precision == "fp32" and ctx.device.type == "cuda":
            label += " (TF32 on)" if torch.backends.cuda.matmul.allow_tf32 else " (TF32 off)"
        rows.append({"precision": precision, "label": label, "n": ctx.peaks.n, "tflops": tflops,
                     "datasheet_tflops": datasheet_peak(ctx.name, precision) if ctx.device.type == "cuda" else None})
    md = [f"### Dense matmul peak, measured ({ctx.name})", "",
          "| precision | product | measured TFLOP/s (best of 5) | datasheet TFLOP/s |", "|---|---|---|---|"]
    for r in rows:
        sheet = f"{r['datasheet_tflops']:.1f}" if r["datasheet_tflops"] else "—"
        md.append(f"| {r['label']} | {r['n']}^3 | {r['tflops']:.3f} | {sheet} |")
    return {"rows": rows, "markdown": "\n".join(md)}


# ----------------------------------------------------------------------------------- configs
def compose_cfg(overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir

    from vfm.config import CONF_DIR, register_resolvers

    register_resolvers()
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("pretrain", overrides=overrides)


def quick_overrides(method: str) -> list[str]:
    """Tiny sizes (a 2-block, 32-wide ViT with 7 px patches): seconds per method."""
    ov = ["backbone.patch_size=7", "++backbone.model_kwargs={depth: 2, embed_dim: 32, num_heads: 2}"]
    if method in DINO_FAMILY:
        ov += ["method.out_dim=64", "method.hidden_dim=64", "method.bottleneck_dim=32",
               "method.augment.local_crop_size=14", "method.augment.n_local=2"]
        if method != "dino":
            ov += ["method.patch_out_dim=64", "method.masking.min_num_patches=1"]
    elif method == "mae":
        ov += ["method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2"]
    elif method in ("beit", "eva"):
        ov += ["method.masking.min_num_patches=1"]
    elif method == "clip":
        ov += ["method.embed_dim=32", "method.text_tower.width=32", "method.text_tower.layers=1",
               "method.text_tower.heads=2", "method.text_tower.context_length=32"]
    return ov


def is_imagenet_sized(args: argparse.Namespace) -> bool:
    return bool(args.img and args.img > 32)


def method_overrides(method: str, args: argparse.Namespace) -> list[str]:
    """Overrides of `pretrain` for one method: the Fashion-MNIST recipe (conf/recipe/<m>_fashion_mnist.yaml,
    picked up with the default dataset), or ImageNet-sized synthetic RGB images with --img > 32
    (no recipe: the method's paper defaults; DINO-family: 2 global + --n-local local crops)."""
    ov = [f"method={method}"]
    if is_imagenet_sized(args):
        ov.append("dataset=synthetic_captions" if method == "clip" else "dataset=synthetic")
        ov += [f"dataset.img_size={args.img}", "dataset.in_chans=3", "dataset.mean=[0.485,0.456,0.406]",
               "dataset.std=[0.229,0.224,0.225]", "dataset.num_classes=1000"]
        if method in DINO_FAMILY:
            ov.append(f"method.augment.n_local={args.n_local}")
    else:
        if method == "clip":
            ov.append("dataset=fashion_mnist_captions")
        if args.img:
            ov.append(f"dataset.img_size={args.img}")
    if args.backbone:
        ov.append(f"backbone={args.backbone}")
    if args.quick:
        ov += quick_overrides(method)
    return ov


def default_batch(method: str, cfg: Any, args: argparse.Namespace, device: torch.device) -> int:
    if args.quick:
        return 16
    if not is_imagenet_sized(args):
        return int(cfg.trainer.batch_size)  # the recipe's
    if device.type == "cuda":
        return 64 if method in DINO_FAMILY else 256 if method == "mae" else 128
    return 4 if method in DINO_FAMILY else 16 if method == "mae" else 8


def parse_batch(spec: str | None) -> tuple[int | None, dict[str, int]]:
    """"64" -> all methods; "dino=64,mae=256" -> per method; "32,dino=8" -> both."""
    default, per = None, {}
    for part in filter(None, (spec or "").split(",")):
        if "=" in part:
            k, v = part.split("=", 1)
            per[k.strip()] = int(v)
        else:
            default = int(part)
    return default, per


def mim_artifacts(cfg: Any, method: str, root: Path, quick: bool) -> list[str]:
    """BEiT's tokenizer / EVA's teacher for this config's backbone (its patch size, image size and
    channels), random weights, as tests/conftest.py::mim_artifacts builds them."""
    from hydra.utils import instantiate

    from vfm.heads.tokenizer import Tokenizer

    torch.manual_seed(0)
    backbone = instantiate(cfg.backbone, drop_path_rate=0.0)
    tag = f"{backbone.name}-p{backbone.patch_size}-{cfg.dataset.img_size}-{cfg.dataset.in_chans}"
    if method == "beit":
        path = root / f"tokenizer-{tag}.pt"
        if not path.exists():
            codes = 16 if quick else 512 if cfg.dataset.img_size <= 32 else 8192
            Tokenizer(backbone, num_codes=codes, code_dim=8 if quick else 32, kmeans_init=False).save(path)
        return [f"method.tokenizer={path}"]
    if method in ("eva", "eva02"):
        path = root / f"teacher-{tag}.safetensors"
        if not path.exists():
            backbone.export(path)
        return [f"method.teacher={path}"]
    return []


# ----------------------------------------------------------------------------------- one measurement
@dataclass
class Spec:
    """One configuration to measure; the defaults are the project's own behaviour."""

    method: str
    overrides: list[str]
    batch: int | None = None
    precision: str = "bf16"
    compile: bool = False
    optimizer: str = "default"  # default (OptimSpec: foreach on CPU, fused on CUDA) | foreach | fused | forloop
    attention: str | None = None  # None: the project's choice; "fused" | "manual": everywhere in the method
    channels_last: bool = False
    mae_encode_all: bool = False  # MAE: the encoder runs on every patch, the decoder gets the visible ones
    count_flops: bool = True
    measure_data: bool = True
    steps: int = 5
    warmup: int = 2
    label: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    args: argparse.Namespace
    device: torch.device
    name: str
    peaks: Peaks
    tmp: Path
    results: dict[str, Any] = field(default_factory=dict)


def make_samples(cfg: Any, method: str, batch: int, seed: int) -> list[tuple[Any, ...]]:
    """What SeededDataset + SeededBatchSampler hand the collate: (image, label, seed), or
    (image, caption, label, seed) for image-text methods; synthetic uint8 images."""
    g = torch.Generator().manual_seed(1234)
    c, s = int(cfg.dataset.in_chans), int(cfg.dataset.img_size)
    images = torch.randint(0, 256, (batch, c, s, s), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, int(cfg.dataset.get("num_classes") or 10), (batch,), generator=g).tolist()
    if method == "clip":
        from vfm.data.prompts import CAPTION_TEMPLATES as templates
        from vfm.data.prompts import FASHION_MNIST_CLASS_NAMES_NATURAL as names

        caps = [templates[i % len(templates)].format(names[lab % len(names)]) for i, lab in enumerate(labels)]
        return [(images[i], caps[i], labels[i], seed) for i in range(batch)]
    return [(images[i], labels[i], seed) for i in range(batch)]


def build_collate(cfg: Any, method: torch.nn.Module) -> Callable:
    """Exactly as `vfm.pretrain.run` builds it."""
    from hydra.utils import instantiate

    from vfm.data.loader import MultiCropCollate

    augment = instantiate(cfg.method.augment)
    masking = instantiate(cfg.method.masking) if cfg.method.get("masking") is not None else None
    if hasattr(method, "build_collate"):
        return method.build_collate(augment)
    return MultiCropCollate(augment, masking=masking, patch_size=getattr(method.encoder, "patch_size", None))


def sched_values(cfg: Any, optim: Any, batch: int, n: int, imagenet: bool) -> dict[str, list[float]]:
    """Steps 0..n-1 of every schedule, built as `Trainer.fit` does (nominal epoch length)."""
    from hydra.utils import instantiate

    spe = max(1, NOMINAL_TRAIN_IMAGES["imagenet" if imagenet else "small"] // batch)
    epochs = int(cfg.trainer.max_epochs)
    arrays = {"lr": optim.lr_schedule(batch).build(spe, epochs), "wd": optim.wd_schedule().build(spe, epochs)}
    for name, node in (cfg.method.get("schedules") or {}).items():
        arrays[name] = instantiate(node).build(spe, epochs)
    return {k: [float(x) for x in v[:n].tolist()] + [float(v[-1])] * max(0, n - len(v)) for k, v in arrays.items()}


def describe_views(collate: Any, cfg: Any) -> str:
    aug = collate.augment
    views = f"{aug.n_global}x{aug.global_crop_size}" + (f" + {aug.n_local}x{aug.local_crop_size}" if aug.n_local else "")
    masking = cfg.method.get("masking")
    if masking is not None and "ratio" in masking:
        views += f", mask {masking.ratio}"
    return f"crops {views}"


def build_optimizer(kind: str, optim: Any, method: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    if kind == "default" or optim.name != "adamw":
        return optim.build(method.param_groups(), device.type)
    groups = [g for g in method.param_groups() if len(g["params"]) > 0]
    kw: dict[str, Any] = dict(lr=0.0, betas=optim.betas, eps=optim.eps, weight_decay=0.0)
    if kind == "fused":
        return torch.optim.AdamW(groups, fused=True, **kw)
    if kind == "foreach":
        return torch.optim.AdamW(groups, foreach=True, **kw)
    if kind == "forloop":
        return torch.optim.AdamW(groups, foreach=False, fused=False, **kw)
    raise ValueError(f"unknown optimizer kind {kind!r}")


def set_attention(method: torch.nn.Module, fused: bool) -> None:
    """The same attention everywhere in the method. timm reads `timm.layers.set_fused_attn` once, at
    module construction, into each Attention's `fused_attn`; vfm's Backbone then overwrites its own
    modules' flags on the first forward from `backbone.attn_impl` ("auto": fused on GPU, plain ops on
    CPU) and leaves other timm blocks (the MAE decoder) at timm's default (fused). So: set
    `attn_impl` on every Backbone and the flag on every other attention module."""
    from vfm.backbones import Backbone

    backbone_modules = set()
    for m in method.modules():
        if isinstance(m, Backbone):
            m.attn_impl = "fused" if fused else "manual"
            m._attn_device = None  # re-select on the next forward
            backbone_modules.update(id(x) for x in m.modules())
    for m in method.modules():
        if hasattr(m, "fused_attn") and id(m) not in backbone_modules:
            m.fused_attn = fused


def fused_attention_share(method: torch.nn.Module) -> str:
    flags = [bool(m.fused_attn) for m in method.modules() if hasattr(m, "fused_attn")]
    return f"{sum(flags)}/{len(flags)} attention modules fused"


def count_step_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of `fn()` (a forward + backward) under FlopCounterMode, with PyTorch's CPU flash
    attention kernels counted like the CUDA ones (the counter has no formula for them)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    custom: dict[Any, Any] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        def fwd(q, k, v, *args, out_shape=None, **kwargs):
            return sdpa_flop_count(q, k, v)

        def bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs):
            return sdpa_backward_flop_count(grad_out, q, k, v)

        custom[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
        custom[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    with FlopCounterMode(display=False, custom_mapping=custom) as fc:
        fn()
    return int(fc.get_total_flops())


def _encode_all(mae: torch.nn.Module) -> Callable:
    """MAE's forward_encoder with the encoder on every patch: the visible tokens are picked after
    the encoder, so the decoder and the loss see exactly what they see normally."""

    def forward_encoder(images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids_keep, ids_restore = mae.random_masking(mask)
        b, n = mask.shape
        everything = torch.arange(n, device=mask.device).expand(b, n)
        tokens = mae.backbone.forward_visible(images, everything)["tokens"]
        p = mae.backbone.num_prefix_tokens
        idx = ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        return torch.cat([tokens[:, :p], torch.gather(tokens[:, p:], 1, idx)], dim=1), ids_restore

    return forward_encoder


def _measure(ctx: Context, spec: Spec) -> dict[str, Any]:
    """Build the method, time its collate and its training step; see the module docstring."""
    from hydra.utils import instantiate

    from vfm.engine.optim import clip_gradients, set_optimizer_values
    from vfm.engine.trainer import channels_last_batch, to_device
    from vfm.pretrain import build_method

    device, args = ctx.device, ctx.args
    cfg = compose_cfg(spec.overrides)
    if spec.method in ("beit", "eva", "eva02"):
        cfg = compose_cfg(spec.overrides + mim_artifacts(cfg, spec.method, ctx.tmp, args.quick))
    batch = spec.batch or default_batch(spec.method, cfg, args, device)
    imagenet = int(cfg.dataset.img_size) > 32
    out: dict[str, Any] = {
        "method": spec.method, "label": spec.label, "backbone": str(cfg.backbone.name),
        "patch_size": cfg.backbone.get("patch_size"), "img_size": int(cfg.dataset.img_size), "batch": batch,
        "precision": spec.precision, "compile": spec.compile, "optimizer": spec.optimizer,
        "overrides": spec.overrides, **spec.extra,
    }
    mem = PeakMemory(device)
    with mem:
        method = build_method(cfg)
        collate = build_collate(cfg, method)
        out["views"] = describe_views(collate, cfg)
        if spec.mae_encode_all:
            method.forward_encoder = _encode_all(method)
        if spec.attention is not None:
            set_attention(method, spec.attention == "fused")
        method.to(device)
        if spec.channels_last:
            method.to(memory_format=torch.channels_last)
        method.train()

        # (a) data: the collate on the CPU, one warmup call, then distinct batch seeds
        n_batches = max(1, min(spec.steps, 2 if args.quick else 4))
        samples = make_samples(cfg, spec.method, batch, seed=0)
        collate([(*s[:-1], 10_000) for s in samples])
        batches, data_s = [], []
        for i in range(n_batches):
            t0 = time.perf_counter()
            b = collate([(*s[:-1], i) for s in samples])
            data_s.append(time.perf_counter() - t0)
            batches.append(b)
        batches = [to_device(b, device) for b in batches]
        if spec.channels_last:
            batches = [channels_last_batch(b) for b in batches]  # as the trainer does
        out["data_s"] = sum(data_s) / len(data_s) if spec.measure_data else None

        # (b) compute: one optimisation step as Trainer.fit runs it
        optim = instantiate(cfg.optim)
        optimizer = build_optimizer(spec.optimizer, optim, method, device)
        trainable = [p for g in optimizer.param_groups for p in g["params"]]
        n_total = spec.warmup + spec.steps + 1
        sv = sched_values(cfg, optim, batch, n_total, imagenet)

        if spec.count_flops:
            def fwd_bwd() -> None:
                with autocast(device, spec.precision):
                    loss = method(batches[0], 0, {k: v[0] for k, v in sv.items()})["loss"]
                loss.backward()

            out["flops_per_img"] = count_step_flops(fwd_bwd) / batch
            optimizer.zero_grad(set_to_none=True)

        model: torch.nn.Module = method
        if spec.compile:
            with contextlib.suppress(Exception):
                torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            model = torch.compile(method)

        def step(i: int) -> None:
            sched = {k: v[i] for k, v in sv.items()}
            set_optimizer_values(optimizer, sched["lr"], sched["wd"])
            with autocast(device, spec.precision):
                res = model(batches[i % len(batches)], i, sched)
            loss = res["loss"]
            float(loss.detach())  # the trainer's one read-back per step (non-finite check)
            loss.backward()
            clip_gradients(trainable, optim.clip_grad, optim.clip_mode)
            method.before_optimizer_step(i, sched)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            method.on_step_end(i, sched)

        warm_s = []
        for i in range(spec.warmup):
            sync(device)
            t0 = time.perf_counter()
            step(i)
            sync(device)
            warm_s.append(time.perf_counter() - t0)
        sync(device)
        t0 = time.perf_counter()
        for i in range(spec.warmup, spec.warmup + spec.steps):
            step(i)
        sync(device)
        compute_s = (time.perf_counter() - t0) / spec.steps
    out["attention"] = fused_attention_share(method)
    out["compute_s"] = compute_s
    out["first_steps_extra_s"] = max(0.0, sum(warm_s) - compute_s * len(warm_s))  # compile / first-call cost
    if spec.compile:
        out["compile_s"] = out["first_steps_extra_s"]
        with contextlib.suppress(Exception):
            out["compiled_graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    out["img_s"] = batch / compute_s
    if out["data_s"] is not None:
        out["img_s_with_data"] = batch / (out["data_s"] + compute_s)
        out["data_share"] = out["data_s"] / (out["data_s"] + compute_s)
    out["peak_mem_mib"], out["mem_kind"] = mem.mib, mem.kind
    if spec.count_flops:
        out["achieved_tflops"] = out["flops_per_img"] * out["img_s"] / 1e12
        peak = ctx.peaks(spec.precision)
        out["peak_tflops"], out["mfu"] = peak, out["achieved_tflops"] / peak
        sheet = datasheet_peak(ctx.name, spec.precision) if device.type == "cuda" else None
        out["mfu_datasheet"] = out["achieved_tflops"] / sheet if sheet else None
    return out


def measure(ctx: Context, spec: Spec) -> dict[str, Any]:
    try:
        return _measure(ctx, spec)
    finally:
        release(ctx.device)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def label_of(r: dict[str, Any]) -> str:
    return f"{r['backbone']}/{r['patch_size']}, {r['img_size']} px, {r.get('views', '')}"


# ----------------------------------------------------------------------------------- throughput
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


def throughput_markdown(ctx: Context, rows: list[dict[str, Any]]) -> str:
    prec = ctx.args.precision
    peak = ctx.peaks.values.get(prec)
    cuda = ctx.device.type == "cuda"
    sheet = datasheet_peak(ctx.name, prec) if cuda else None
    head = ["method", "setting", "batch", "data ms/batch", "compute ms/batch", "img/s (compute)",
            "img/s (incl. data, serial)", "data share", "GFLOP/img (fwd+bwd)", "achieved TFLOP/s",
            f"MFU vs measured {prec} peak ({peak:.3g} TFLOP/s)" if peak else "MFU"]
    if sheet:
        head.append(f"MFU vs datasheet ({sheet:g} TFLOP/s)")
    mem_kind = "CUDA max allocated" if cuda else "RSS growth"
    head.append(f"peak memory MiB ({mem_kind})")
    if ctx.args.compile:
        head.append("compile s")
    md = [f"### Training-step throughput ({prec}{', torch.compile' if ctx.args.compile else ''}, "
          f"synthetic uint8 images; data = collate on the CPU, compute = fwd+bwd+clip+optimizer+on_step_end)", "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            err = " ".join(r["error"].split())[:160].replace("|", "/")
            md.append(f"| {r['method']} | failed: {err} |" + " |" * (len(head) - 2))
            continue
        setting = label_of(r)
        cells = [r["method"], setting, str(r["batch"]), f"{1000 * r['data_s']:.1f}", f"{1000 * r['compute_s']:.1f}",
                 f"{r['img_s']:.1f}", f"{r['img_s_with_data']:.1f}", f"{100 * r['data_share']:.1f}%",
                 f"{r['flops_per_img'] / 1e9:.4g}", f"{r['achieved_tflops']:.4g}", f"{100 * r['mfu']:.2f}%"]
        if sheet:
            cells.append(f"{100 * r['mfu_datasheet']:.2f}%")
        cells.append(f"{r['peak_mem_mib']:.0f}")
        if ctx.args.compile:
            cells.append(f"{r.get('compile_s', 0.0):.1f}")
        md.append("| " + " | ".join(cells) + " |")
    return "\n".join(md)


# ----------------------------------------------------------------------------------- e2e
def section_e2e(ctx: Context) -> dict[str, Any]:
    """Trainer.fit of the DINO recipe on decoded images, num_workers 0 and 2."""
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

    args, device = ctx.args, ctx.device
    log_every = 2 if args.quick else 5
    max_steps = log_every * (3 if args.quick else 5)
    base = method_overrides("dino", argparse.Namespace(**{**vars(args), "img": None, "backbone": None}))
    base += ["logger=none", "evaluator=[]", "eval.baseline=false", "trainer.progress=false", "trainer.resume=never",
             f"trainer.max_steps={max_steps}", f"trainer.log_every_n_steps={log_every}",
             f"trainer.device={device.type}", f"trainer.precision={args.precision}"]
    if args.quick:
        base.append("trainer.batch_size=16")
    dataset_note = "Fashion-MNIST (decoded, in memory)"
    cfg = compose_cfg(base)
    try:
        splits = instantiate(cfg.dataset)
    except Exception as e:  # noqa: BLE001 - any reason the files are missing
        print(f"e2e: Fashion-MNIST unavailable ({type(e).__name__}: {e}); using dataset=synthetic", flush=True)
        base += ["dataset=synthetic", "dataset.num_train=8192"]
        dataset_note = "synthetic (Fashion-MNIST not found)"
        cfg = compose_cfg(base)
        splits = instantiate(cfg.dataset)
    rows = []
    for workers, on_device in ((0, False), (2, False), (2, True)):
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
        steady_ips = len(steady) / sum(1.0 / x for x in steady)  # equal intervals: the harmonic mean
        hist = res["history"][-1]["images_per_s"] if res["history"] else float("nan")
        rows.append({"num_workers": workers, "augment_on_device": on_device, "batch": int(c.trainer.batch_size),
                     "steps": res["step"],
                     "img_s": steady_ips, "img_s_incl_startup": hist, "wall_s": wall, "dataset": dataset_note})
        print(f"e2e num_workers={workers} augment_on_device={on_device}: {steady_ips:.1f} img/s (steady), "
              f"{hist:.1f} incl. start-up", flush=True)
        del method, trainer
        release(device)
    thr = next((r for r in ctx.results.get("throughput", []) if r.get("method") == "dino" and "error" not in r
                and r.get("setting") == "recipe" and r.get("precision") == args.precision and not r.get("compile")
                and r.get("batch") == rows[0]["batch"]), None)
    if thr is None:
        thr = measure(ctx, Spec("dino", method_overrides("dino", argparse.Namespace(**{**vars(args), "img": None,
                                                                                       "backbone": None})),
                                batch=rows[0]["batch"], precision=args.precision, count_flops=False,
                                steps=args.steps, warmup=args.warmup))
    md = [f"### End to end: `Trainer.fit`, DINO recipe, {dataset_note}, batch {rows[0]['batch']}, {args.precision}", "",
          "| num_workers | augmentation | trainer img/s (steady) | trainer img/s (incl. start-up) | "
          "compute-only img/s (`throughput`) | data+compute serial img/s (`throughput`) | trainer / compute-only |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        r["compute_only_img_s"], r["serial_img_s"] = thr["img_s"], thr.get("img_s_with_data")
        where = f"on the {device.type} (augment_on_device)" if r["augment_on_device"] else "in the loader"
        md.append(f"| {r['num_workers']} | {where} | {r['img_s']:.1f} | {r['img_s_incl_startup']:.1f} | {thr['img_s']:.1f} | "
                  f"{thr.get('img_s_with_data', float('nan')):.1f} | {r['img_s'] / thr['img_s']:.2f} |")
    return {"rows": rows, "markdown": "\n".join(md)}


# ----------------------------------------------------------------------------------- augment
def batch_tensors(x: Any) -> list[torch.Tensor]:
    """The tensors of a collated batch (nested dicts, lists, tuples)."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for v in x.values() for t in batch_tensors(v)]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in batch_tensors(v)]
    return []


def mib(tensors: list[torch.Tensor]) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def section_augment(ctx: Context) -> dict[str, Any]:
    """The DINO ImageNet multi-crop of one batch: in one CPU process vs on the device after transfer."""
    from hydra.utils import instantiate

    from vfm.data.loader import MultiCropCollate
    from vfm.engine.trainer import to_device

    args, device = ctx.args, ctx.device
    img = 64 if args.quick else 224
    cfg = compose_cfg(method_overrides("dino", argparse.Namespace(**{**vars(args), "img": img, "backbone": None})))
    aug = instantiate(cfg.method.augment)
    batch = 8 if args.quick else (64 if device.type == "cuda" else 16)
    reps = 2 if args.quick else 5
    c, size = int(cfg.dataset.in_chans), int(cfg.dataset.img_size)
    images = torch.randint(0, 256, (batch, c, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    samples = [(images[i], 0, 1234) for i in range(batch)]
    plain, deferred = MultiCropCollate(aug), MultiCropCollate(aug).deferred()

    crops = f"{aug.n_global}x{aug.global_crop_size} + {aug.n_local}x{aug.local_crop_size}"
    rows = []
    cpu_s = best_time(lambda: plain(samples), reps)
    rows.append({"where": f"CPU, one process ({torch.get_num_threads()} thread(s)), plain collate", "batch": batch,
                 "ms": 1e3 * cpu_s, "img_s": batch / cpu_s, "transfer_mib": mib(batch_tensors(plain(samples)))})
    raw = deferred(samples)
    on_dev = to_device(raw, device)

    def finish() -> None:
        deferred.finish(dict(on_dev))
        sync(device)

    dev_s = best_time(finish, reps)
    rows.append({"where": f"{ctx.name}: deferred collate's finish (augment_on_device)", "batch": batch,
                 "ms": 1e3 * dev_s, "img_s": batch / dev_s, "transfer_mib": mib(batch_tensors(raw))})
    md = [f"### Multi-crop augmentation: where it runs ({c}x{size}x{size} -> {crops}, best of {reps})", "",
          "| where | batch | ms / batch | img/s | MiB moved loader -> device per batch |", "|---|---|---|---|---|"]
    md += [f"| {r['where']} | {r['batch']} | {r['ms']:.1f} | {r['img_s']:.1f} | {r['transfer_mib']:.1f} |" for r in rows]
    copies = transfer_rows(plain(samples), raw, device, reps) if device.type == "cuda" else []
    if copies:
        md += ["", "Host-to-device copy of one batch (`trainer.pin_memory`: the DataLoader pins batches in a "
               "thread when on; a non-blocking copy from pinned memory is asynchronous):", "",
               "| batch | memory | MiB | ms / copy | GB/s |", "|---|---|---|---|---|"]
        md += [f"| {r['batch']} | {r['memory']} | {r['mib']:.1f} | {r['ms']:.2f} | {r['gb_s']:.1f} |" for r in copies]
    return {"rows": rows, "copies": copies, "markdown": "\n".join(md)}


def transfer_rows(plain: Any, deferred: Any, device: torch.device, reps: int) -> list[dict[str, Any]]:
    """The copy of a collated batch to the GPU from pageable vs pinned host memory (CUDA only)."""
    from vfm.engine.trainer import to_device

    rows = []
    for name, batch in (("float crops (loader augments)", plain), ("uint8 images (augment_on_device)", deferred)):
        host = batch_tensors(batch)
        size = mib(host)
        for memory, src in (("pageable", host), ("pinned", [t.pin_memory() for t in host])):
            def copy(src: list[torch.Tensor] = src) -> None:
                to_device(src, device)
                sync(device)

            sec = best_time(copy, reps)
            rows.append({"batch": name, "memory": memory, "mib": size, "ms": 1e3 * sec, "gb_s": size * 2**20 / sec / 1e9})
    return rows


# ----------------------------------------------------------------------------------- ablation
def reference_multicrop(aug: Any) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """A per-image torchvision v2 / PIL pipeline with the crops of `aug` (DINO's DataAugmentationDINO
    as in facebookresearch/dino: RandomResizedCrop bicubic, flip, colour jitter, grayscale, PIL
    Gaussian blur, solarize, to tensor, normalise), collated into one tensor per crop."""
    import random

    from PIL import Image, ImageFilter
    from torchvision.transforms import InterpolationMode, v2

    class PilBlur:
        def __init__(self, p: float, scale: float) -> None:
            self.p, self.scale = p, scale

        def __call__(self, img: Image.Image) -> Image.Image:
            if random.random() >= self.p:
                return img
            lo, hi = aug.blur_sigma
            return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(lo, hi) * self.scale))

    def view(size: int, scale: tuple[float, float], blur_p: float, solar_p: float, chans: int) -> v2.Compose:
        jitter = v2.ColorJitter(aug.brightness, aug.contrast, aug.saturation if chans == 3 else 0,
                                aug.hue if chans == 3 else 0)
        ops = [v2.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True),
               v2.RandomHorizontalFlip(aug.flip_p), v2.RandomApply([jitter], p=aug.color_jitter_p)]
        if chans == 3:
            ops.append(v2.RandomGrayscale(aug.grayscale_p))
        ops += [PilBlur(blur_p, aug.sigma_scale), v2.RandomSolarize(128, p=solar_p),
                v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(aug.mean), list(aug.std))]
        return v2.Compose(ops)

    def run(images: torch.Tensor) -> list[torch.Tensor]:
        chans = images.shape[1]
        views = [view(aug.global_crop_size, aug.global_scale, aug.blur_p[k % 2], aug.solarize_p[k % 2], chans)
                 for k in range(aug.n_global)]
        views += [view(aug.local_crop_size, aug.local_scale, aug.blur_p[2], aug.solarize_p[2], chans)] * aug.n_local
        per_image = []
        for img in images:
            arr = img.permute(1, 2, 0).numpy()
            pil = Image.fromarray(arr[..., 0] if chans == 1 else arr)
            per_image.append([t(pil) for t in views])
        return [torch.stack([p[k] for p in per_image]) for k in range(len(views))]

    return run


def augmentation_rows(ctx: Context) -> list[dict[str, Any]]:
    from hydra.utils import instantiate

    from vfm.data.loader import MultiCropCollate

    args = ctx.args
    settings = [("Fashion-MNIST recipe", method_overrides("dino", argparse.Namespace(**{**vars(args), "img": None,
                                                                                       "backbone": None})), None)]
    if not args.quick:
        settings.append(("224 px RGB, ImageNet DINO crops", method_overrides(
            "dino", argparse.Namespace(**{**vars(args), "img": 224, "backbone": None})), 16))
    rows = []
    for name, ov, batch in settings:
        cfg = compose_cfg(ov)
        aug = instantiate(cfg.method.augment)
        batch = batch or (16 if args.quick else int(cfg.trainer.batch_size))
        c, s = int(cfg.dataset.in_chans), int(cfg.dataset.img_size)
        images = torch.randint(0, 256, (batch, c, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        samples = [(images[i], 0, 0) for i in range(batch)]
        ours = MultiCropCollate(aug)
        ref = reference_multicrop(aug)
        reps = 2 if args.quick else 3
        on_s = best_time(lambda ours=ours, samples=samples: ours(samples), reps)
        off_s = best_time(lambda ref=ref, images=images: ref(images), reps)
        crops = f"{aug.n_global}x{aug.global_crop_size} + {aug.n_local}x{aug.local_crop_size}"
        rows.append(ab_row("batched uint8 multi-crop (MultiCropCollate) vs per-image torchvision v2 / PIL", "dino",
                           batch / off_s, batch / on_s, "img/s (augmentation only)",
                           f"{name}: {c}x{s}x{s} -> {crops}, batch {batch}, best of {reps}; "
                           f"{torch.get_num_threads()} torch thread(s) vs 1 PIL thread"))
    return rows


def best_time(fn: Callable[[], Any], reps: int) -> float:
    fn()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def ab_row(setting: str, method: str, off: float | None, on: float | None, unit: str, note: str = "") -> dict[str, Any]:
    ratio = on / off if (off and on) else None
    return {"setting": setting, "method": method, "off": off, "on": on, "ratio": ratio, "unit": unit, "note": note}


def teacher_row(ctx: Context, overrides: list[str], steps: int) -> dict[str, Any]:
    """DINO: the teacher's forward (no_grad, global crops) vs the student's forward+backward (all crops)."""
    from vfm.engine.trainer import to_device
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


def timed_device(fn: Callable[[], Any], steps: int, device: torch.device, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / steps


def optimizer_only_row(ctx: Context, overrides: list[str], method_name: str, off: str, on: str) -> dict[str, Any]:
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


def section_ablation(ctx: Context) -> dict[str, Any]:
    args, device = ctx.args, ctx.device
    steps = 2 if args.quick else max(2, args.steps - 2)
    warmup = 1
    cpu = device.type == "cpu"
    base_args = argparse.Namespace(**{**vars(args), "img": None, "backbone": None})
    rows: list[dict[str, Any]] = []

    def run(method: str, **kw: Any) -> dict[str, Any] | None:
        spec = Spec(method, kw.pop("overrides", method_overrides(method, base_args)), precision=kw.pop("precision", args.precision),
                    steps=kw.pop("steps", steps), warmup=kw.pop("warmup", warmup), count_flops=False, measure_data=False, **kw)
        try:
            return measure(ctx, spec)
        except Exception as e:  # noqa: BLE001 - report and go on
            if args.strict:
                raise
            print(f"ablation {method} {kw}: FAILED {type(e).__name__}: {e}", flush=True)
            return {"error": f"{type(e).__name__}: {e}"}

    def add(setting: str, method: str, off: dict[str, Any] | None, on: dict[str, Any] | None, note: str = "") -> None:
        bad = [r["error"] for r in (off, on) if r and "error" in r]
        if bad:
            rows.append(ab_row(setting, method, None, None, "img/s", f"skipped: {bad[0][:200]}"))
        else:
            rows.append(ab_row(setting, method, off["img_s"], on["img_s"], "img/s (training step)", note))
        print(f"ablation {method}: {setting}: {rows[-1]['off']} -> {rows[-1]['on']} {rows[-1]['note']}", flush=True)

    for m in ("dino", "mae"):
        base = run(m)  # the project's defaults: bf16, attn auto, eager, OptimSpec's AdamW
        if "error" in base:
            rows.append(ab_row("baseline", m, None, None, "img/s", f"failed: {base['error'][:200]}"))
            continue
        base_note = f"{base['backbone']}/{base['patch_size']}, {base['img_size']} px, batch {base['batch']}"
        other = "fp32" if args.precision == "bf16" else "bf16"
        fp = run(m, precision=other)
        if args.precision == "bf16":
            add("bf16 autocast vs fp32", m, fp, base, base_note)
        else:
            add("bf16 autocast vs fp32", m, base, fp, base_note)
        share = base["attention"].split()[0].split("/")  # the project's choice, e.g. "0/4" on the CPU
        manual = base if share[0] == "0" else run(m, attention="manual")
        fused = base if share[0] == share[1] else run(m, attention="fused")
        add("fused SDPA vs plain-op attention (all blocks)", m, manual, fused,
            f"{manual.get('attention', '')} -> {fused.get('attention', '')}; project default on {device.type}: "
            f"{base['attention']}")
        if args.no_compile_ablation or args.quick:
            why = "--quick: compiling takes minutes on a CPU" if args.quick else "--no-compile-ablation"
            rows.append(ab_row("torch.compile (mode default) vs eager", m, None, None, "img/s", f"skipped ({why})"))
        else:
            comp = run(m, compile=True, warmup=2, steps=steps)
            note = ("compile (first 2 steps minus steady time) "
                    f"{comp['compile_s']:.0f} s, {comp.get('compiled_graphs', '?')} graph(s)") if "error" not in comp else ""
            add("torch.compile (mode default) vs eager", m, base, comp, note)
        opt_default = "fused" if not cpu else "foreach"
        variants = {opt_default: base}
        for kind in ("forloop", "foreach", "fused"):
            if kind not in variants:
                variants[kind] = run(m, optimizer=kind)
        add("AdamW foreach vs for-loop (training step)", m, variants["forloop"], variants["foreach"])
        add("AdamW fused vs foreach (training step)", m, variants["foreach"], variants["fused"])
        ov = method_overrides(m, base_args)
        rows.append(optimizer_only_row(ctx, ov, m, "forloop", "foreach"))
        rows.append(optimizer_only_row(ctx, ov, m, "foreach", "fused"))
        if m == "mae":
            add("MAE encoder on visible patches only vs on every patch", m, run(m, mae_encode_all=True), base,
                "mask ratio 0.75 either way; the decoder and loss are the same")
        if m == "dino":
            rows.append(teacher_row(ctx, ov, steps))
            release(device)
            print(f"ablation dino: teacher {rows[-1]}", flush=True)

    rows += augmentation_rows(ctx)
    print(f"ablation augmentation: {rows[-1]}", flush=True)

    # channels_last for a CNN: ResNet-50 at 64 px (RGB synthetic), supervised and DINO
    cnn_args = argparse.Namespace(**{**vars(args), "img": None, "backbone": "resnet50", "quick": False})
    size = 32 if args.quick else 64
    for m, batch in (("supervised", 8 if args.quick else 32), ("dino", 4 if args.quick else 16)):
        ov = method_overrides(m, cnn_args) + ["dataset=synthetic", f"dataset.img_size={size}", "dataset.in_chans=3",
                                              "dataset.mean=[0.5,0.5,0.5]", "dataset.std=[0.25,0.25,0.25]"]
        if m == "dino":
            ov += ["method.out_dim=4096", "method.augment.n_local=2", f"method.augment.local_crop_size={size // 2}"]
        off = run(m, overrides=ov, batch=batch)
        on = run(m, overrides=ov, batch=batch, channels_last=True)
        add("channels_last vs contiguous (ResNet-50)", m, off, on, f"{size} px RGB, batch {batch}")

    md = [f"### Ablations ({device.type}, {args.precision} unless the row says otherwise; "
          f"{steps} timed steps after {warmup} warmup; ratio = on / off)", "",
          "| optimisation (on vs off) | method | off | on | on/off | unit | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        f = lambda v: "—" if v is None else f"{v:.4g}"
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        note = " ".join(str(r["note"]).split()).replace("|", "/")
        md.append(f"| {r['setting']} | {r['method']} | {f(r['off'])} | {f(r['on'])} | {ratio} | {r['unit']} | {note} |")
    return {"rows": rows, "markdown": "\n".join(md)}


# ----------------------------------------------------------------------------------- mae (mask ratio)
def mae_rows(name: str, overrides: list[str], batch: int, repeats: int) -> list[str]:
    from microbench import timed  # scripts/ is on sys.path when run as a script
    from torch.utils.flop_counter import FlopCounterMode

    from vfm.data.masking import random_masks
    from vfm.pretrain import build_method

    cfg = compose_cfg(["method=mae", *overrides])
    mae = build_method(cfg)
    size, chans, p = cfg.dataset.img_size, cfg.dataset.in_chans, mae.patch_size
    x = torch.randn(batch, chans, size, size)
    grid = size // p
    opt = torch.optim.AdamW([q for q in mae.parameters() if q.requires_grad], foreach=True)
    rows, base = [], None
    for ratio in (0.0, 0.5, 0.75, 0.9):
        mask = random_masks(batch, grid, ratio=ratio, generator=torch.Generator().manual_seed(0))
        ids_keep, _ = mae.random_masking(mask)
        with FlopCounterMode(display=False) as fc:
            mae.backbone.forward_visible(x[:1], ids_keep[:1])
        gflops = fc.get_total_flops() / 1e9

        def enc(ids_keep: torch.Tensor = ids_keep) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = mae.backbone.forward_visible(x, ids_keep)["tokens"]
            out.float().mean().backward()

        def step(mask: torch.Tensor = mask) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = mae.training_step({"crops": [x], "masks": [mask]}, 0, {})["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        enc_ms = 1000 * timed(enc, repeats)
        mae.zero_grad(set_to_none=True)
        ips = batch / timed(step, repeats)
        base = base or enc_ms
        rows.append(f"| {name} | {ratio:.2f} | {int(ids_keep.shape[1])} / {grid * grid} | {gflops:.3f} | "
                    f"{enc_ms:.0f} ({enc_ms / base:.2f}x) | {ips:.0f} |")
    return rows


def section_lightly(ctx: Context) -> dict[str, Any]:
    """vfm vs lightly, the same steps (see scripts/bench_lightly.py)."""
    import bench_lightly  # scripts/ is on sys.path when run as a script

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


def section_mae(ctx: Context) -> dict[str, Any]:
    """MAE's encoder cost vs the mask ratio (CPU, bf16 autocast; the README's table)."""
    repeats = 1 if ctx.args.quick else ctx.args.repeats
    md = ["### MAE encoder cost and the mask ratio (CPU, bf16 autocast)", "",
          "| MAE setting | mask ratio | visible patches | encoder GFLOPs / image (fwd) | "
          "encoder fwd+bwd ms / batch | full step img/s |", "|---|---|---|---|---|---|"]
    print("\n".join(md), flush=True)
    settings = [("ViT-Ti/6, 28 px, patch 4, batch 256 (Fashion-MNIST recipe)", ["dataset=fashion_mnist"], 256, repeats)]
    if ctx.args.quick:
        settings = [("tiny ViT, 28 px, patch 7, batch 16 (--quick)", ["dataset=fashion_mnist", *quick_overrides("mae")],
                     16, repeats)]
    else:
        settings.append(("ViT-B/16, 224 px, batch 16", ["backbone=vit_base", "dataset=synthetic", "dataset.img_size=224",
                                                        "dataset.in_chans=3", "dataset.mean=[0.5,0.5,0.5]",
                                                        "dataset.std=[0.25,0.25,0.25]"], 16, max(2, repeats // 2)))
    rows = []
    for name, ov, batch, reps in settings:
        for row in mae_rows(name, ov, batch, reps):
            print(row, flush=True)
            rows.append(row)
    return {"rows": rows, "markdown": "\n".join(md + rows), "streamed": True}


# ----------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    name = device_name(device)
    import timm

    threads = torch.get_num_threads()
    header = [f"# vfm benchmarks: {name}", "",
              f"device `{device.type}` ({name}{f', {threads} thread(s)' if device.type == 'cpu' else ''}), "
              f"torch {torch.__version__}, timm {timm.__version__}, precision {args.precision}"
              f"{', torch.compile' if args.compile else ''}{', --quick' if args.quick else ''}, "
              f"{datetime.datetime.now().isoformat(timespec='seconds')}", ""]
    print("\n".join(header), flush=True)
    with tempfile.TemporaryDirectory(prefix="vfm-bench-") as tmp:
        ctx = Context(args=args, device=device, name=name, peaks=Peaks(device, args.peak_n), tmp=Path(tmp))
        fns = {"peak": section_peak, "throughput": section_throughput, "e2e": section_e2e, "augment": section_augment,
               "ablation": section_ablation, "lightly": section_lightly, "mae": section_mae}
        report: dict[str, Any] = {
            "device": device.type, "device_name": name, "threads": threads, "torch": torch.__version__,
            "timm": timm.__version__, "cuda": torch.version.cuda, "precision": args.precision, "compile": args.compile,
            "quick": args.quick, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "args": {k: v for k, v in vars(args).items() if k != "sections_opt"}, "sections": {},
        }
        for section in args.sections:
            if section == "mae" and device.type != "cpu":
                print("mae: a CPU section; skipped on", device.type, flush=True)
                continue
            t0 = time.perf_counter()
            result = fns[section](ctx)
            result["seconds"] = time.perf_counter() - t0
            report["sections"][section] = result
            shown = "" if result.pop("streamed", False) else "\n" + result["markdown"] + "\n"
            print(shown + f"\n({section}: {result['seconds']:.0f} s)\n", flush=True)
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
