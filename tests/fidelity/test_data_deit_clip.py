"""The data pipeline, supervised pretraining (DeiT) and CLIP against their official code: crops
drawn from the whole image with bicubic resampling, DeiT's repeated-augmentation sampler, random
erasing and transform order, CLIP's parameter groups and pre-norm image tower, and the composed
paper configs against tables of the official values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import compose_cfg
from vfm.data.collate import MultiCropCollate, SupervisedCollate, stack_images
from vfm.data.crops import sample_crop_boxes
from vfm.data.datasets import ImageFileDataset, load_image
from vfm.data.erasing import random_erasing
from vfm.data.loader import build_train_loader
from vfm.data.sampler import SeededBatchSampler
from vfm.data.transforms import MultiCropAugmentation


def _aug(size: int, **kw) -> MultiCropAugmentation:
    kw = {"n_global": 1, "n_local": 0, "mean": (0.0,) * 3, "std": (1.0,) * 3, "flip_p": 0.0, "color_jitter_p": 0.0,
          "grayscale_p": 0.0, "blur_p": (0.0, 0.0, 0.0), "solarize_p": (0.0, 0.0, 0.0), **kw}
    return MultiCropAugmentation(global_crop_size=size, local_crop_size=size, **kw)


# ------------------------------------------------------------------ crops from the whole image
def _striped(width: int, height: int) -> Image.Image:
    """Red left edge, blue right edge, grey in between (RGB, width x height)."""
    a = np.full((height, width, 3), 128, dtype=np.uint8)
    a[:, : width // 10] = (255, 0, 0)
    a[:, width - width // 10 :] = (0, 0, 255)
    return Image.fromarray(a)


def test_training_view_is_the_whole_image_shrunk_with_its_aspect_ratio(tmp_path):
    path = tmp_path / "wide.png"
    _striped(400, 200).save(path)
    ds = ImageFileDataset([(str(path), 0)], resize=100, crop=100, in_chans=3, whole_for_training=True)
    assert ds[0][0].shape == (3, 100, 100)  # the evaluation view: resize + centre crop (no red, no blue)
    assert not (ds[0][0][0] == 255).any() and not (ds[0][0][2] == 255).any()
    whole = ds.for_training()[0][0]
    assert whole.shape == (3, 100, 200)  # shorter side 100, aspect kept: both edges are there
    assert (whole[:, :, 0] == torch.tensor([255, 0, 0])[:, None]).all()
    assert (whole[:, :, -1] == torch.tensor([0, 0, 255])[:, None]).all()
    # smaller images are not enlarged; an extreme aspect ratio is bounded (MAX_ASPECT = 2)
    assert load_image(path, resize=300, crop=None, in_chans=3).shape == (3, 200, 400)
    _striped(900, 100).save(tmp_path / "panorama.png")
    assert load_image(tmp_path / "panorama.png", resize=100, crop=None, in_chans=3).shape == (3, 22, 200)


def test_eval_view_resizes_bicubic(tmp_path):
    # DeiT / DINO / MAE evaluate on Resize(256, interpolation=3 = bicubic), CenterCrop(224)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8))
    img.save(tmp_path / "x.png")
    ours = load_image(tmp_path / "x.png", resize=40, crop=40, in_chans=3)
    ref = np.asarray(img.resize((60, 40), Image.BICUBIC))[:, 10:50]
    assert torch.equal(ours, torch.from_numpy(ref.copy()).permute(2, 0, 1))


def test_crop_boxes_cover_every_part_of_a_non_square_image():
    # torchvision RandomResizedCrop.get_params on the image's own (h, w): over many draws the
    # boxes reach all four edges of a 60 x 200 image, and each box lies inside it
    u = torch.rand(4000, 4, 10, generator=torch.Generator().manual_seed(0))
    hw = torch.tensor([[60.0, 200.0]] * 4000, dtype=torch.float64)
    top, left, h, w = sample_crop_boxes(u, hw[:, 0:1], hw[:, 1:2], (0.08, 1.0))
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 60).all() and (left + w <= 200).all()
    assert top.min() == 0 and left.min() == 0 and (top + h).max() == 60 and (left + w).max() == 200
    # per-image sizes give the same boxes as one size for all (the fixed-size path is unchanged)
    same = sample_crop_boxes(u, 60, 200, (0.08, 1.0))
    assert all(torch.equal(a, b) for a, b in zip(same, (top, left, h, w)))


def test_crops_of_a_padded_batch_see_the_edges_of_each_image():
    wide = torch.from_numpy(np.asarray(_striped(200, 60)).copy()).permute(2, 0, 1)
    square = torch.full((3, 64, 64), 128, dtype=torch.uint8)
    images, sizes = stack_images([wide, square])
    assert images.shape == (2, 3, 64, 200) and sizes == [(60, 200), (64, 64)]
    aug = _aug(16, global_scale=(0.05, 0.2))
    red = blue = 0
    for seed in range(40):
        crop = aug(images, torch.Generator().manual_seed(seed), sizes=sizes)[0]
        red += int((crop[0, 0] > 0.99).any() and (crop[0, 2] < 0.01).any())
        blue += int((crop[0, 2] > 0.99).any() and (crop[0, 0] < 0.01).any())
        # the square image never samples the canvas beyond its own 64 columns (it is all grey)
        assert torch.allclose(crop[1], torch.full_like(crop[1], 128 / 255), atol=1e-6)
    assert red > 0 and blue > 0


def test_training_loader_reads_whole_images(tmp_path):
    for i, (w, h) in enumerate([(90, 40), (40, 70), (50, 50), (80, 60)]):
        _striped(w, h).save(tmp_path / f"{i}.png")
    ds = ImageFileDataset([(str(tmp_path / f"{i}.png"), i) for i in range(4)], resize=40, crop=40, in_chans=3,
                          whole_for_training=True)
    loader, _ = build_train_loader(ds, batch_size=4, collate_fn=MultiCropCollate(_aug(24)), seed=0)
    collate = MultiCropCollate(_aug(24)).deferred()
    loader_raw, _ = build_train_loader(ds, batch_size=4, collate_fn=collate, seed=0)
    raw = next(iter(loader_raw))
    assert "sizes" in raw and max(h for h, _ in raw["sizes"]) == 70
    assert next(iter(loader))["crops"][0].shape == (4, 3, 24, 24)


# ------------------------------------------------------------------ image-text data: crops from the whole image too
def _image_text_splits(tmp_path, kind: str, whole_images: bool, n: int = 4):
    """``n`` pairs of one 160 x 120 striped image (4:3, so RandomResizedCrop(scale=(0.9, 1)) boxes
    can move sideways) as an image-text CSV or a webdataset shard, ``img_size`` 120."""
    import io
    import tarfile

    from vfm.data.image_text import image_text_csv, webdataset

    png = io.BytesIO()
    _striped(160, 120).save(png, format="PNG")
    if kind == "csv":
        (tmp_path / "wide.png").write_bytes(png.getvalue())
        (tmp_path / "pairs.csv").write_text("filepath,title\n" + "wide.png,a striped image\n" * n)
        return image_text_csv(str(tmp_path / "pairs.csv"), img_size=120, whole_images=whole_images)
    with tarfile.open(tmp_path / "shard-000000.tar", "w") as tf:
        for i in range(n):
            for name, data in ((f"s{i}.png", png.getvalue()), (f"s{i}.txt", b"a striped image")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return webdataset(str(tmp_path / "shard-000000.tar"), img_size=120, whole_images=whole_images)


@pytest.mark.parametrize("kind", ["csv", "shards"])
def test_image_text_training_view_is_the_whole_image(tmp_path, kind):
    train = _image_text_splits(tmp_path, kind, whole_images=True).train
    square = train[0][0]
    assert square.shape == (3, 120, 120)  # the evaluation view: centre square, columns 20..139 (no red, no blue)
    assert not (square[0] == 255).any() and not (square[2] == 255).any()
    whole = train.for_training()[0][0]
    assert whole.shape == (3, 120, 160)  # aspect kept: both striped edges are there
    assert (whole[:, :, 0] == torch.tensor([255, 0, 0])[:, None]).all()
    assert (whole[:, :, -1] == torch.tensor([0, 0, 255])[:, None]).all()
    assert train.for_training()[0][1] == "a striped image"
    # dataset.whole_images=false: training reads the centre square, as before
    (tmp_path / "old").mkdir()
    old = _image_text_splits(tmp_path / "old", kind, whole_images=False).train
    assert torch.equal(old.for_training()[0][0], square)


@pytest.mark.parametrize("kind", ["csv", "shards"])
def test_clip_crops_of_image_text_data_reach_the_image_edges(tmp_path, kind):
    # open_clip: RandomResizedCrop(224, scale=(0.9, 1.0), bicubic) of the decoded file, through
    # the training loader and the image-text collate as CLIP trains
    from vfm.data.collate import ImageTextCollate

    def edges(whole_images: bool) -> tuple[int, int, int]:
        root = tmp_path / str(whole_images)
        root.mkdir()
        train = _image_text_splits(root, kind, whole_images).train
        collate = ImageTextCollate(_aug(32, global_scale=(0.9, 1.0)), lambda c: torch.zeros(len(c), 1))
        loader, sampler = build_train_loader(train, batch_size=4, collate_fn=collate, seed=0)
        left = right = red_anywhere = 0
        for epoch in range(10):
            sampler.set_epoch(epoch)
            for batch in loader:
                x = batch["crops"][0]  # [4, 3, 32, 32] in [0, 1] (mean 0, std 1)
                red, blue = (x[:, 0] > 0.99) & (x[:, 2] < 0.01), (x[:, 2] > 0.99) & (x[:, 0] < 0.01)
                left += int(red[:, :, 0].all(dim=1).sum())  # the crop's first column is the image's red edge
                right += int(blue[:, :, -1].all(dim=1).sum())
                red_anywhere += int(red.any(dim=(1, 2)).sum())
        return left, right, red_anywhere

    left, right, _ = edges(True)
    assert left > 0 and right > 0
    # from the centre 120 x 120 square (columns 20..139) no crop sees either striped edge
    assert edges(False) == (0, 0, 0)


# ------------------------------------------------------------------ bicubic
def test_crops_are_bicubic_by_default():
    assert MultiCropAugmentation(global_crop_size=8, local_crop_size=4, mean=[0.5], std=[0.5]).interpolation == "bicubic"
    # scale (1, 1) on a square image is the whole image: the crop is a bicubic resize of it
    # (torch's cubic kernel, edge pixels repeated), clipped to [0, 1] as PIL clips to 0..255
    x = torch.randint(0, 256, (2, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    crop = _aug(30, global_scale=(1.0, 1.0))(x, torch.Generator().manual_seed(1))[0]
    ref = F.interpolate(x.float() / 255, size=(30, 30), mode="bicubic", align_corners=False).clamp(0, 1)
    assert torch.allclose(crop, ref, atol=1e-5)
    bilinear = _aug(30, global_scale=(1.0, 1.0), interpolation="bilinear")(x, torch.Generator().manual_seed(1))[0]
    assert torch.allclose(bilinear, F.interpolate(x.float() / 255, size=(30, 30), mode="bilinear"), atol=1e-5)
    with pytest.raises(ValueError, match="interpolation"):
        _aug(8, interpolation="nearest")


# ------------------------------------------------------------------ repeated augmentation
def _deit_ra_indices(n: int, epoch: int, repeats: int = 3) -> list[int]:
    """DeiT samplers.py RASampler(num_replicas=1): repeat_interleave(randperm(n, seed=epoch)), the
    first n // 256 * 256 positions."""
    g = torch.Generator().manual_seed(epoch)
    order = torch.repeat_interleave(torch.randperm(n, generator=g), repeats).tolist()
    return order[: n // 256 * 256]


def test_repeated_augmentation_is_deits_order():
    n = 512
    sampler = SeededBatchSampler(n, 64, seed=0, repeats=3)
    for epoch in (0, 3):
        sampler.set_epoch(epoch)
        order = sampler.global_order()
        assert len(order) == n  # an epoch is still one dataset's worth of samples
        assert order == _deit_ra_indices(n, epoch)
        # each image three times in a row (the last one may be cut by the epoch's end)
        counts = np.bincount(order, minlength=n)
        assert set(counts.tolist()) <= {0, 1, 2, 3} and (counts == 3).sum() == n // 3
        assert all(order[i] == order[i + 1] == order[i + 2] for i in range(0, n - 2, 3))


def test_repeated_augmentation_is_deterministic_resumable_and_elastic():
    n, bs = 300, 10
    one = SeededBatchSampler(n, bs, seed=5, repeats=3)
    one.set_epoch(2)
    full = list(one)
    one.set_epoch(2, start_batch=7)
    assert list(one) == full[7:]  # mid-epoch resume replays the same batches and seeds
    two = [SeededBatchSampler(n, bs, seed=5, rank=r, world_size=2, repeats=3) for r in range(2)]
    for s in two:
        s.set_epoch(2)
    per_rank = [list(s) for s in two]
    # the global batch of step k is the same on one process or two (same order, same chunk seeds)
    for k in range(len(per_rank[0])):
        assert per_rank[0][k] + per_rank[1][k] == full[2 * k] + full[2 * k + 1]


def test_repeated_augmentation_is_off_unless_the_method_asks():
    ds = torch.utils.data.TensorDataset(torch.zeros(8, 3, 8, 8, dtype=torch.uint8), torch.zeros(8, dtype=torch.long))
    _, sampler = build_train_loader(ds, batch_size=4, collate_fn=MultiCropCollate(_aug(8)))
    assert sampler.repeats == 1
    sup = SupervisedCollate(_aug(8), num_classes=2, randaugment=None, repeats=3)
    _, sampler = build_train_loader(ds, batch_size=4, collate_fn=sup)
    assert sampler.repeats == 3
    with pytest.raises(ValueError, match="repeats"):
        SeededBatchSampler(8, 4, repeats=0)


# ------------------------------------------------------------------ random erasing
def test_random_erasing_probability_and_pixel_mode():
    x = torch.full((4000, 3, 16, 16), 7.0)
    out = random_erasing(x, torch.Generator().manual_seed(0), probability=0.25, mode="pixel")
    erased = (out != 7.0).flatten(1)
    hit = erased.any(dim=1)
    assert abs(hit.float().mean().item() - 0.25) < 0.03  # DeiT --reprob 0.25
    frac = erased[hit].float().mean(dim=1)
    assert frac.min() >= 0.02 * 0.5 and frac.max() <= 1 / 3 + 0.05  # area U(0.02, 1/3) (rounded sides)
    noise = out[out != 7.0]
    assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 1.0) < 0.05  # per-pixel N(0, 1)
    # each erased region is one box, the same for every channel
    m = out[hit.nonzero()[0, 0]] != 7.0
    assert torch.equal(m[0], m[1]) and torch.equal(m[0], m[2])
    rows, cols = m[0].any(dim=1).nonzero().flatten(), m[0].any(dim=0).nonzero().flatten()
    assert m[0].sum() == len(rows) * len(cols) and rows.max() - rows.min() + 1 == len(rows)
    again = random_erasing(x, torch.Generator().manual_seed(0), probability=0.25, mode="pixel")
    assert torch.equal(out, again)
    const = random_erasing(x[:200], torch.Generator().manual_seed(0), probability=1.0, mode="const")
    assert ((const == 0) | (const == 7.0)).all() and (const == 0).any(dim=(1, 2, 3)).all()


