"""Training-step throughput of vfm side by side with lightly (github.com/lightly-ai/lightly), for
DINO and MAE at the same configuration.

Both sides get the same timm backbone (built from the same `timm.create_model` keywords and loaded
with the same weights), the same head / decoder sizes, the same pre-made input tensors (DINO: the
multi-crop views; MAE: the image batch and its mask), the same precision (autocast), the same AdamW
(same param groups, lr, weight decay, foreach/fused choice), the same EMA teacher update and the same
gradient clipping. vfm's side is the method built from its Hydra config (`vfm.pretrain.build_method`)
stepped exactly as `vfm.engine.trainer.Trainer.fit` steps it; lightly's side is built here from
lightly's public modules (`MaskedVisionTransformerTIMM`, `DINOProjectionHead`, `DINOLoss`,
`MAEDecoderTIMM`, `lightly.models.utils`) the way lightly's own examples and ImageNet benchmarks
assemble them. The data pipeline (augmentation, mask drawing) is not timed on either side.

Timing is interleaved (one step of each side per round, the order alternating every round) so that
background load on a shared machine hits both sides alike; the median step time per side is
reported. Since both sides start from identical weights and inputs, their first-step losses must
agree (up to bf16 rounding); they are reported as a check that both do the same computation.

    python scripts/bench_lightly.py                                   # dino,mae at the CPU recipe
    python scripts/bench_lightly.py --methods dino --setting vit_b_224 --batch 8 --steps 3
    python scripts/bench_lightly.py --methods mae --profile 3         # + torch.profiler top ops

Needs `pip install lightly` (the `bench` extra).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LIGHTLY_MISSING = "pip install 'vfm[bench]' (lightly) for the side-by-side comparison"

# Hydra overrides per setting and method. "recipe": the small-box CPU recipes (conf/recipe/*_fashion_mnist);
# "vit_b_224": ViT-B/16 at 224 px, 3 channels, each method's paper defaults (conf/method/*.yaml);
# "tiny": the test suite's tiny model (seconds per step on a CPU).
_VIT_B = ["backbone=vit_base", "dataset=synthetic", "~recipe", "dataset.img_size=224", "dataset.in_chans=3",
          "dataset.mean=[0.5,0.5,0.5]", "dataset.std=[0.25,0.25,0.25]"]
_TINY = ["dataset=synthetic", "~recipe", "backbone.patch_size=7",
         "+backbone.model_kwargs={depth: 2, embed_dim: 32, num_heads: 2}"]
SETTINGS: dict[str, dict[str, list[str]]] = {
    "recipe": {"dino": ["method=dino", "dataset=fashion_mnist"], "mae": ["method=mae", "dataset=fashion_mnist"]},
    "vit_b_224": {"dino": ["method=dino", *_VIT_B], "mae": ["method=mae", *_VIT_B]},
    "tiny": {
        "dino": ["method=dino", *_TINY, "method.out_dim=64", "method.hidden_dim=64", "method.bottleneck_dim=32",
                 "method.augment.local_crop_size=14", "method.augment.n_local=2"],
        "mae": ["method=mae", *_TINY, "method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2"],
    },
}
# batch when none is given: the recipe's trainer.batch_size; small ones where a CPU step is slow
DEFAULT_BATCH = {"vit_b_224": 8, "tiny": 16}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _require_lightly() -> None:
    try:
        import lightly  # noqa: F401
    except ImportError as e:
        raise ImportError(LIGHTLY_MISSING) from e


def compose_cfg(method: str, setting: str, extra: list[str] | None = None):
    """The vfm config for `method` at `setting` (as tests/conftest.py::compose_cfg composes it)."""
    from hydra import compose, initialize_config_dir

    from vfm.config import CONF_DIR, register_resolvers

    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {list(SETTINGS)}, got {setting!r}")
    if method not in SETTINGS[setting]:
        raise ValueError(f"method must be one of {list(SETTINGS[setting])}, got {method!r}")
    register_resolvers()
    overrides = [*SETTINGS[setting][method], "trainer.progress=false", *(extra or [])]
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("pretrain", overrides=overrides)


def _n_params(module: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    if dtype is None:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def _clip_like_vfm(params: list[nn.Parameter], max_norm: float | None, mode: str) -> None:
    """Gradient clipping written for lightly's side with the same algorithm (and kernels) as
    `vfm.engine.optim.clip_gradients`; lightly has no clipping of its own (Lightning's
    `gradient_clip_val` is a global-norm clip)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not max_norm:
        return
    norms = torch._foreach_norm(grads)
    if mode == "global":
        total = torch.linalg.vector_norm(torch.stack(norms))
        torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp(max=1.0))
    else:
        torch._foreach_mul_(grads, [(max_norm / (n + 1e-6)).clamp(max=1.0) for n in norms])


