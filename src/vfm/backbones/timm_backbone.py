"""Encoders built with `timm.create_model`, behind one small contract every method uses.

A `Backbone` wraps any timm model created with `num_classes=0`:
- `forward(x) -> [B, D]` is the global feature, exactly what plain `timm.create_model(name,
  num_classes=0, ...)(x)` returns, so exported weights load back into timm and give the same output;
- `forward_tokens(x, mask=None)` returns the global feature and the patch tokens, optionally with
  masked patch embeddings replaced by a learnable mask token (BEiT / iBOT / EVA);
  timm's `VisionTransformer` family and its `Beit` family (relative position bias, shared or per
  block, no absolute position embedding, LayerScale: BEiT's pretraining architecture) both have it;
- `forward_visible(x, ids_keep)` encodes only the kept patches (MAE: the encoder never sees the
  masked ones, which is where its speed comes from);
- `embed_dim`, `patch_size`, `num_prefix_tokens` and `has_patch_tokens` describe it.
CNNs (ResNets) have no patch tokens and can serve methods that need only a global feature.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
import torch
import torch.utils.checkpoint
from torch import nn

from vfm.backbones.beit_init import beit_init_, trunc_normal_sigma_
from vfm.backbones.eva import eva_forward_tokens
from vfm.io import atomic_write

_META_KEY = "vfm_backbone"


def select_attention(module: nn.Module, attn_impl: str, device_type: str) -> None:
    """Set every timm attention layer in `module` to fused SDPA or plain ops: "fused", "manual",
    or "auto" (fused on accelerators; plain ops on the CPU, where PyTorch's fused CPU kernel is
    slower for the short sequences of small images, its backward most of all)."""
    fused = attn_impl == "fused" or (attn_impl == "auto" and device_type != "cpu")
    for m in module.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused


class Backbone(nn.Module):
    """A timm encoder with the project's backbone contract.

    Args:
        name: any timm model name (`vit_small_patch16_224`, `resnet50`, ...).
        img_size: input resolution (ViTs only; sets the position-embedding grid).
        patch_size: patch size (ViTs only).
        in_chans: input channels (1 for grayscale data).
        drop_path_rate: stochastic depth rate.
        mask_token: create a learnable mask token for `forward_tokens(x, mask)` (zeros; methods call
            `enable_mask_token` with their own initialisation).
        attn_impl: "fused" (scaled_dot_product_attention), "manual" (softmax(QK^T)V in plain ops) or
            "auto": fused on GPU, manual on CPU, where PyTorch's fused CPU kernels are slower for the
            short token sequences of small images (measured in `make bench`).
        pretrained: load timm's pretrained weights (needs network access on first use).
        grad_checkpointing: recompute each transformer block's activations in the backward pass
            instead of storing them (activation checkpointing): much less activation memory for
            large ViTs, for about one more forward pass of compute. Training only.
        model_kwargs: any further `timm.create_model` keyword (e.g. `depth`, `embed_dim`, `reg_tokens`;
            for `beit_*`: `use_abs_pos_emb`, `use_rel_pos_bias`, `use_shared_rel_pos_bias`, `init_values`).
        weight_init: "timm" (timm's own initialisation) or "beit" (BEiT's pretraining initialisation:
            std-0.02 normals truncated at +-1 std, then `fix_init_weight`; `vfm.backbones.beit_init`).
    """

    def __init__(
        self,
        name: str,
        *,
        img_size: int | None = None,
        patch_size: int | None = None,
        in_chans: int = 3,
        drop_path_rate: float = 0.0,
        mask_token: bool = False,
        attn_impl: str = "auto",
        pretrained: bool = False,
        grad_checkpointing: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        weight_init: str = "timm",
    ) -> None:
        super().__init__()
        kwargs: dict[str, Any] = dict(model_kwargs or {})
        self.family = _family(name)
        self.is_vit = self.family is not None
        if self.is_vit:
            if img_size is not None:
                kwargs["img_size"] = img_size
            if patch_size is not None:
                kwargs["patch_size"] = patch_size
        if self.family == "vit":
            # Multi-crop feeds several resolutions through one network: interpolate the position
            # embedding on the fly instead of fixing the grid to `img_size` (timm's Beit has no such
            # option: its relative position tables are built for one grid).
            kwargs.setdefault("dynamic_img_size", True)
        kwargs.update(in_chans=in_chans, drop_path_rate=drop_path_rate)
        if attn_impl not in ("auto", "fused", "manual"):
            raise ValueError(f"backbone.attn_impl must be 'auto', 'fused' or 'manual', got {attn_impl!r}")
        self.attn_impl = attn_impl
        self._attn_device: str | None = None
        self.name = name
        self.create_kwargs = kwargs  # what timm.create_model needs to rebuild the exported weights
        self.model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
        if weight_init not in ("timm", "beit"):
            raise ValueError(f"backbone.weight_init must be 'timm' or 'beit', got {weight_init!r}")
        if weight_init == "beit" and not pretrained:
            if not self.is_vit:
                raise ValueError(f"backbone.weight_init=beit needs a ViT or BEiT, got {name!r}; use weight_init=timm")
            beit_init_(self.model)
        self.embed_dim: int = int(self.model.num_features)
        if self.is_vit:
            p = self.model.patch_embed.patch_size
            self.patch_size: int | None = int(p[0] if isinstance(p, (tuple, list)) else p)
            self.num_prefix_tokens: int = int(self.model.num_prefix_tokens)
        else:
            self.patch_size, self.num_prefix_tokens = None, 0
        self.has_patch_tokens = self.is_vit
        self.grad_checkpointing = grad_checkpointing
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)  # timm's own forward (CNNs, `forward`)
        self.mask_token: nn.Parameter | None = None
        if mask_token and self.is_vit:
            self.enable_mask_token()

    def enable_mask_token(self, std: float = 0.0) -> None:
        """Create the learnable mask token [1, 1, D] (for methods that mask patches) if there is none.

        `std` 0 gives zeros, as iBOT (`masked_embed`) and DINOv2 (`mask_token`) start it; `std` > 0
        a normal truncated at +-std, as BEiT and EVA-01 start theirs (`trunc_normal_(std=.02)`)."""
        if not self.is_vit:
            raise ValueError(f"backbone {self.name!r} has no patch tokens to mask; use a ViT (e.g. backbone=vit_small)")
        if self.mask_token is None:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
            if std > 0:
                trunc_normal_sigma_(self.mask_token.data, std)

    def use_fixed_sincos_pos_embed(self) -> None:
        """Replace the learnt position embedding with MAE's fixed 2-D sin-cos one (zeros for prefix
        tokens), excluded from training. Exported weights keep it as an ordinary tensor."""
        m = self.model
        if not self.is_vit or getattr(m, "pos_embed", None) is None:
            raise ValueError(f"backbone {self.name!r} has no position embedding to replace")
        gh, gw = m.patch_embed.grid_size
        table = sincos_pos_embed_2d(self.embed_dim, gh, gw)
        prefix = m.pos_embed.shape[1] - gh * gw  # timm stores [CLS] positions unless no_embed_class
        with torch.no_grad():
            m.pos_embed.zero_()
            m.pos_embed[0, prefix:] = table.to(m.pos_embed.dtype)
        m.pos_embed.requires_grad_(False)

    def _select_attention(self, device: torch.device) -> None:
        if self._attn_device == device.type:
            return
        select_attention(self.model, self.attn_impl, device.type)
        self._attn_device = device.type

    def _blocks(self, t: torch.Tensor) -> torch.Tensor:
        """The transformer blocks, each checkpointed when `grad_checkpointing` and gradients are on
        (non-reentrant: drop path draws the same random numbers when the block is recomputed).
        BEiT's blocks also take the relative position bias shared by all of them (if any)."""
        kwargs: dict[str, Any] = {}
        if self.family == "beit":
            shared = self.model.rel_pos_bias
            kwargs["shared_rel_pos_bias"] = shared() if shared is not None else None
        checkpointed = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.model.blocks:
            if checkpointed:
                t = torch.utils.checkpoint.checkpoint(block, t, use_reentrant=False, **kwargs)
            else:
                t = block(t, **kwargs)
        return t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Global feature [B, D] (the [CLS] token after the final norm for ViTs, pooled for CNNs)."""
        self._select_attention(x.device)
        return self.model(x)

    def masked_patch_embed(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The patch embeddings of `x` (`[B, N, D]`, or `[B, H, W, D]` with dynamic_img_size), those
        where `mask` ([B, N] bool) is True replaced by the mask token (BEiT / iBOT / EVA)."""
        t = self.model.patch_embed(x)
        if mask is None:
            return t
        if self.mask_token is None:
            raise ValueError("forward_tokens(mask=...) needs a backbone built with mask_token=True")
        flat = t.reshape(t.shape[0], -1, t.shape[-1])
        flat = torch.where(mask.reshape(t.shape[0], -1, 1), self.mask_token.to(flat.dtype), flat)
        return flat.reshape(t.shape)

    def forward_tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Run a ViT and return {"global": [B, D], "patch": [B, N, D], "prefix": [B, P, D]}.

        `mask` [B, N] (bool, N = patches) replaces the masked patch embeddings with the mask token
        before position embeddings are added, as in BEiT and iBOT.
        """
        if not self.is_vit:
            raise ValueError(f"backbone {self.name!r} has no patch tokens; use a ViT (e.g. backbone=vit_small)")
        if self.family == "eva":
            return eva_forward_tokens(self, x, mask)
        self._select_attention(x.device)
        m = self.model
        t = self.masked_patch_embed(x, mask)
        if self.family == "beit":  # timm Beit.forward_features after its patch embedding
            t = torch.cat([m.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
            t = m.pos_drop(t if m.pos_embed is None else t + m.pos_embed)
        else:
            t = m.norm_pre(m.patch_drop(m._pos_embed(t)))
        t = m.norm(self._blocks(t))
        return {
            "global": m.forward_head(t, pre_logits=True),
            "patch": t[:, self.num_prefix_tokens :],
            "prefix": t[:, : self.num_prefix_tokens],
        }

    def forward_visible(self, x: torch.Tensor, ids_keep: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encode only the patches `ids_keep` [B, K] (row-major patch indices) of each image (MAE).

        Position embeddings are added to all patches first, then the kept ones are gathered, so
        every token carries its true position; the prefix tokens ([CLS], registers) always stay.
        Returns {"tokens": [B, P + K, D] (prefix first, after the final norm), "global": [B, D]}.
        """
        if self.family != "vit":
            raise ValueError(f"backbone {self.name!r} cannot encode a subset of patches; use a timm ViT (e.g. backbone=vit_small)")
        self._select_attention(x.device)
        m, p = self.model, self.num_prefix_tokens
        t = m._pos_embed(m.patch_embed(x))  # [B, P + N, D]
        idx = ids_keep.unsqueeze(-1).expand(-1, -1, t.shape[-1])
        t = torch.cat([t[:, :p], torch.gather(t[:, p:], 1, idx)], dim=1)
        t = m.norm(self._blocks(m.norm_pre(t)))
        return {"tokens": t, "global": m.forward_head(t, pre_logits=True)}

    def export(self, path: str | Path) -> Path:
        """Write the encoder weights as safetensors, loadable by `load_exported` or plain timm."""
        from safetensors.torch import save

        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        meta = {_META_KEY: json.dumps({"name": self.name, "kwargs": _jsonable(self.create_kwargs)})}
        return atomic_write(path, lambda f: f.write(save(state, metadata=meta)))


    @classmethod
    def from_create_kwargs(cls, name: str, create_kwargs: dict[str, Any]) -> Backbone:
        """A `Backbone` for timm `name` built from `timm.create_model` keywords (`create_kwargs` as
        stored by `export`: in_chans, img_size, patch_size, ...), without stochastic depth."""
        kwargs = dict(create_kwargs)
        return cls(name, in_chans=int(kwargs.pop("in_chans", 3)), model_kwargs=kwargs)

    @classmethod
    def from_exported(cls, path: str | Path) -> Backbone:
        """Rebuild a `Backbone` (with the token API) from a file written by `export`."""
        from safetensors.torch import load_file

        meta = exported_metadata(path)
        if meta is None:
            raise ValueError(f"{path} was not written by Backbone.export (no {_META_KEY} metadata)")
        backbone = cls.from_create_kwargs(meta["name"], meta["kwargs"])
        backbone.model.load_state_dict(load_file(str(path)), strict=True)
        return backbone


