import pytest
import torch

from vfm.losses.mae_loss import MAELoss


def test_mae_loss_counts_masked_patches_only():
    pred, target = torch.zeros(1, 3, 2), torch.tensor([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]])
    mask = torch.tensor([[True, False, True]])
    # masked patches 0 and 2: per-patch MSE 1 and 9 -> mean 5; patch 1 (visible) is ignored
    assert MAELoss(norm_pix_loss=False)(pred, target, mask).item() == pytest.approx(5.0)
    changed = pred.clone()
    changed[0, 1] = 100.0  # any prediction on a visible patch
    assert MAELoss(norm_pix_loss=False)(changed, target, mask).item() == pytest.approx(5.0)


def test_norm_pix_loss_normalises_each_target_patch():
    target = torch.tensor([[[1.0, 2.0, 3.0, 6.0]]])
    mean, var = 3.0, torch.tensor([1.0, 2.0, 3.0, 6.0]).var().item()  # unbiased, as in the official code
    normed = (target - mean) / (var + 1e-6) ** 0.5
    loss = MAELoss(norm_pix_loss=True)(normed, target, torch.tensor([[True]]))
    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    pred = torch.zeros(1, 1, 4)  # squared normalised values average to (n-1)/n = 0.75
    assert MAELoss(norm_pix_loss=True)(pred, target, torch.tensor([[True]])).item() == pytest.approx(0.75, rel=1e-5)
