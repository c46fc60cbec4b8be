import math

import pytest
import torch

from vfm.losses.mim_losses import masked_token_cross_entropy, negative_cosine


def test_beit_cross_entropy_on_masked_positions():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = math.log(3.0)  # softmax: 3/6 on code 2
    codes = torch.tensor([[2, 0, 1]])
    mask = torch.tensor([[True, False, True]])
    # position 0: -log(3/6); position 2 (uniform logits): -log(1/4); position 1 is not masked
    expected = (-math.log(0.5) - math.log(0.25)) / 2
    assert masked_token_cross_entropy(logits, codes, mask).item() == pytest.approx(expected)
    assert masked_token_cross_entropy(logits[mask], codes, mask).item() == pytest.approx(expected)


def test_eva_negative_cosine_masked_and_all():
    pred = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    target = torch.tensor([[[2.0, 0.0], [1.0, 0.0], [-1.0, -1.0]]])
    # cosines: 1, 0, -1
    mask = torch.tensor([[True, True, False]])
    assert negative_cosine(pred, target, mask).item() == pytest.approx(1 - 0.5)
    assert negative_cosine(pred, target).item() == pytest.approx(1 - 0.0)
