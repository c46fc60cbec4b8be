"""The DINO center is the mean over the *global* batch: identical on every process (2-process gloo)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vfm.losses.dino_loss import DINOLoss


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        loss_fn = DINOLoss(out_dim=3, center_momentum=0.5)
        local = torch.full((2, 3), float(rank + 1))  # rank 0 sends ones, rank 1 twos
        loss_fn.update_center(local)
        torch.save(loss_fn.center, os.path.join(out_dir, f"center{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_center_is_synchronised_across_processes(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    c0, c1 = torch.load(tmp_path / "center0.pt"), torch.load(tmp_path / "center1.pt")
    # global batch mean = 1.5; center = 0.5 * 0 + 0.5 * 1.5
    assert torch.equal(c0, c1)
    assert torch.allclose(c0, torch.full((1, 3), 0.75))
