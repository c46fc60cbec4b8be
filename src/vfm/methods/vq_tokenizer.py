"""Training a visual tokenizer for BEiT: pixels (VQ-VAE) or a teacher's features (VQ-KD).

* `target="features"` is VQ-KD, BEiT v2's tokenizer (Peng et al., "BEiT v2: Masked Image Modeling
  with Vector-quantized Visual Tokenizers", 2022; microsoft/unilm `beit2/modeling_vqkd.py`): the
  quantized codes are decoded by a small Transformer to reconstruct a frozen teacher's patch
  features, with loss 1 - cos(decoded, teacher) per patch, plus the codebook's commitment loss.
* `target="pixels"` trains the same tokenizer as a VQ-VAE (van den Oord et al. 2017), the pixel
  route of BEiT v1 (Bao et al. 2022), whose DALL-E dVAE (Ramesh et al. 2021) cannot be obtained
  offline: the decoder reconstructs each patch's pixels, normalised per patch as in MAE's
  norm_pix_loss (mean squared error).

Architecture (BEiT v2): ViT encoder -> Linear-Tanh-Linear down to a low-dimensional code space ->
l2-normalised EMA codebook (k-means initialised, dead codes restarted; `VectorQuantizer`) -> a
Transformer decoder over the code grid (MAE's decoder with no masked positions) -> Linear to the
target. Codebook usage (fraction of codes in use, perplexity, restarts) is logged every step, and
measured on the validation split at the end (`codebook_report`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vfm.backbones.loading import load_pretrained_encoder
from vfm.data.batch import Batch
from vfm.data.patches import patchify
from vfm.heads.mae_decoder import MAEDecoder
from vfm.heads.tokenizer import Tokenizer
from vfm.losses.mae_loss import MAELoss
from vfm.methods.base import Method


class VQTokenizer(Method):
    """Args:
        backbone: the tokenizer's ViT encoder.
        target: "pixels" (VQ-VAE) or "features" (VQ-KD, needs `teacher`).
        teacher: for VQ-KD, the encoder to distil: a pretrain run directory, its encoder.safetensors
            or last.pt, or a timm weight file with `teacher_model`.
        teacher_model: timm model name of a foreign teacher weight file.
        num_codes, code_dim: codebook (8192 x 32 in BEiT v2).
        decay, beta, kmeans_init, restart_dead_codes, dead_code_threshold: `VectorQuantizer`.
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
        num_codes: int = 8192,
        code_dim: int = 32,
        decay: float = 0.99,
        beta: float = 1.0,
        kmeans_init: bool = True,
        restart_dead_codes: bool = True,
        dead_code_threshold: float = 1.0e-3,
        decoder_dim: int = 768,
        decoder_depth: int = 3,
        decoder_heads: int = 12,
    ) -> None:
        super().__init__()
        if target not in ("pixels", "features"):
            raise ValueError(f"method.target must be 'pixels' or 'features', got {target!r}")
        self.target = target
        self.tokenizer = Tokenizer(backbone, num_codes=num_codes, code_dim=code_dim, decay=decay, beta=beta,
                                   kmeans_init=kmeans_init, restart_dead_codes=restart_dead_codes,
                                   dead_code_threshold=dead_code_threshold)
        self.patch_size = int(backbone.patch_size)
        self.in_chans = int(backbone.model.patch_embed.proj.in_channels)
        self.teacher: nn.Module | None = None
        if target == "features":
            if not teacher:
                raise ValueError("method.target=features (VQ-KD) needs method.teacher: a pretrain run directory or encoder file")
            self.teacher = load_pretrained_encoder(teacher, model_name=teacher_model)
            if self.teacher.patch_size != self.patch_size:
                raise ValueError(f"teacher {teacher} has {self.teacher.patch_size} px patches but the tokenizer has "
                                 f"{self.patch_size}: the code grid must match the teacher's patch grid; set "
                                 f"backbone.patch_size={self.teacher.patch_size}")
            for p in self.teacher.parameters():
                p.requires_grad_(False)
            out_dim = int(self.teacher.embed_dim)
        else:
            out_dim = self.patch_size**2 * self.in_chans
        self.decoder = MAEDecoder(code_dim, out_dim, decoder_dim=decoder_dim, depth=decoder_depth,
                                  num_heads=decoder_heads, num_prefix_tokens=0,
                                  attn_impl=getattr(backbone, "attn_impl", "auto"))
        self.pixel_loss = MAELoss(norm_pix_loss=True)

    @property
    def encoder(self) -> nn.Module:
        return self.tokenizer.backbone

    def decode(self, z_q: Tensor, grid: tuple[int, int]) -> Tensor:
        b, n, _ = z_q.shape
        ids = torch.arange(n, device=z_q.device).expand(b, n)
        return self.decoder(z_q, ids, grid)

    def training_step(self, batch: Batch, step: int, sched: Mapping[str, float]) -> dict[str, Tensor]:
        images = batch["crops"][0]
        z_q, codes, loss_vq, stats = self.tokenizer.quantize(images)
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        rec = self.decode(z_q, grid).float()
        if self.teacher is not None:
            with torch.no_grad():
                target = self.teacher.forward_tokens(images)["patch"].float()
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