# ------------------------------------------------------------------ DeiT's transform order
def test_randaugment_runs_on_the_crop_after_the_flip():
    seen: list[tuple[int, int]] = []

    def stub(img: Image.Image) -> Image.Image:  # records what RandAugment receives, returns a constant
        seen.append(img.size)
        return Image.new(img.mode, img.size, (77,) * len(img.getbands()))

    collate = SupervisedCollate(_aug(16, flip_p=0.5), num_classes=2, mixup=0.0, cutmix=0.0, erasing=0.0,
                                label_smoothing=0.0)
    collate.randaugment = stub
    images = torch.randint(0, 256, (4, 3, 48, 40), dtype=torch.uint8)
    batch = collate([(img, i % 2, 123) for i, img in enumerate(images)])
    assert seen == [(16, 16)] * 4  # the 16-px crops, not the 48 x 40 images
    # only normalisation (mean 0, std 1 here) runs after it: the crop and flip came first
    assert torch.allclose(batch["crops"][0], torch.full((4, 3, 16, 16), 77 / 255))


def test_supervised_collate_erases_after_normalising():
    collate = SupervisedCollate(_aug(16), num_classes=2, mixup=0.0, cutmix=0.0, randaugment=None, erasing=1.0,
                                label_smoothing=0.0)
    images = torch.full((6, 3, 32, 32), 255, dtype=torch.uint8)
    x = collate([(img, 0, 9) for img in images])["crops"][0]
    assert ((x != 1.0).flatten(1).any(dim=1)).all()  # every image erased with noise, the rest is 1.0