def _adamw_like_vfm(groups: list[dict[str, Any]], optim_cfg: Any, device: torch.device) -> torch.optim.Optimizer:
    """The AdamW `vfm.engine.optim.OptimSpec.build` builds (betas, eps, foreach on CPU / fused on
    CUDA), for lightly's parameter groups."""
    fused = optim_cfg.fused if optim_cfg.fused is not None else device.type == "cuda"
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=0.0, betas=tuple(optim_cfg.betas), eps=float(optim_cfg.eps),
        weight_decay=0.0, fused=fused or None, foreach=None if fused else True,
    )


def _lightly_groups(*modules: nn.Module) -> list[dict[str, Any]]:
    """lightly's benchmark grouping (`get_weight_decay_parameters`: no decay on norms and biases)."""
    from lightly.models.utils import get_weight_decay_parameters

    decay, no_decay = get_weight_decay_parameters(list(modules))
    return [{"params": [p for p in decay if p.requires_grad], "wd_mult": 1.0},
            {"params": [p for p in no_decay if p.requires_grad], "wd_mult": 0.0}]


def _set_lr_wd(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    for g in optimizer.param_groups:
        g["lr"], g["weight_decay"] = lr, wd * g.get("wd_mult", 1.0)


def _set_fused_attn(module: nn.Module, fused: bool) -> None:
    for m in module.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused


def _fused_flags(module: nn.Module) -> set[bool]:
    return {bool(m.fused_attn) for m in module.modules() if hasattr(m, "fused_attn")}


_PROFILING = False


def _phase(name: str):
    """A profiler label for one phase of a step (only while `profile` runs: no cost when timing)."""
    if not _PROFILING:
        return contextlib.nullcontext()
    from torch.profiler import record_function

    return record_function(f"phase: {name}")


# ---------------------------------------------------------------------------------- vfm side
class VfmSide:
    """vfm's method, optimizer and step: the body of `Trainer.fit`'s loop for one optimisation step
    (accum_steps=1, one process), without logging and checkpointing."""

    def __init__(self, cfg: Any, device: torch.device, precision: str, sched: dict[str, float]) -> None:
        from hydra.utils import instantiate

        from vfm.pretrain import build_method

        self.method = build_method(cfg).to(device)
        self.optim = instantiate(cfg.optim)
        self.optimizer = self.optim.build(self.method.param_groups(), device.type)
        self.trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.device, self.precision, self.sched = device, precision, sched
        self.method.train()

    def step(self, batch: dict[str, Any], step: int) -> float:
        from vfm import distributed as vdist
        from vfm.engine.device import to_device
        from vfm.engine.optim import clip_gradients, set_optimizer_values

        method, optimizer, scaler, sched = self.method, self.optimizer, self.scaler, self.sched
        set_optimizer_values(optimizer, sched["lr"], sched["wd"])
        batch = to_device(batch, self.device)
        with _phase("forward + loss"), _autocast(self.device, self.precision):
            out = method(batch, step, sched)
        loss = out["loss"]
        loss_value = float(loss.detach())
        if vdist.all_reduce_max_flag(not math.isfinite(loss_value), self.device):
            raise FloatingPointError(f"vfm: non-finite loss {loss_value}")
        with _phase("backward"):
            scaler.scale(loss).backward()
        with _phase("clip"):
            scaler.unscale_(optimizer)
            clip_gradients(self.trainable, self.optim.clip_grad, self.optim.clip_mode)
            method.before_optimizer_step(step, sched)
        with _phase("optimizer"):
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        with _phase("ema"):
            method.on_step_end(step, sched)
        return loss_value


# ---------------------------------------------------------------------------------- lightly side
def _lightly_vit(backbone: nn.Module, drop_path_rate: float, pos_embed: str) -> nn.Module:
    """`MaskedVisionTransformerTIMM` around a timm ViT created with vfm's exact keywords and
    loaded with vfm's weights (lightly's own init is skipped: it is overwritten anyway)."""
    import timm
    from lightly.models.modules import MaskedVisionTransformerTIMM

    kwargs = {**backbone.create_kwargs, "drop_path_rate": drop_path_rate}
    vit = timm.create_model(backbone.name, pretrained=False, num_classes=0, **kwargs)
    wrapped = MaskedVisionTransformerTIMM(vit=vit, weight_initialization="skip", pos_embed_initialization=pos_embed)
    vit.load_state_dict(backbone.model.state_dict())
    return wrapped


class LightlyDINO(nn.Module):
    """DINO from lightly's parts, as in lightly's `benchmarks/imagenet/vitb16/dino.py`: student and
    teacher `MaskedVisionTransformerTIMM` + `DINOProjectionHead`, `DINOLoss` (with its center),
    `update_momentum` / `deactivate_requires_grad`; the teacher sees the global views, the student
    the global views and the local views in one batched pass per resolution."""

    def __init__(self, ours: nn.Module, cfg: Any) -> None:
        super().__init__()
        from lightly.loss import DINOLoss
        from lightly.models.modules import DINOProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        m = cfg.method
        if int(m.head_layers) != 3:
            raise ValueError("lightly's DINOProjectionHead has 3 layers; compare with method.head_layers=3")
        backbone = ours.student.backbone
        with warnings.catch_warnings():  # nn.utils.weight_norm's FutureWarning
            warnings.simplefilter("ignore", FutureWarning)
            heads = [DINOProjectionHead(
                input_dim=backbone.embed_dim, hidden_dim=int(m.hidden_dim), bottleneck_dim=int(m.bottleneck_dim),
                output_dim=int(m.out_dim), batch_norm=bool(m.use_bn_in_head), freeze_last_layer=-1,
                norm_last_layer=bool(m.norm_last_layer),
            ) for _ in range(2)]
        # vfm's DINO trains the (timm default, learnt) position embedding: "learn", not lightly's default sincos
        self.student_backbone = _lightly_vit(backbone, float(cfg.backbone.drop_path_rate), "learn")
        self.teacher_backbone = _lightly_vit(ours.teacher.backbone, 0.0, "learn")
        self.student_head, self.teacher_head = heads
        for head, src in ((self.student_head, ours.student.head), (self.teacher_head, ours.teacher.head)):
            _load_dino_head(head, src)
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)
        self.criterion = DINOLoss(
            output_dim=int(m.out_dim), warmup_teacher_temp=0.04, teacher_temp=0.04,
            student_temp=float(m.student_temp), center_momentum=float(m.center_momentum),
        )
        self.n_global = int(m.n_global_crops)

    def student_params(self) -> list[nn.Module]:
        return [self.student_backbone, self.student_head]

    def forward_student(self, x: torch.Tensor) -> torch.Tensor:
        return self.student_head(self.student_backbone(x).flatten(start_dim=1))

    def training_step(self, crops: list[torch.Tensor], teacher_temp: float, momentum: float) -> torch.Tensor:
        from lightly.models.utils import update_momentum

        with _phase("ema"):
            update_momentum(self.student_backbone, self.teacher_backbone, m=momentum)
            update_momentum(self.student_head, self.teacher_head, m=momentum)
        with _phase("forward + loss"):
            global_views = torch.cat(crops[: self.n_global])
            with torch.no_grad():
                teacher_out = self.teacher_head(self.teacher_backbone(global_views).flatten(start_dim=1))
            student_out = [self.forward_student(global_views)]
            i = self.n_global
            while i < len(crops):  # one pass per local resolution (all local views share one in DINO)
                j = i
                while j < len(crops) and crops[j].shape[-2:] == crops[i].shape[-2:]:
                    j += 1
                student_out.append(self.forward_student(torch.cat(crops[i:j])))
                i = j
            return self.criterion(
                teacher_out=list(teacher_out.chunk(self.n_global)),
                student_out=list(torch.cat(student_out).chunk(len(crops))),
                teacher_temp=teacher_temp,
            )


