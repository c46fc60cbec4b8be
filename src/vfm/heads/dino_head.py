"""DINO projection head (Caron et al. 2021, facebookresearch/dino `vision_transformer.DINOHead`).

MLP (in -> hidden -> ... -> bottleneck, GELU, optional BN) then L2 normalisation and a
weight-normalised linear layer to `out_dim` prototypes. With `norm_last_layer=True` the weight-norm
gain is fixed to 1 (the paper's choice for stability), i.e. each prototype row is unit-norm; we
write that directly as `F.linear(x, normalize(W))` instead of `weight_norm` with a frozen gain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DINOHead(nn.Module):
    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead needs nlayers >= 1, got {nlayers}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < nlayers - 1:
                if use_bn:
                    layers.append(nn.BatchNorm1d(dims[i + 1]))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.apply(self._init)
        # The official head creates the last layer after `apply(_init_weights)`, so it keeps
        # nn.Linear's default init, U(+-1/sqrt(fan_in)); the scale of V sets the effective step
        # size of the (scale-invariant) normalised prototypes under AdamW, so we match it.
        self.last_layer_v = nn.Parameter(nn.Linear(bottleneck_dim, out_dim, bias=False).weight.detach().clone())
        # weight-norm gain g (per prototype); frozen at 1 when norm_last_layer (as in the paper)
        self.last_layer_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.last_layer_v, self.last_layer_g) if p.requires_grad]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_dim] -> [B, out_dim] prototype scores."""
        z = self.mlp(x)
        # The prototype scores are divided by temperatures as low as 0.04 downstream: compute them
        # in fp32 even under bf16 autocast (bf16's 8-bit mantissa would add ~0.1 of logit noise).
        with torch.autocast(device_type=x.device.type, enabled=False):
            z = F.normalize(z.float(), dim=-1, eps=1e-6)
            w = self.last_layer_g * F.normalize(self.last_layer_v, dim=1)
            return F.linear(z, w)