# ------------------------------------------------------------------ composed paper configs
DEIT = {  # facebookresearch/deit main.py defaults (DeiT-S/B, 300 epochs)
    "method.label_smoothing": 0.1,  # --smoothing
    "method.mixup": 0.8,  # --mixup
    "method.cutmix": 1.0,  # --cutmix
    "method.mixup_prob": 1.0,  # --mixup-prob
    "method.mixup_switch_prob": 0.5,  # --mixup-switch-prob
    "method.erasing": 0.25,  # --reprob
    "method.erasing_mode": "pixel",  # --remode
    "method.erasing_count": 1,  # --recount
    "method.repeated_aug": 3,  # --repeated-aug, RASampler num_repeats=3
    "method.augment.global_scale": [0.08, 1.0],  # timm RandomResizedCropAndInterpolation default
    "method.augment.flip_p": 0.5,  # timm hflip=0.5
    "method.augment.interpolation": "bicubic",  # --train-interpolation
    "method.augment.color_jitter_p": 0.0,  # timm drops --color-jitter when RandAugment is on
    "optim.weight_decay": 0.05,  # --weight-decay
    "optim.weight_decay_end": 0.05,
    "optim.warmup_epochs": 5,  # --warmup-epochs
    "optim.warmup_lr": 1e-6,  # --warmup-lr (timm CosineLRScheduler warmup_lr_init)
    "optim.min_lr": 1e-5,  # --min-lr
    "optim.betas": [0.9, 0.999],  # --opt-betas None: AdamW's default
    "optim.eps": 1e-8,  # --opt-eps
    "optim.clip_grad": 0.0,  # --clip-grad None
    "backbone.drop_path_rate": 0.1,  # --drop-path
}


