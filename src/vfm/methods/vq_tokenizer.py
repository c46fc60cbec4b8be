"""Training a visual tokenizer for BEiT: a teacher's features (VQ-KD) or pixels (VQ-VAE).

* `target="features"` is VQ-KD, BEiT v2's tokenizer (Peng et al., "BEiT v2: Masked Image Modeling
  with Vector-quantized Visual Tokenizers", 2022; microsoft/unilm `beit2/modeling_vqkd.py`): ViT
  encoder -> task layer (Linear-Tanh-Linear) to a 32-d code space -> l2-normalised codebook updated
  by NormEMA (`VectorQuantizer(update="norm_ema")`, k-means initialised) -> a ViT decoder over the
  code grid with learned positions and a Linear-Tanh-Linear task layer (`VQKDDecoder`) -> the frozen
  teacher's patch features (a CLIP tower's `ln_post(x) @ proj`, on CLIP-normalised images:
  `vfm.backbones.teacher.Teacher`), with loss 1 - cos(decoded, teacher) per patch plus the
  codebook's commitment loss ||z - sg(e)||^2.
* `target="pixels"` trains the same encoder and codebook as a VQ-VAE (van den Oord et al. 2017):
  this project's stand-in for the tokenizer of BEiT v1 (Bao et al. 2022), which was DALL-E's dVAE
  (Ramesh et al. 2021; a discrete VAE trained with a Gumbel-softmax relaxation, not a VQ-VAE, and
  whose training code is not public). Its configuration (`method=vq_tokenizer`) is this project's
  own: count-weighted EMA codebook, dead-code restarts, MAE's decoder (fixed sin-cos positions,
  a linear output) reconstructing each patch's pixels, normalised per patch as in MAE's
  norm_pix_loss (mean squared error).

Codebook usage (fraction of codes in use, perplexity, restarts) is logged every step, and measured
on the validation split at the end (`codebook_report`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vfm.backbones.teacher import Teacher
from vfm.data.batch import Batch
from vfm.data.patches import patchify
from vfm.heads.mae_decoder import MAEDecoder
from vfm.heads.tokenizer import Tokenizer
from vfm.heads.vqkd_decoder import VQKDDecoder, beit2_init_
from vfm.losses.mae_loss import MAELoss
from vfm.methods.base import Method


class VQTokenizer(Method):
    """Args:
        backbone: the tokenizer's ViT encoder.
        target: "pixels" (VQ-VAE) or "features" (VQ-KD, needs `teacher`).
        teacher: for VQ-KD, the encoder to distil: a pretrain run directory, its encoder.safetensors
            or last.pt, or a timm weight file with `teacher_model` (a CLIP file keeps its projection).
        teacher_model: timm model name of a foreign teacher weight file.
        teacher_normalize: "clip" (BEiT v2: the teacher sees CLIP's mean/std) or "dataset".
        data_mean, data_std: the dataset's normalisation (to undo it for "clip").
        num_codes, code_dim: codebook (8192 x 32 in BEiT v2).
        codebook_update: "norm_ema" (BEiT v2) or "ema" (count-weighted, VQ-VAE); see `VectorQuantizer`.
        decay, beta, kmeans_init, restart_dead_codes, dead_code_threshold: `VectorQuantizer`.
        decoder: "beit2" (`VQKDDecoder`) or "mae" (MAE's decoder with no masked positions).
        decoder_dim, decoder_depth, decoder_heads: the decoder (BEiT v2: 3 blocks at the encoder width).
    """

    needs_patch_tokens = True
    frozen_modules = ("teacher",)
    report_images = 5000  # codebook usage on the validation images

    def __init__(
        self,
        backbone: nn.Module,
        *,
        target: str = "features",
        teacher: str | None = None,
        teacher_model: str | None = None,
        teacher_normalize: str = "clip",
        data_mean: Sequence[float] | None = None,
        data_std: Sequence[float] | None = None,
        num_codes: int = 8192,
        code_dim: int = 32,
        codebook_update: str = "norm_ema",
        decay: float = 0.99,
        beta: float = 1.0,
        kmeans_init: bool = True,
        restart_dead_codes: bool = False,
        dead_code_threshold: float = 1.0e-3,
        decoder: str = "beit2",
        decoder_dim: int = 768,
        decoder_depth: int = 3,
        decoder_heads: int = 12,
    ) -> None:
        super().__init__()
        if target not in ("pixels", "features"):
            raise ValueError(f"method.target must be 'pixels' or 'features', got {target!r}")
        if decoder not in ("beit2", "mae"):
            raise ValueError(f"method.decoder must be 'beit2' or 'mae', got {decoder!r}")
        self.target = target
        # VQ-KD's create_optimizer skips no_weight_decay(): the encoder's and decoder's [CLS] and
        # positions; the pixel tokenizer (not a paper recipe) keeps the project's default
        self.token_weight_decay = target != "features"
        self.tokenizer = Tokenizer(backbone, num_codes=num_codes, code_dim=code_dim, update=codebook_update,
                                   decay=decay, beta=beta, kmeans_init=kmeans_init,
                                   restart_dead_codes=restart_dead_codes, dead_code_threshold=dead_code_threshold)
        self.patch_size = int(backbone.patch_size)
        self.in_chans = int(backbone.model.patch_embed.proj.in_channels)
        self.teacher: nn.Module | None = None
        if target == "features":
            if not teacher:
                raise ValueError("method.target=features (VQ-KD) needs method.teacher: a pretrain run directory or encoder file")
            self.teacher = Teacher(teacher, model_name=teacher_model, normalize=teacher_normalize,
                                   data_mean=data_mean, data_std=data_std)
            if self.teacher.patch_size != self.patch_size:
                raise ValueError(f"teacher {teacher} has {self.teacher.patch_size} px patches but the tokenizer has "
                                 f"{self.patch_size}: the code grid must match the teacher's patch grid; set "
                                 f"backbone.patch_size={self.teacher.patch_size}")
            out_dim = self.teacher.out_dim
        else:
            out_dim = self.patch_size**2 * self.in_chans
        attn_impl = getattr(backbone, "attn_impl", "auto")
        if decoder == "beit2":
            beit2_init_(self.tokenizer.encode_task_layer)  # VQKD: encode_task_layer.apply(_init_weights)
            grid = tuple(int(g) for g in backbone.model.patch_embed.grid_size)
            self.decoder = VQKDDecoder(code_dim, out_dim, dim=decoder_dim, depth=decoder_depth,
                                       num_heads=decoder_heads, grid=grid, attn_impl=attn_impl)
        else:
            self.decoder = MAEDecoder(code_dim, out_dim, decoder_dim=decoder_dim, depth=decoder_depth,
                                      num_heads=decoder_heads, num_prefix_tokens=0, attn_impl=attn_impl)
        self.pixel_loss = MAELoss(norm_pix_loss=True)

    @property
    def encoder(self) -> nn.Module:
        return self.tokenizer.backbone

    def decode(self, z_q: Tensor, grid: tuple[int, int]) -> Tensor:
        """Code vectors [B, N, d] -> predictions [B, N, out_dim]."""
        if isinstance(self.decoder, VQKDDecoder):
            return self.decoder(z_q, grid)
        b, n, _ = z_q.shape
        ids = torch.arange(n, device=z_q.device).expand(b, n)
        return self.decoder(z_q, ids, grid)

    def training_step(self, batch: Batch, step: int, sched: Mapping[str, float]) -> dict[str, Tensor]:
        images = batch["crops"][0]
        z_q, codes, loss_vq, stats = self.tokenizer.quantize(images)
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        rec = self.decode(z_q, grid).float()
        if self.teacher is not None:
            target = self.teacher(images).float()
            loss_rec = (1.0 - F.cosine_similarity(rec, target, dim=-1)).mean()
        else:
            loss_rec = self.pixel_loss(rec, patchify(images, self.patch_size), torch.ones_like(codes, dtype=torch.bool))
        return {"loss": loss_rec + loss_vq, "loss_rec": loss_rec.detach(), "loss_vq": loss_vq.detach(), **stats}

    @torch.no_grad()
    def codebook_report(self, images: Tensor, batch_size: int = 512) -> dict[str, float]:
        """Codebook usage on `images` (normalised [M, C, H, W]): fraction of codes used, perplexity."""
        counts = torch.zeros(self.tokenizer.num_codes, dtype=torch.float64)
        for chunk in images.split(batch_size):
            codes = self.tokenizer(chunk.to(next(self.parameters()).device))
            counts += torch.bincount(codes.flatten().cpu(), minlength=counts.numel()).double()
        p = counts / counts.sum()
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        return {"tokenizer/code_usage": float((counts > 0).double().mean()), "tokenizer/perplexity": float(entropy.exp())}

    def report(self, images: Tensor) -> dict[str, float]:
        """The codebook usage on the validation images (`codebook_report`)."""
        return self.codebook_report(images)

    def export_artifacts(self, run_dir: Path) -> list[Path]:
        """`tokenizer.pt`, the file BEiT's `method.tokenizer` reads."""
        return [self.tokenizer.save(Path(run_dir) / "tokenizer.pt")]
