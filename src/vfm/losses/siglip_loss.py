"""SigLIP's pairwise sigmoid loss, with the text features passed from neighbour to neighbour.

Zhai et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023; big_vision
(`trainers/proj/image_text/siglip.py`, `models/proj/image_text/two_towers.py`) and open_clip
(mlfoundations/open_clip `loss.py`, `SigLipLoss` and its `NeighbourExchange` functions).

With l2-normalised image features x [B, D] and text features y [B, D], the learnt temperature
t = exp(t') and bias b, and z_ij = +1 for the matching pair (i = j) and -1 otherwise:

    L = -1 / B * sum_i sum_j log sigmoid( z_ij * (t * x_i . y_j + b) )

Every pair is an independent binary classification: nothing normalises over the batch, so under DDP
no process needs the global similarity matrix. Each process computes its local block (positives on
the diagonal) and then receives the other processes' text features, one chunk per hop from its
ring neighbours, adding negative-only terms for each: W - 1 chunks of [B, D] pass through a process,
never [W * B, D] at once (open_clip's default "bidir" exchange sends to both neighbours per hop,
ceil((W - 1) / 2) hops; "shift" passes one way, W - 1 hops). The received features keep their
autograd history: in backward their gradient travels the reverse route to the process that owns
them. The per-process loss is its rows' sum over the B local images, so the mean over processes
(what DDP's gradient averaging optimises) is L on the global batch of W * B pairs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from vfm import distributed as vdist

__all__ = ["SigLIPLoss", "exchange_with_grad", "sigmoid_pair_loss"]


def sigmoid_pair_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor, logit_bias: Tensor,
                      *, negative_only: bool = False) -> Tensor:
    """sum_ij -log sigmoid(z_ij * (t * x_i . y_j + b)) / B for x [B, D], y [B', D] (B' = B unless
    `negative_only`, where every pair is a negative: another process's texts). fp32 logits."""
    logits = logit_scale.exp() * image_features.float() @ text_features.float().T + logit_bias
    # -log sigmoid(-s) = softplus(s): every pair as a negative, then the diagonal corrected to a
    # positive by softplus(-s) - softplus(s) = -s (big_vision's m1_diag1 labels, without the matrix)
    loss = F.softplus(logits).sum()
    if not negative_only:
        loss = loss - logits.diagonal().sum()
    return loss / image_features.shape[0]


def _exchange(sends: list[tuple[Tensor, int]], recv_from: list[int]) -> list[Tensor]:
    """Send each (tensor, rank) and receive one tensor shaped like the first from each rank, at once."""
    received = [torch.empty_like(sends[0][0]) for _ in recv_from]
    ops = [dist.P2POp(dist.isend, t.contiguous(), peer) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, buf, peer) for buf, peer in zip(received, recv_from)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return received


class _Exchange(torch.autograd.Function):
    """Forward: send `tensors[k]` to `to[k]` and receive from `from_[k]`. Backward: the gradients
    take the reverse route (sent back to `from_[k]`, received from `to[k]`)."""

    @staticmethod
    def forward(ctx, to: tuple[int, ...], from_: tuple[int, ...], *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.to, ctx.from_ = to, from_
        return tuple(_exchange(list(zip(tensors, to)), list(from_)))

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        back = _Exchange.apply(ctx.from_, ctx.to, *grads)
        return (None, None, *back)


def exchange_with_grad(tensors: list[Tensor], to: list[int], from_: list[int]) -> list[Tensor]:
    """Send `tensors[k]` to rank `to[k]` while receiving a tensor of the same shape from rank
    `from_[k]`, with autograd: the gradient of a received tensor flows back to the rank that sent it."""
    return list(_Exchange.apply(tuple(to), tuple(from_), *tensors))


class SigLIPLoss(nn.Module):
    """image_features, text_features: [B, D] (l2-normalised, this process's pairs); logit_scale: t'
    (t = exp(t')), logit_bias: b, scalars. Returns this process's loss (see the module docstring).

    Args:
        dist_impl: "bidir" (open_clip's default: both ring neighbours per hop) or "shift" (one way).
    """

    def __init__(self, dist_impl: str = "bidir") -> None:
        super().__init__()
        if dist_impl not in ("bidir", "shift"):
            raise ValueError(f"method.dist_impl must be 'bidir' or 'shift', got {dist_impl!r}")
        self.dist_impl = dist_impl

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, logit_bias: Tensor) -> Tensor:
        loss = sigmoid_pair_loss(image_features, text_features, logit_scale, logit_bias)
        world, rank = vdist.get_world_size(), vdist.get_rank()
        if world == 1:
            return loss
        left, right = (rank - 1) % world, (rank + 1) % world

        def negatives(texts: Tensor) -> Tensor:
            return sigmoid_pair_loss(image_features, texts, logit_scale, logit_bias, negative_only=True)

        hops_both, one_more = divmod(world - 1, 2) if self.dist_impl == "bidir" else (0, world - 1)
        to_left = to_right = text_features
        for _ in range(hops_both):  # texts from 2 * hop processes away on both sides after `hop` hops
            from_right, from_left = exchange_with_grad([to_left, to_right], [left, right], [right, left])
            loss = loss + negatives(from_right) + negatives(from_left)
            to_left, to_right = from_right, from_left
        for _ in range(one_more):  # the rest passes rightwards, one process per hop
            (to_right,) = exchange_with_grad([to_right], [right], [left])
            loss = loss + negatives(to_right)
        return loss
