"""SigLIP loss: a hand-computed example, the formula with an explicit label matrix, and 2 (and 3)
processes exchanging text features = 1 process on the global batch, loss and gradients."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vfm.losses.siglip_loss import SigLIPLoss


def _log_sigmoid(v: float) -> float:
    return -math.log1p(math.exp(-v))


def test_siglip_loss_hand_computed():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    t_prime, b = torch.tensor(math.log(2.0)), torch.tensor(-1.0)  # t = 2
    # logits = 2 * img @ txt^T - 1 = [[1, 0.2], [-1, 0.6]]; z = +1 on the diagonal, -1 off it
    expected = -(_log_sigmoid(1.0) + _log_sigmoid(-0.2) + _log_sigmoid(1.0) + _log_sigmoid(0.6)) / 2
    assert SigLIPLoss()(img, txt, t_prime, b).item() == pytest.approx(expected, rel=1e-6)


def test_siglip_loss_equals_the_label_matrix_formula():
    g = torch.Generator().manual_seed(0)
    x, y = F.normalize(torch.randn(5, 3, generator=g), dim=-1), F.normalize(torch.randn(5, 3, generator=g), dim=-1)
    t_prime, b = torch.tensor(math.log(10.0)), torch.tensor(-10.0)
    z = 2 * torch.eye(5) - 1
    expected = -F.logsigmoid(z * (t_prime.exp() * x @ y.T + b)).sum() / 5
    assert SigLIPLoss()(x, y, t_prime, b).item() == pytest.approx(expected.item(), rel=1e-6)
    # at the paper's initialisation (t = 10, b = -10) the loss starts near its floor: ~log(1 + e^-10) per negative
    assert SigLIPLoss()(x, x, t_prime, b).item() < 1.0


def test_siglip_loss_rejects_an_unknown_exchange():
    with pytest.raises(ValueError, match="dist_impl"):
        SigLIPLoss(dist_impl="gather")


B = 3  # pairs per process


def _data(world: int):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 4, generator=g)  # a shared image "tower": gradients reach a parameter
    v = torch.randn(5, 4, generator=g)  # and a text one
    x, t = torch.randn(world * B, 6, generator=g), torch.randn(world * B, 5, generator=g)
    return w, v, x, t


def _loss(w, v, x, t, scale, bias, impl="bidir"):
    return SigLIPLoss(impl)(F.normalize(x @ w, dim=-1), F.normalize(t @ v, dim=-1), scale, bias)


def _leaves():
    return [torch.tensor(math.log(10.0), requires_grad=True), torch.tensor(-1.0, requires_grad=True)]  # b: positives and negatives both count


def _worker(rank: int, world: int, init_file: str, out_dir: str, impl: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        w, v, x, t = _data(world)
        w, v = w.requires_grad_(True), v.requires_grad_(True)
        scale, bias = _leaves()
        mine = slice(rank * B, (rank + 1) * B)
        loss = _loss(w, v, x[mine], t[mine], scale, bias, impl)
        loss.backward()
        out = {"loss": loss.detach()}
        for name, p in (("w", w), ("v", v), ("scale", scale), ("bias", bias)):
            g = p.grad.clone()
            dist.all_reduce(g)
            out[name] = g / world  # what DDP does to parameter gradients
        dist.all_reduce(out["loss"])
        out["loss"] /= world
        torch.save(out, os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,impl", [(2, "bidir"), pytest.param(3, "bidir", marks=pytest.mark.slow),
                                        pytest.param(3, "shift", marks=pytest.mark.slow)])
def test_processes_exchanging_texts_equal_one_process_on_the_global_batch(tmp_path, world, impl):
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path), impl), nprocs=world, join=True)
    w, v, x, t = _data(world)
    w, v = w.requires_grad_(True), v.requires_grad_(True)
    scale, bias = _leaves()
    ref = _loss(w, v, x, t, scale, bias)  # one process, all world * B pairs
    ref.backward()
    for r in range(world):
        out = torch.load(tmp_path / f"r{r}.pt")
        assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-5)
        for name, p in (("w", w), ("v", v), ("scale", scale), ("bias", bias)):
            assert torch.allclose(out[name], p.grad, rtol=1e-4, atol=1e-6), (world, impl, r, name)
