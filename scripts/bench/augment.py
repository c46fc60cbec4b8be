"""`augment`: where the multi-crop augmentation of a DINO batch at the ImageNet setting (3 x 224 x 224
-> 2 x 224 + 10 x 96 crops) runs: the plain collate in one CPU process (all its torch threads: what
one DataLoader worker does with one thread is slower), and the deferred collate's `finish` on
--device after the transfer (`trainer.augment_on_device=true`, CUDA synchronised), with the bytes
one batch moves from the loader to the device either way; on CUDA also the copy of each kind of
batch from pageable vs pinned host memory (`trainer.pin_memory`). Also here: the per-image
torchvision / PIL pipeline that `ablation` compares the batched multi-crop with."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .common import Context, best_time, row, sync, table
from .configs import compose_cfg, crops_of, method_overrides, uint8_images, with_args


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

    from vfm.data.collate import MultiCropCollate
    from vfm.engine.device import to_device

    args, device = ctx.args, ctx.device
    cfg = compose_cfg(method_overrides("dino", with_args(args, img=64 if args.quick else 224, backbone=None)))
    aug = instantiate(cfg.method.augment)
    batch = 8 if args.quick else (64 if device.type == "cuda" else 16)
    reps = 2 if args.quick else 5
    images = uint8_images(cfg, batch, seed=0)
    samples = [(images[i], 0, 1234) for i in range(batch)]
    plain, deferred = MultiCropCollate(aug), MultiCropCollate(aug).deferred()

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
    c, size = images.shape[1], images.shape[-1]
    md = table(f"### Multi-crop augmentation: where it runs ({c}x{size}x{size} -> {crops_of(aug)}, best of {reps})",
               ["where", "batch", "ms / batch", "img/s", "MiB moved loader -> device per batch"])
    md += [row([r["where"], str(r["batch"]), f"{r['ms']:.1f}", f"{r['img_s']:.1f}", f"{r['transfer_mib']:.1f}"])
           for r in rows]
    copies = transfer_rows(plain(samples), raw, device, reps) if device.type == "cuda" else []
    if copies:
        md += table("\nHost-to-device copy of one batch (`trainer.pin_memory`: the DataLoader pins batches in a "
                    "thread when on; a non-blocking copy from pinned memory is asynchronous):",
                    ["batch", "memory", "MiB", "ms / copy", "GB/s"])
        md += [row([r["batch"], r["memory"], f"{r['mib']:.1f}", f"{r['ms']:.2f}", f"{r['gb_s']:.1f}"]) for r in copies]
    return {"rows": rows, "copies": copies, "markdown": "\n".join(md)}


def transfer_rows(plain: Any, deferred: Any, device: torch.device, reps: int) -> list[dict[str, Any]]:
    """The copy of a collated batch to the GPU from pageable vs pinned host memory (CUDA only)."""
    from vfm.engine.device import to_device

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
