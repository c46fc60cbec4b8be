import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vfm.losses.sinkhorn_knopp import sinkhorn_knopp


def _logits(b: int = 64, k: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # A few prototypes dominate: the softmax alone would use them unevenly.
    return torch.randn(b, k, generator=g) + torch.linspace(0, 1.5, k)


def _usage_error(probs: torch.Tensor) -> float:
    b, k = probs.shape
    return (probs.sum(dim=0) - b / k).abs().max().item()


def test_rows_sum_to_one_and_shape_dtype():
    probs = sinkhorn_knopp(_logits().to(torch.bfloat16), teacher_temp=0.1)
    assert probs.shape == (64, 16) and probs.dtype == torch.float32
    assert (probs >= 0).all()
    assert torch.allclose(probs.sum(dim=1), torch.ones(64), atol=1e-5)


def test_many_iterations_reach_uniform_prototype_usage():
    logits = _logits()
    probs = sinkhorn_knopp(logits, teacher_temp=0.3, n_iterations=50)
    assert torch.allclose(probs.sum(dim=1), torch.ones(64), atol=1e-5)
    assert _usage_error(probs) < 1e-3  # each prototype gets B / K = 4 samples' worth of mass


def test_default_iterations_move_toward_uniform_usage():
    logits = _logits()
    softmax_error = _usage_error(torch.softmax(logits / 0.3, dim=-1))
    errors = [_usage_error(sinkhorn_knopp(logits, 0.3, n_iterations=n)) for n in (1, 3)]
    assert errors[1] < errors[0] < softmax_error
    assert errors[1] < 0.25 * softmax_error


def test_one_iteration_matches_the_formula():
    # Q = exp(l / T)^T / sum; rows / row sums / K; columns / column sums / B; * B  ->  per-sample
    # normalisation of exp(l / T) / (column of prototype totals): q_bk = e_bk / r_k / sum_j (e_bj / r_j).
    logits = _logits(b=5, k=3)
    e = torch.exp(logits / 0.5)
    scaled = e / e.sum(dim=0, keepdim=True)
    expected = scaled / scaled.sum(dim=1, keepdim=True)
    assert torch.allclose(sinkhorn_knopp(logits, 0.5, n_iterations=1), expected, atol=1e-6)


def test_invariant_to_a_constant_shift_and_no_overflow():
    logits = _logits()
    base = sinkhorn_knopp(logits, teacher_temp=0.05)
    # logits / T around 1000: exp would overflow fp32 without the shift
    shifted = sinkhorn_knopp(logits + 50.0, teacher_temp=0.05)
    assert torch.isfinite(shifted).all()
    # fp32 resolves 1000 + x only to ~6e-5, hence the loose tolerance
    assert torch.allclose(shifted, base, rtol=1e-3, atol=1e-6)


def _worker(rank: int, world: int, init_file: str, out_dir: str, splits: list[list[int]]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        logits = _logits(b=8, k=6)
        results = []
        for sizes in splits:
            start = sum(sizes[:rank])
            local = logits[start : start + sizes[rank]]
            results.append(sinkhorn_knopp(local, teacher_temp=0.1, n_iterations=3))
        torch.save(results, os.path.join(out_dir, f"sk{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    splits = [[4, 4], [5, 3]]  # equal halves ([CLS] tokens) and unequal counts (masked patch tokens)
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), splits), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "sk0.pt"), torch.load(tmp_path / "sk1.pt")
    expected = sinkhorn_knopp(_logits(b=8, k=6), teacher_temp=0.1, n_iterations=3)
    for part0, part1 in zip(r0, r1):
        assert torch.allclose(torch.cat([part0, part1]), expected, atol=1e-6)