@torch.no_grad()
def _load_dino_head(head: nn.Module, src: nn.Module) -> None:
    linears = [m for m in head.layers if isinstance(m, nn.Linear)]
    for dst, s in zip(linears, [m for m in src.mlp if isinstance(m, nn.Linear)], strict=True):
        dst.weight.copy_(s.weight)
        dst.bias.copy_(s.bias)
    head.last_layer.weight_v.copy_(src.last_layer_v)
    head.last_layer.weight_g.copy_(src.last_layer_g)


class LightlyMAE(nn.Module):
    """MAE from lightly's parts, as in lightly's MAE example: `MaskedVisionTransformerTIMM` (fixed
    sin-cos position embedding) encodes the kept tokens (`idx_keep`, [CLS] included), `MAEDecoderTIMM`
    embeds them, `repeat_token` / `set_at_index` fill in mask tokens, the decoder runs on the whole
    sequence and predicts the pixels of the masked patches only (`get_at_index`); the target is
    `patchify` + `get_at_index`, per-patch normalised (`normalize_mean_var`) when norm_pix_loss, MSE."""

    def __init__(self, ours: nn.Module, cfg: Any) -> None:
        super().__init__()
        from lightly.models.modules import MAEDecoderTIMM

        m = cfg.method
        backbone = ours.backbone
        self.backbone = _lightly_vit(backbone, float(cfg.backbone.drop_path_rate), "sincos")
        vit = self.backbone.vit
        self.patch_size = int(backbone.patch_size)
        with warnings.catch_warnings():  # deprecated for MaskedVisionTransformerDecoderTIMM in 1.6
            warnings.simplefilter("ignore")
            self.decoder = MAEDecoderTIMM(
                num_patches=vit.patch_embed.num_patches, patch_size=self.patch_size, in_chans=ours.in_chans,
                embed_dim=backbone.embed_dim, decoder_embed_dim=int(m.decoder_dim), decoder_depth=int(m.decoder_depth),
                decoder_num_heads=int(m.decoder_heads), num_prefix_tokens=int(vit.num_prefix_tokens),
                mlp_ratio=float(m.mlp_ratio),
            )
        self.sequence_length = self.backbone.sequence_length
        self.norm_pix_loss = bool(m.norm_pix_loss)
        _load_mae_decoder(self.decoder, ours.decoder, vit.patch_embed.grid_size)

    def student_params(self) -> list[nn.Module]:
        return [self.backbone, self.decoder]

    def training_step(self, images: torch.Tensor, idx_keep: torch.Tensor, idx_mask: torch.Tensor) -> torch.Tensor:
        from lightly.models import utils

        x_encoded = self.backbone.encode(images=images, idx_keep=idx_keep)
        x_decode = self.decoder.embed(x_encoded)
        x_masked = utils.repeat_token(self.decoder.mask_token, (images.shape[0], self.sequence_length))
        x_masked = utils.set_at_index(x_masked, idx_keep, x_decode.type_as(x_masked))
        x_decoded = self.decoder.decode(x_masked)
        pred = self.decoder.predict(utils.get_at_index(x_decoded, idx_mask))
        target = utils.get_at_index(utils.patchify(images, self.patch_size), idx_mask - 1)  # no [CLS] in patches
        if self.norm_pix_loss:
            target = utils.normalize_mean_var(target, dim=-1)
        return F.mse_loss(pred, target)


