"""Last-layer self-attention maps of a ViT, as shown by DINO.

DINO (Caron et al., *Emerging Properties in Self-Supervised Vision Transformers*, ICCV 2021, Fig. 1
and 3; facebookresearch/dino `visualize_attention.py`) visualises, for each head of the last block,
the attention of the [CLS] query over the patch tokens, optionally thresholded to the smallest set
of patches that holds a given fraction of the attention mass.

The probabilities are recomputed here from the last block's own `Attention` module (its `qkv`,
`q_norm`, `k_norm` and `scale`), exactly as timm's non-fused path computes them
(`timm/layers/attention.py`, `Attention.forward`), instead of monkey-patching timm: timm's fused
path (`F.scaled_dot_product_attention`) never materialises the probabilities, and patching the
class would change every model in the process. The input of that module is captured with a forward
pre-hook that lives only for the duration of one call, so any block layout that calls
`block.attn(tokens)` (pre-norm `Block`, `ResPostBlock`) is handled without re-implementing it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vfm.backbones import Backbone

__all__ = [
    "as_vision_transformer",
    "attention_threshold_mask",
    "cls_attention",
    "last_block_attention",
    "last_layer_attention",
    "patch_grid",
]


def as_vision_transformer(model: nn.Module) -> nn.Module:
    """The timm `VisionTransformer` inside `model` (a vfm `Backbone` or a plain timm model).

    Raises ValueError with a message suited to users when `model` has no patch tokens (a ResNet)
    or its last block has an attention module this file cannot recompute.
    """
    vit = model.model if isinstance(model, Backbone) else model
    needed = ("patch_embed", "blocks", "num_prefix_tokens")
    if not all(hasattr(vit, a) for a in needed) or len(getattr(vit, "blocks", ())) == 0:
        raise ValueError(
            f"attention maps and patch PCA need a ViT with patch tokens, but the encoder is a "
            f"{type(vit).__name__}; use a ViT checkpoint (e.g. backbone=vit_tiny / vit_small)"
        )
    attn = getattr(vit.blocks[-1], "attn", None)
    if attn is None or not all(hasattr(attn, a) for a in ("qkv", "num_heads", "scale")):
        raise ValueError(
            f"the last block of {type(vit).__name__} has no timm `Attention` (qkv/num_heads/scale) "
            f"module ({type(attn).__name__}); attention maps support timm's VisionTransformer and Beit families"
        )
    return vit


def patch_grid(model: nn.Module, x: Tensor) -> tuple[int, int]:
    """(H, W) of the patch grid that `model` produces for input `x` [B, C, H_img, W_img].

    Uses the patch embedding's own rule, so dynamic-size and padded (`dynamic_img_pad`) ViTs agree.
    """
    vit = as_vision_transformer(model)
    size = (int(x.shape[-2]), int(x.shape[-1]))
    embed = vit.patch_embed
    if hasattr(embed, "dynamic_feat_size"):
        h, w = embed.dynamic_feat_size(size)
    else:  # patch embeddings without the helper: a plain strided convolution
        p = embed.patch_size
        ph, pw = (p, p) if isinstance(p, int) else p
        h, w = size[0] // ph, size[1] // pw
    return int(h), int(w)


def last_block_attention(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Attention probabilities and values of the last block: (attn [B, heads, N, N], v [B, heads, N, Dh]).

    N counts every token in timm's order: [CLS], the register tokens (`reg_tokens`), then the patches
    row-major. Each row of `attn` is a softmax over all N keys, as the model computes it, so
    `(attn @ v)` is the block's attention output before the output projection. Dropout on the
    attention weights is not applied (put the model in `eval()` for the earlier blocks too).
    """
    vit = as_vision_transformer(model)
    attn_mod = vit.blocks[-1].attn
    captured: list[Tensor] = []
    shared_bias: list[Tensor | None] = []  # timm Beit: the relative position bias shared by all blocks

    def grab_input(_module: nn.Module, args: tuple[Tensor, ...], kwargs: dict) -> None:
        captured.append(args[0] if args else kwargs["x"])
        shared_bias.append(kwargs.get("shared_rel_pos_bias", args[1] if len(args) > 1 else None))

    handle = attn_mod.register_forward_pre_hook(grab_input, with_kwargs=True)
    try:
        # forward_features runs exactly what the encoder runs (pos-embed resampling, norm_pre,
        # grad checkpointing...); the last block's MLP is computed needlessly, a negligible cost.
        vit.forward_features(x)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected one call of the last attention module, saw {len(captured)}")
    tokens = captured[0]
    b, n, _ = tokens.shape
    heads = int(attn_mod.num_heads)
    head_dim = int(getattr(attn_mod, "head_dim", attn_mod.qkv.out_features // (3 * heads)))
    # The same reshape, norms, scaling and softmax as timm's Attention.forward (non-fused path);
    # Beit's attention adds its q/v biases (k: zero) and relative position biases.
    q_bias = getattr(attn_mod, "q_bias", None)
    bias = attn_mod.qkv.bias if q_bias is None else torch.cat([q_bias, torch.zeros_like(q_bias), attn_mod.v_bias])
    qkv = nn.functional.linear(tokens, attn_mod.qkv.weight, bias).reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = getattr(attn_mod, "q_norm", nn.Identity())(q), getattr(attn_mod, "k_norm", nn.Identity())(k)
    attn = (q * attn_mod.scale) @ k.transpose(-2, -1)
    if getattr(attn_mod, "relative_position_bias_table", None) is not None:
        attn = attn + attn_mod._get_rel_pos_bias()
    if shared_bias[0] is not None:
        attn = attn + shared_bias[0]
    return attn.softmax(dim=-1), v


def cls_attention(model: nn.Module, x: Tensor) -> Tensor:
    """The last block's [CLS] attention row over all keys, per head: [B, heads, N] (sums to 1)."""
    vit = as_vision_transformer(model)
    if getattr(vit, "cls_token", None) is None:
        raise ValueError(f"{type(vit).__name__} has no [CLS] token (class_token=False); there is no [CLS] query to show")
    attn, _ = last_block_attention(vit, x)
    return attn[:, :, 0]  # timm puts [CLS] first, then registers, then patches


def last_layer_attention(model: nn.Module, x: Tensor) -> Tensor:
    """DINO's attention maps: the last block's [CLS]-query probabilities over the patches, [B, heads, H, W].

    `model` is a timm VisionTransformer or a vfm `Backbone` wrapping one; `x` a normalised batch
    [B, C, H_img, W_img] (any size the model accepts). The softmax runs over all keys (the [CLS]
    token itself and any register tokens included) as in the model; only the patch keys are kept,
    so a map sums to less than 1 by the mass the [CLS] query gives the prefix tokens. The full rows
    are `cls_attention(model, x)`.
    """
    vit = as_vision_transformer(model)
    rows = cls_attention(vit, x)
    h, w = patch_grid(vit, x)
    patches = rows[:, :, int(vit.num_prefix_tokens) :]
    if patches.shape[-1] != h * w:
        raise RuntimeError(f"{patches.shape[-1]} patch keys do not form the {h}x{w} grid of a {tuple(x.shape)} input")
    return patches.reshape(rows.shape[0], rows.shape[1], h, w)


def attention_threshold_mask(maps: Tensor, threshold: float) -> Tensor:
    """Keep the smallest set of patches that holds `threshold` of each map's mass: bool, shape of `maps`.

    As DINO's `visualize_attention.py` (`--threshold`, 0.6 in the paper's Fig. 3): each map is first
    renormalised over the patches (the mass given to [CLS]/registers is dropped), the patches are
    taken in decreasing order of attention, and a patch is kept while the mass of the patches
    ranked above it is still below `threshold`. The kept set therefore holds at least `threshold`
    of the mass, and removing its weakest patch would leave less.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    flat = maps.flatten(-2).float()
    probs = flat / flat.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(flat.dtype).tiny)
    vals, order = probs.sort(dim=-1, descending=True)
    # mass of the patches ranked strictly above each one (an exclusive cumulative sum)
    mass_above = torch.cat([torch.zeros_like(vals[..., :1]), vals.cumsum(dim=-1)[..., :-1]], dim=-1)
    keep_sorted = mass_above < threshold
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep.reshape(maps.shape)