def _select(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return list(node) if hasattr(node, "__len__") and not isinstance(node, str) else node


def test_deit_paper_config():
    cfg = compose_cfg(["method=supervised", "backbone=vit_base", "dataset=imagefolder", "dataset.root=/x", "~recipe"])
    for key, value in DEIT.items():
        assert _select(cfg, key) == pytest.approx(value), key
    assert cfg.method.randaugment.startswith("rand-m9-mstd0.5-inc1")  # --aa
    assert cfg.optim.blr * 512 / cfg.optim.lr_reference_batch == pytest.approx(5e-4)  # lr 5e-4 x batch / 512
    assert cfg.dataset.whole_images is True  # RandomResizedCrop of the decoded file


def test_deit_lr_warms_up_from_1e_6_to_the_peak_then_decays_to_1e_5():
    # deit main.py: timm CosineLRScheduler(warmup_lr_init=--warmup-lr 1e-6, warmup_t=5, lr_min=--min-lr 1e-5),
    # peak 5e-4 x 1024 / 512 = 1e-3; its warmup line is 1e-6 + t (peak - 1e-6) / 5 (per epoch; ours per step)
    from hydra.utils import instantiate

    cfg = compose_cfg(["method=supervised", "backbone=vit_base", "dataset=imagefolder", "dataset.root=/x", "~recipe"])
    steps_per_epoch, epochs = 1251, 300  # ImageNet-1k (1,281,167 images) at batch 1024
    lr = instantiate(cfg.optim).lr_schedule(1024).build(steps_per_epoch, epochs)
    warm = 5 * steps_per_epoch
    assert lr[0].item() == pytest.approx(1e-6, rel=1e-12)  # not 0
    assert lr[warm - 1].item() == pytest.approx(1e-3, rel=1e-12)  # the end of warmup: the peak
    ramp = 1e-6 + torch.arange(warm, dtype=torch.float64) * (1e-3 - 1e-6) / (warm - 1)
    assert torch.allclose(lr[:warm], ramp, rtol=1e-12, atol=0)
    assert lr[warm:].max().item() <= 1e-3 and lr[-1].item() == pytest.approx(1e-5, rel=1e-4)
    assert (lr[warm:] >= 1e-5).all()


CLIP = {  # mlfoundations/open_clip: params.py defaults, get_default_params for ViTs, ViT-B-16.json
    "method.init_logit_scale": math.log(1 / 0.07),  # model.py init_logit_scale
    "method.max_logit_scale": 100.0,  # train.py clamp_(0, math.log(100))
    "method.embed_dim": 512,  # ViT-B-16.json embed_dim
    "method.augment.global_scale": [0.9, 1.0],  # transform.py AugmentationCfg.scale
    "method.augment.interpolation": "bicubic",  # RandomResizedCrop(..., BICUBIC)
    "method.augment.flip_p": 0.0,
    "method.text_tower.context_length": 77,  # text_cfg
    "method.text_tower.width": 512,
    "method.text_tower.layers": 12,
    "method.text_tower.heads": 8,
    "optim.lr": 5e-4,  # get_default_params (vit)
    "optim.betas": [0.9, 0.98],
    "optim.eps": 1e-6,
    "optim.weight_decay": 0.2,  # --wd
    "optim.min_lr": 0.0,  # cosine_lr to 0
    "optim.clip_grad": 0.0,  # --grad-clip-norm None
    "method.decay_embeddings": True,  # legacy_main.py exclude rule
    "backbone.model_kwargs.pre_norm": True,  # ln_pre
}


def test_clip_paper_config():
    cfg = compose_cfg(["method=clip", "backbone=vit_base_clip", "dataset=image_text_csv", "dataset.train_csv=/x",
                       "~recipe"])
    for key, value in CLIP.items():
        assert _select(cfg, key) == pytest.approx(value), key
    assert cfg.dataset.whole_images is True  # RandomResizedCrop of the decoded file (transform.py image_transform)
    shards = compose_cfg(["method=clip", "backbone=vit_base_clip", "dataset=webdataset", "dataset.urls=/x", "~recipe"])
    assert shards.dataset.whole_images is True


def test_clip_weight_decay_groups_follow_open_clip():
    from vfm.backbones import Backbone
    from vfm.heads.text import TextTransformer
    from vfm.methods.clip import CLIP as ClipMethod

    backbone = Backbone("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1,
                        model_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2, "pre_norm": True})
    assert isinstance(backbone.model.norm_pre, torch.nn.LayerNorm)  # open_clip's ln_pre
    assert backbone.model.patch_embed.proj.bias is None  # conv1 has no bias
    method = ClipMethod(backbone, text_tower=TextTransformer(width=32, layers=1, heads=2, output_dim=16,
                                                             context_length=8), embed_dim=16)
    names = {id(p): n for n, p in method.named_parameters()}
    groups = {g["name"]: {names[id(p)] for p in g["params"]} for g in method.param_groups()}
    # open_clip: exclude = p.ndim < 2 or "bn"/"ln"/"bias" in name or logit_scale; its class_embedding
    # is 1-D (timm's cls_token is [1, 1, D]); positional embeddings are 2-D and decayed
    assert "logit_scale" in groups["no_decay"] and "backbone.model.cls_token" in groups["no_decay"]
    assert "backbone.model.norm_pre.weight" in groups["no_decay"]
    assert "backbone.model.pos_embed" in groups["decay"] and "text_tower.positional_embedding" in groups["decay"]
    assert "image_projection.weight" in groups["decay"] and "text_tower.token_embedding.weight" in groups["decay"]
    method.decay_embeddings = False  # open_clip's current make_wd_exclude: no_weight_decay() names too
    groups = {g["name"]: {names[id(p)] for p in g["params"]} for g in method.param_groups()}
    assert {"backbone.model.pos_embed", "text_tower.positional_embedding"} <= groups["no_decay"]