@torch.no_grad()
def _load_mae_decoder(dec: nn.Module, src: nn.Module, grid: tuple[int, int]) -> None:
    dec.decoder_embed.load_state_dict(src.embed.state_dict())
    dec.mask_token.copy_(src.mask_token)
    dec.decoder_blocks.load_state_dict(src.blocks.state_dict())
    dec.decoder_norm.load_state_dict(src.norm.state_dict())
    dec.decoder_pred.load_state_dict(src.pred.state_dict())
    table = src.pos_embed(tuple(grid), dec.decoder_pos_embed.shape[-1], dec.decoder_pos_embed.device)
    dec.decoder_pos_embed.zero_()  # prefix slots: 0, as vfm's decoder
    dec.decoder_pos_embed[0, -table.shape[0]:] = table


class LightlySide:
    """lightly's modules stepped as a Lightning `training_step` + optimizer step would be, with the
    optimizer, lr/wd, clipping and precision of vfm's side."""

    def __init__(self, method: str, ours: VfmSide, cfg: Any, device: torch.device, precision: str,
                 sched: dict[str, float]) -> None:
        self.kind = method
        self.model = (LightlyDINO if method == "dino" else LightlyMAE)(ours.method, cfg).to(device)
        self.optim = ours.optim
        self.optimizer = _adamw_like_vfm(_lightly_groups(*self.model.student_params()), cfg.optim, device)
        self.trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.device, self.precision, self.sched = device, precision, sched
        self.model.train()

    def step(self, batch: dict[str, Any], step: int) -> float:
        sched, optimizer, scaler = self.sched, self.optimizer, self.scaler
        _set_lr_wd(optimizer, sched["lr"], sched["wd"])
        with _autocast(self.device, self.precision):
            if self.kind == "dino":  # its EMA update comes first, labelled inside
                loss = self.model.training_step(batch["crops"], sched["teacher_temp"], sched["teacher_momentum"])
            else:
                with _phase("forward + loss"):
                    loss = self.model.training_step(batch["images"], batch["idx_keep"], batch["idx_mask"])
        loss_value = float(loss.detach())
        with _phase("backward"):
            scaler.scale(loss).backward()
        with _phase("clip"):
            scaler.unscale_(optimizer)
            _clip_like_vfm(self.trainable, self.optim.clip_grad, self.optim.clip_mode)
            if self.kind == "dino":
                self.model.student_head.cancel_last_layer_gradients(current_epoch=1)  # freeze_last_layer=-1: no-op
        with _phase("optimizer"):
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        return loss_value


