"""CLIP loss: a hand-computed example, and 2 processes = 1 process on the same global batch."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vfm.losses.clip_loss import CLIPLoss


def test_clip_loss_hand_computed():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = torch.tensor(math.log(2.0))  # temperature factor 2
    # logits = 2 * img @ txt^T = [[2, 1.2], [0, 1.6]]
    l_img = -(math.log(math.exp(2) / (math.exp(2) + math.exp(1.2))) + math.log(math.exp(1.6) / (1 + math.exp(1.6)))) / 2
    # text -> image: columns: [[2, 0], [1.2, 1.6]]
    l_txt = -(math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(math.exp(1.6) / (math.exp(1.2) + math.exp(1.6)))) / 2
    assert CLIPLoss()(img, txt, scale).item() == pytest.approx((l_img + l_txt) / 2, rel=1e-6)


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 4, generator=g)  # a shared "tower" so gradients reach a parameter
    x, t = torch.randn(8, 6, generator=g), torch.randn(8, 4, generator=g)
    return w, x, t


def _loss(w: torch.Tensor, x: torch.Tensor, t: torch.Tensor, local: bool) -> torch.Tensor:
    return CLIPLoss(local_loss=local)(F.normalize(x @ w, dim=-1), F.normalize(t, dim=-1), torch.tensor(math.log(10.0)))


def _worker(rank: int, world: int, init_file: str, out_dir: str, local: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        w, x, t = _data()
        w = w.clone().requires_grad_(True)
        half = slice(rank * 4, (rank + 1) * 4)
        loss = _loss(w, x[half], t[half], local)
        loss.backward()
        grad = w.grad.clone()
        dist.all_reduce(grad)
        grad /= world  # what DDP does to parameter gradients
        loss_mean = loss.detach().clone()
        dist.all_reduce(loss_mean)
        torch.save({"loss": loss_mean / world, "grad": grad}, os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("local", [False, True])
def test_two_processes_equal_one_process_on_the_global_batch(tmp_path, local):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), local), nprocs=2, join=True)
    w, x, t = _data()
    w = w.clone().requires_grad_(True)
    ref = _loss(w, x, t, False)  # one process, all 8 pairs
    ref.backward()
    for r in range(2):
        out = torch.load(tmp_path / f"r{r}.pt")
        assert torch.allclose(out["grad"], w.grad, atol=1e-6), (local, r)
        assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-5)
