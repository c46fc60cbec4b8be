"""MAE: masked autoencoders.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022; official code
facebookresearch/mae (`models_mae.py`, `main_pretrain.py`).

A high proportion of patches (75%) is masked per image, uniformly at random (drawn in the data
pipeline by `vfm.data.masking.random_masks`); the encoder processes the **visible patches only**,
so its cost falls roughly in proportion to the mask ratio; a light decoder receives the encoded
visible tokens plus mask tokens and predicts the pixels of every patch; the loss is the mean squared
error on the masked patches only, against per-patch normalised pixels (`norm_pix_loss`). Position
embeddings of encoder and decoder are fixed 2-D sin-cos tables. The encoder is initialised as the
official `initialize_weights` (`mae_init_`) and trains without stochastic depth.

Stages, named as in the official code: `random_masking` -> `forward_encoder` -> `forward_decoder`
-> `forward_loss`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from vfm.data.batch import Batch
from vfm.data.patches import patchify, unpatchify
from vfm.data.transforms import normalize
from vfm.heads.mae_decoder import MAEDecoder, xavier_init_
from vfm.losses.mae_loss import MAELoss
from vfm.methods.base import Method
from vfm.methods.classifier import set_drop_path
from vfm.viz.reconstruction import denormalize, reconstruction_grid


class MAE(Method):
    """MAE method; the backbone (no teacher) is the encoder evaluators use.

    Args:
        backbone: a ViT `vfm.backbones.Backbone`.
        decoder_dim, decoder_depth, decoder_heads, mlp_ratio: the decoder (512 / 8 / 16 / 4 in the paper).
        norm_pix_loss: predict per-patch normalised pixels (the paper's default for its best results).
        fixed_pos_embed: replace the encoder's learnt position embedding with fixed 2-D sin-cos.
        drop_path_rate: the encoder's stochastic depth, replacing `backbone.drop_path_rate` (MAE
            pretrains without: 0; None keeps the backbone's).
        init: "mae" re-initialises the encoder as the official `initialize_weights` (`mae_init_`);
            "timm" keeps timm's initialisation.
    """

    needs_patch_tokens = True

    def __init__(
        self,
        backbone: nn.Module,
        *,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
        fixed_pos_embed: bool = True,
        drop_path_rate: float | None = 0.0,
        init: str = "mae",
    ) -> None:
        super().__init__()
        if init not in ("mae", "timm"):
            raise ValueError(f"method.init must be 'mae' or 'timm', got {init!r}")
        if drop_path_rate is not None:
            set_drop_path(backbone, drop_path_rate)
        if init == "mae":
            mae_init_(backbone.model)
        if fixed_pos_embed:
            backbone.use_fixed_sincos_pos_embed()
        self.backbone = backbone
        self.patch_size = int(backbone.patch_size)
        self.in_chans = int(backbone.model.patch_embed.proj.in_channels)
        self.decoder = MAEDecoder(
            backbone.embed_dim, self.patch_size**2 * self.in_chans, decoder_dim=decoder_dim, depth=decoder_depth,
            num_heads=decoder_heads, mlp_ratio=mlp_ratio, num_prefix_tokens=backbone.num_prefix_tokens,
            attn_impl=getattr(backbone, "attn_impl", "auto"),
        )
        self.loss_fn = MAELoss(norm_pix_loss)

    @property
    def encoder(self) -> nn.Module:
        return self.backbone

    @staticmethod
    def random_masking(mask: Tensor) -> tuple[Tensor, Tensor]:
        """Index bookkeeping of the per-sample mask [B, N] (True = masked, equal count per image):
        ids_keep [B, K] (the visible patches, in patch order) and ids_restore [B, N] (undoes the
        visible-then-masked shuffle)."""
        lo, hi = torch.stack((~mask).sum(dim=1).aminmax()).tolist()  # one host sync per step
        if lo != hi:
            raise ValueError("MAE needs the same number of visible patches in every image (use random_masks)")
        ids_shuffle = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # visible first
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        return ids_shuffle[:, :hi], ids_restore

    def forward_encoder(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        ids_keep, ids_restore = self.random_masking(mask)
        return self.backbone.forward_visible(images, ids_keep)["tokens"], ids_restore

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor, grid: tuple[int, int]) -> Tensor:
        return self.decoder(latent, ids_restore, grid)

    def forward_loss(self, images: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        return self.loss_fn(pred, patchify(images, self.patch_size), mask)

    def predict(self, images: Tensor, mask: Tensor) -> Tensor:
        """Per-patch predictions [B, N, p*p*C] (in normalised-patch space when norm_pix_loss)."""
        latent, ids_restore = self.forward_encoder(images, mask)
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        return self.forward_decoder(latent, ids_restore, grid)

    def training_step(self, batch: Batch, step: int, sched: Mapping[str, float]) -> dict[str, Tensor]:
        if "masks" not in batch:
            raise ValueError("MAE needs per-image masks in the batch: configure method.masking (random_masks)")
        images, mask = batch["crops"][0], batch["masks"][0]
        pred = self.predict(images, mask)
        loss = self.forward_loss(images, pred, mask)
        return {"loss": loss, "mask_ratio": mask.float().mean()}

    @torch.no_grad()
    def reconstruct(self, images: Tensor, mask: Tensor) -> Tensor:
        """Reconstructed images [B, C, H, W] in the input's (normalised) pixel space. With
        norm_pix_loss the model predicts normalised patches; each is mapped back with the true
        patch's mean and std (as in MAE's visualisations), so only the *structure* is predicted."""
        pred = self.predict(images, mask).float()
        target = patchify(images.float(), self.patch_size)
        if self.loss_fn.norm_pix_loss:
            pred = pred * (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        return unpatchify(pred, self.patch_size, grid, self.in_chans)

    def visualizations(
        self, images: Tensor, *, mean: Sequence[float], std: Sequence[float],
        masking: Callable[..., Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """{"reconstruction": grid}: each image (uint8 [n, C, H, W]), its masked input, the
        reconstruction and the reconstruction with the visible patches pasted back (MAE Fig. 2),
        under the training masking with a fixed seed, so every epoch shows the same masks."""
        if masking is None:
            return {}
        x = normalize(images, mean, std).to(next(self.parameters()).device)
        grid = x.shape[-1] // self.patch_size
        mask = masking(batch_size=len(x), grid_size=grid, generator=torch.Generator().manual_seed(0)).to(x.device)
        was_training = self.training
        self.eval()
        try:
            rec = self.reconstruct(x, mask)
        finally:
            self.train(was_training)
        return {"reconstruction": reconstruction_grid(images, denormalize(rec, mean, std), mask, self.patch_size)}


@torch.no_grad()
def mae_init_(vit: nn.Module) -> None:
    """Initialise a timm ViT as MAE's `initialize_weights` (facebookresearch/mae `models_mae.py`):
    xavier-uniform weights and zero biases for every `nn.Linear` (the JAX ViT's choice), the patch
    embedding's kernel xavier-uniform as the [D, C*p*p] matrix it is (as an `nn.Linear`; its bias
    keeps PyTorch's default, as there), [CLS] (and register) tokens N(0, 0.02), LayerNorms 1 / 0.
    The position embedding is left to `Backbone.use_fixed_sincos_pos_embed`."""
    w = vit.patch_embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    for name in ("cls_token", "reg_token"):
        token = getattr(vit, name, None)
        if token is not None:
            nn.init.normal_(token, std=0.02)
    xavier_init_(vit)
