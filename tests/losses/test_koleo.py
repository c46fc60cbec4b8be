import math

import pytest
import torch

from vfm.losses.koleo import KoLeoLoss


def _on_circle(degrees: list[float], radii: list[float] | None = None) -> torch.Tensor:
    radii = radii or [1.0] * len(degrees)
    return torch.tensor(
        [[r * math.cos(math.radians(a)), r * math.sin(math.radians(a))] for a, r in zip(degrees, radii)]
    )


def test_three_points_by_hand():
    # Unit vectors at 0, 60 and 180 degrees: chords |p0 p1| = 1, |p1 p2| = sqrt(3), |p0 p2| = 2.
    # Nearest neighbours: p0 -> p1 (1), p1 -> p0 (1), p2 -> p1 (sqrt(3)); loss = -(0 + 0 + ln sqrt(3)) / 3.
    x = _on_circle([0, 60, 180], radii=[3.0, 0.5, 7.0])  # norms are irrelevant: rows are L2-normalised
    expected = -math.log(math.sqrt(3)) / 3
    assert math.isclose(KoLeoLoss()(x).item(), expected, rel_tol=1e-5, abs_tol=1e-6)


def test_spreading_points_apart_lowers_the_loss():
    koleo = KoLeoLoss()
    clustered = koleo(_on_circle([0, 10, 20]))
    spread = koleo(_on_circle([0, 120, 240]))
    assert spread < clustered
    assert math.isclose(spread.item(), -math.log(math.sqrt(3)), rel_tol=1e-5)


def test_antipodal_pair_is_not_its_own_neighbour():
    # Distance 2 to the only other point; a -1 diagonal fill would tie with the dot product -1.
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert math.isclose(KoLeoLoss()(x).item(), -math.log(2.0), rel_tol=1e-6)


def test_fp32_output_and_finite_gradient_with_duplicates():
    x = torch.tensor([[1.0, 2.0, 0.0], [1.0, 2.0, 0.0], [0.0, 1.0, 5.0]], dtype=torch.bfloat16, requires_grad=True)
    loss = KoLeoLoss()(x)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(x.grad.float()).all()


def test_needs_two_samples():
    with pytest.raises(ValueError):
        KoLeoLoss()(torch.randn(1, 4))