def exported_metadata(path: str | Path) -> dict[str, Any] | None:
    """{"name", "kwargs"} stored by `Backbone.export`, or None for other safetensors files."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(_META_KEY)
    return None if raw is None else json.loads(raw)


def load_exported(path: str | Path) -> nn.Module:
    """Rebuild the plain timm model stored by `Backbone.export` (no vfm classes involved)."""
    from safetensors.torch import load_file

    meta = exported_metadata(path)
    if meta is None:
        raise ValueError(f"{path} was not written by Backbone.export (no {_META_KEY} metadata)")
    model = timm.create_model(meta["name"], num_classes=0, **meta["kwargs"])
    model.load_state_dict(load_file(str(path)), strict=True)
    return model


def sincos_pos_embed_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[len(positions), dim]: sin(p * w_k) then cos(p * w_k), w_k = 10000^(-k / (dim / 2)) (Vaswani et al.)."""
    if dim % 2:
        raise ValueError(f"sin-cos position embedding needs an even dimension, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = positions.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table [grid_h * grid_w, dim] in row-major patch order (He et al. 2022,
    facebookresearch/mae `util/pos_embed.py`): the first half of the channels encodes the column
    (x) coordinate and the second half the row (y), each with `sincos_pos_embed_1d`."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs a dimension divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    emb = torch.cat([sincos_pos_embed_1d(dim // 2, cols.flatten()), sincos_pos_embed_1d(dim // 2, rows.flatten())], dim=1)
    return emb.float()


def _family(name: str) -> str | None:
    """"vit" for timm's `VisionTransformer` family, "beit" for its `Beit` family (the models with the
    token API used here), None for any other model (global feature only)."""
    if not timm.models.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; see timm.list_models() for the available names")
    module = timm.models.model_entrypoint(name).__module__
    if module in ("timm.models.vision_transformer", "timm.models.deit"):
        return "vit"
    if module == "timm.models.eva":  # EVA-01/EVA-02: rotary embeddings, see vfm.backbones.eva
        return "eva"
    return "beit" if module == "timm.models.beit" else None


def _is_vit(name: str) -> bool:
    """True for the timm models with patch tokens and the token API (`_family` is not None)."""
    return _family(name) is not None


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