# ---------------------------------------------------------------------------------- inputs, schedules
def _schedule_values(cfg: Any, side: VfmSide, batch: int) -> dict[str, float]:
    """This step's scheduled values as the trainer computes them (`sched`), read at the start of the
    second epoch (past the lr warmup of both recipes); the last-layer freeze is off on both sides
    (lightly: freeze_last_layer=-1), so both update every parameter."""
    from hydra.utils import instantiate

    steps_per_epoch, epochs = 100, int(cfg.trainer.max_epochs)
    arrays = {"lr": side.optim.lr_schedule(batch).build(steps_per_epoch, epochs),
              "wd": side.optim.wd_schedule().build(steps_per_epoch, epochs)}
    for name, spec in (cfg.method.get("schedules") or {}).items():
        arrays[name] = instantiate(spec).build(steps_per_epoch, epochs)
    idx = min(steps_per_epoch, steps_per_epoch * epochs - 1)
    sched = {k: float(v[idx]) for k, v in arrays.items()}
    if "freeze_last_layer" in sched:
        sched["freeze_last_layer"] = 0.0
    return sched


def _inputs(method: str, cfg: Any, batch: int, device: torch.device, patch_size: int) -> tuple[dict, dict]:
    """(vfm batch, lightly batch): the same tensors, in each library's format."""
    g = torch.Generator().manual_seed(0)
    chans = int(cfg.dataset.in_chans)
    if method == "dino":
        aug = cfg.method.augment
        sizes = [int(aug.global_crop_size)] * int(aug.n_global) + [int(aug.local_crop_size)] * int(aug.n_local)
        crops = [torch.randn(batch, chans, s, s, generator=g).to(device) for s in sizes]
        return {"crops": crops, "label": torch.zeros(batch, dtype=torch.long, device=device)}, {"crops": crops}
    from lightly.models.utils import random_token_mask

    size = int(cfg.dataset.img_size)
    images = torch.randn(batch, chans, size, size, generator=g).to(device)
    n = (size // patch_size) ** 2
    torch.manual_seed(0)
    idx_keep, idx_mask = random_token_mask((batch, n + 1), mask_ratio=float(cfg.method.masking.ratio))
    # the same mask as vfm's collate gives it (True = masked), from lightly's indices ([CLS] = index 0)
    mask = torch.ones(batch, n, dtype=torch.bool).scatter_(1, idx_keep[:, 1:] - 1, False)
    ours = {"crops": [images], "masks": [mask.to(device)], "label": torch.zeros(batch, dtype=torch.long, device=device)}
    return ours, {"images": images, "idx_keep": idx_keep.to(device), "idx_mask": idx_mask.to(device)}


# ---------------------------------------------------------------------------------- the comparison
def _differences(method: str, cfg: Any, ours: VfmSide, theirs: LightlySide, attention: str) -> list[str]:
    enc_ours, enc_theirs = _fused_flags(ours.method.encoder.model), _fused_flags(
        theirs.model.student_backbone if method == "dino" else theirs.model.backbone)
    clip = ours.optim.clip_grad
    diffs = [
        f"attention: vfm encoder fused SDPA={sorted(enc_ours)} (backbone.attn_impl={cfg.backbone.attn_impl}), "
        f"lightly encoder fused SDPA={sorted(enc_theirs)} (timm default)"
        + (f"; MAE decoder: vfm fused SDPA={sorted(_fused_flags(ours.method.decoder))} (as "
           f"backbone.attn_impl), lightly {sorted(_fused_flags(theirs.model.decoder))}"
           if method == "mae" else "")
        + ("" if attention == "default" else "; --attention same: lightly set to vfm's choice per module"),
        "lightly's MaskedVisionTransformerTIMM holds an extra (unused, gradient-free) mask_token "
        f"[1, 1, {ours.method.encoder.embed_dim}]",
        "clipping: " + (f"{ours.optim.clip_mode} at {clip} on both (vfm's clip_gradients; the same kernels "
                        "written here for lightly)" if clip else
                        "none on either side, but vfm's trainer still computes the total gradient norm "
                        "(foreach_norm + stack + norm) for logging"),
    ]
    if method == "dino":
        diffs += [
            "DINO head: vfm computes the L2-normalised last layer (bottleneck -> out_dim) in fp32 with autocast "
            "off; lightly's weight-normed last layer (nn.utils.weight_norm hook) runs under autocast (bf16 matmul)",
            "DINO loss: vfm casts the outputs to fp32 and loops over the (teacher, student) pairs, skipping the "
            "diagonal (n_global x (n_crops - 1) products); lightly stacks them and takes one einsum over all "
            "n_global x n_crops pairs (autocast dtype), then zeroes the diagonal",
            "DINO loss: vfm also computes the teacher entropy each step (for logging)",
            "DINO head: vfm runs the head once on all crops' features, lightly once per resolution "
            "(global, local)",
            "EMA: vfm after the optimizer step (on_step_end), lightly at the start of the step (as lightly's "
            "benchmark); the same foreach kernels",
        ]
    else:
        diffs += [
            "MAE decoder: vfm predicts (decoder_pred) all patches and masks the loss; lightly gathers the masked "
            "tokens first and predicts only those",
            "MAE masking: vfm's step turns the bool mask into ids_keep/ids_restore (2 argsorts + 1 host sync); "
            "lightly gets index tensors (drawn with random_token_mask outside the timed step, as vfm's masks "
            "are drawn in its collate); vfm keeps visible tokens in patch order, lightly in random order",
            "MAE decoder: lightly builds the decoder input with repeat_token + scatter (set_at_index), vfm with "
            "cat + gather; lightly's decoder pos-embed is a frozen Parameter, vfm's a cached tensor",
        ]
    return diffs


def _param_report(method: str, ours: VfmSide, theirs: LightlySide) -> dict[str, dict[str, int]]:
    o, t = ours.method, theirs.model
    if method == "dino":
        o_bb, o_head, t_bb, t_head = o.student.backbone.model, o.student.head, t.student_backbone, t.student_head
    else:
        o_bb, o_head, t_bb, t_head = o.backbone.model, o.decoder, t.backbone, t.decoder
    return {
        "ours": {"backbone": _n_params(o_bb), "backbone_trainable": _n_params(o_bb, True),
                 "head": _n_params(o_head), "head_trainable": _n_params(o_head, True),
                 "optimized": sum(p.numel() for p in ours.trainable)},
        "theirs": {"backbone": _n_params(t_bb.vit), "backbone_trainable": _n_params(t_bb.vit, True),
                   "backbone_wrapper_extra": _n_params(t_bb) - _n_params(t_bb.vit),
                   "head": _n_params(t_head), "head_trainable": _n_params(t_head, True),
                   "optimized": sum(p.numel() for p in theirs.trainable)},
    }


def _time_step(fn: Callable[[], float], device: torch.device) -> tuple[float, float]:
    _sync(device)
    t0 = time.perf_counter()
    loss = fn()
    _sync(device)
    return time.perf_counter() - t0, loss


def sides_for_cfg(method: str, cfg: Any, batch: int, *, precision: str = "bf16",
                  device: str = "cpu") -> tuple[VfmSide, LightlySide]:
    """(ours, theirs) for any vfm config of `method` ("dino" or "mae"): vfm's method built from it,
    lightly's modules with its weights, both with the scheduled values of the second epoch."""
    _require_lightly()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    dev = torch.device(device)
    ours = VfmSide(cfg, dev, precision, sched={})
    ours.sched = _schedule_values(cfg, ours, batch)
    return ours, LightlySide(method, ours, cfg, dev, precision, ours.sched)


def build_sides(method: str, *, setting: str = "recipe", batch: int | None = None, precision: str = "bf16",
                device: str = "cpu", n_local: int | None = None, attention: str = "default"):
    """(cfg, batch, ours, theirs, ours_batch, theirs_batch): both sides ready to step."""
    _require_lightly()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if attention not in ("default", "same"):
        raise ValueError(f"attention must be 'default' or 'same', got {attention!r}")
    extra = [f"method.augment.n_local={n_local}"] if (n_local is not None and method == "dino") else []
    cfg = compose_cfg(method, setting, extra)
    batch = int(batch or DEFAULT_BATCH.get(setting, cfg.trainer.batch_size))
    dev = torch.device(device)
    ours, theirs = sides_for_cfg(method, cfg, batch, precision=precision, device=device)
    encoder = ours.method.encoder
    encoder._select_attention(dev)  # what vfm's backbone picks on this device (attn_impl)
    if attention == "same":
        t_enc = theirs.model.student_backbone if method == "dino" else theirs.model.backbone
        _set_fused_attn(t_enc, next(iter(_fused_flags(encoder.model))))
        if method == "dino":
            _set_fused_attn(theirs.model.teacher_backbone, next(iter(_fused_flags(encoder.model))))
        else:
            _set_fused_attn(theirs.model.decoder, next(iter(_fused_flags(ours.method.decoder))))
    ours_batch, theirs_batch = _inputs(method, cfg, batch, dev, int(encoder.patch_size))
    return cfg, batch, ours, theirs, ours_batch, theirs_batch


def compare(method: str, *, setting: str = "recipe", batch: int | None = None, steps: int = 5, warmup: int = 3,
            precision: str = "bf16", device: str = "cpu", n_local: int | None = None,
            attention: str = "default") -> dict[str, Any]:
    """Median training-step throughput of vfm and lightly for `method` ("dino" or "mae").

    `steps` timed steps per side, interleaved one by one (ours, theirs, theirs, ours, ...) after
    `warmup` untimed steps per side. `attention="same"` gives lightly's ViT blocks vfm's attention
    kernel choice (by default each side uses its own: vfm plain ops on CPU, timm fused SDPA).
    """
    cfg, batch, ours, theirs, ours_batch, theirs_batch = build_sides(
        method, setting=setting, batch=batch, precision=precision, device=device, n_local=n_local,
        attention=attention)
    dev = torch.device(device)
    first: dict[str, float] = {}
    step = 0

    def run(side: str) -> float:
        loss = ours.step(ours_batch, step) if side == "ours" else theirs.step(theirs_batch, step)
        first.setdefault(side, loss)
        return loss

    for _ in range(warmup):
        run("ours")
        run("theirs")
        step += 1
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    gc.collect()
    for r in range(steps):
        for side in (("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")):
            dt, _ = _time_step(lambda side=side: run(side), dev)
            times[side].append(dt)
        step += 1
    med = {k: statistics.median(v) for k, v in times.items()}
    ips = {k: batch / v for k, v in med.items()}
    return {
        "method": method, "setting": setting, "batch": batch, "steps": steps, "warmup": warmup,
        "precision": precision, "device": device, "threads": torch.get_num_threads(), "attention": attention,
        "crops": ([tuple(c.shape[-2:]) for c in ours_batch["crops"]] if method == "dino"
                  else [tuple(ours_batch["crops"][0].shape[-2:])]),
        "ours_img_s": ips["ours"], "theirs_img_s": ips["theirs"], "ratio": ips["ours"] / ips["theirs"],
        "ours_step_s": times["ours"], "theirs_step_s": times["theirs"],
        "first_loss": {"ours": first.get("ours"), "theirs": first.get("theirs")},
        "params": _param_report(method, ours, theirs),
        "sched": ours.sched,
        "differences": _differences(method, cfg, ours, theirs, attention),
    }


def profile(method: str, *, steps: int = 3, warmup: int = 2, row_limit: int = 15, **kw: Any) -> dict[str, str]:
    """torch.profiler tables of `steps` steps of each side after `warmup` untimed ones: the time per
    phase of the step (forward + loss, backward, clip, optimizer, EMA) and the top ops by self time."""
    global _PROFILING
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    _, _, ours, theirs, ours_batch, theirs_batch = build_sides(method, **kw)
    cuda = kw.get("device", "cpu") != "cpu"
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    out = {}
    for name, side, b in (("vfm", ours, ours_batch), ("lightly", theirs, theirs_batch)):
        for i in range(warmup):
            side.step(b, i)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        _PROFILING = True
        try:
            with tprofile(activities=activities) as prof:
                for i in range(steps):
                    side.step(b, warmup + i)
                    _sync(torch.device(kw.get("device", "cpu")))
        finally:
            _PROFILING = False
        events = prof.key_averages()
        phases = sorted((e for e in events if e.key.startswith("phase: ")), key=lambda e: -e.cpu_time_total)
        total = sum(e.cpu_time_total for e in phases)
        lines = [f"{e.key[7:]:>16}: {e.cpu_time_total / 1e3 / steps:9.1f} ms/step (CPU wall incl. children)"
                 + (f", {e.device_time_total / 1e3 / steps:8.1f} ms/step on the GPU" if cuda else "")
                 for e in phases]
        lines.append(f"{'sum':>16}: {total / 1e3 / steps:9.1f} ms/step")
        out[name] = "\n".join(lines) + "\n\n" + events.table(sort_by=sort, row_limit=row_limit, max_name_column_width=48)
    return out


def format_table(results: list[dict[str, Any]]) -> str:
    lines = ["| method | setting | batch | vfm img/s | lightly img/s | ours/theirs |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['method']} | {r['setting']} | {r['batch']} | {r['ours_img_s']:.1f} | "
                     f"{r['theirs_img_s']:.1f} | {r['ratio']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="dino,mae", help="comma-separated: dino, mae")
    ap.add_argument("--setting", default="recipe", choices=list(SETTINGS))
    ap.add_argument("--batch", type=int, default=None, help="default: the recipe's trainer.batch_size "
                    f"(recipe), else {DEFAULT_BATCH}")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per side (interleaved)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
    ap.add_argument("--precision", default="bf16", choices=list(PRECISIONS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n-local", type=int, default=None, help="DINO local crops (default: the config's)")
    ap.add_argument("--attention", default="default", choices=["default", "same"])
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="also profile N steps of each side")
    ap.add_argument("-v", "--verbose", action="store_true", help="print parameter counts, losses, differences")
    args = ap.parse_args(argv)
    try:
        _require_lightly()
    except ImportError as e:
        print(e, file=sys.stderr)
        return 2
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.precision} autocast, "
          f"device {args.device}, median of {args.steps} interleaved steps after {args.warmup} warmup\n", flush=True)
    results = []
    for m in methods:
        r = compare(m, setting=args.setting, batch=args.batch, steps=args.steps, warmup=args.warmup,
                    precision=args.precision, device=args.device, n_local=args.n_local, attention=args.attention)
        results.append(r)
        if args.verbose:
            print(f"{m}: crops {r['crops']}, first-step loss {r['first_loss']}, params {r['params']}")
            print("  per-step s: vfm " + " ".join(f"{t:.3f}" for t in r["ours_step_s"])
                  + " | lightly " + " ".join(f"{t:.3f}" for t in r["theirs_step_s"]), flush=True)
    print(format_table(results))
    print("\nremaining differences:")
    for r in results:
        for d in r["differences"]:
            print(f"- {r['method']}: {d}")
    if args.profile:
        for m in methods:
            tables = profile(m, steps=args.profile, setting=args.setting, batch=args.batch,
                             precision=args.precision, device=args.device, n_local=args.n_local,
                             attention=args.attention)
            for side, table in tables.items():
                print(f"\n## {m} / {side}: {args.profile} profiled steps: time per phase, then top ops by self time\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
