"""EMA vector quantizer (BEiT v2 tokenizer codebook): lookup, straight-through, EMA, k-means, restarts, DDP."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vfm.heads.vector_quantizer import VectorQuantizer


def _vq(**kw) -> VectorQuantizer:
    base = dict(num_codes=16, code_dim=4, kmeans_init=False, restart_dead_codes=False)
    return VectorQuantizer(**{**base, **kw})


def _set_codebook(q: VectorQuantizer, cb: torch.Tensor) -> None:
    q.codebook.copy_(cb)
    q.embed_sum.copy_(cb)  # consistent with the pseudo-count of one in cluster_size
    q.cluster_size.fill_(1.0)
    q.initted.fill_(True)


def _buffers(q: VectorQuantizer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in q.state_dict().items()}


@pytest.mark.parametrize("l2_norm", [False, True])
def test_codes_are_nearest_codes(l2_norm):
    torch.manual_seed(0)
    q = _vq(l2_norm=l2_norm).eval()
    z = torch.randn(3, 5, 4)
    _, codes, _, _ = q(z)
    assert codes.shape == (3, 5) and codes.dtype == torch.long
    zz = F.normalize(z, dim=-1) if l2_norm else z
    expected = torch.cdist(zz.reshape(-1, 4), q.codebook).argmin(-1).view(3, 5)
    assert torch.equal(codes, expected)


def test_straight_through_gradient_and_commitment_loss():
    torch.manual_seed(0)
    q = _vq(l2_norm=False, beta=0.25).eval()
    z = torch.randn(2, 6, 4, requires_grad=True)
    z_q, codes, loss, _ = q(z)
    assert torch.allclose(z_q.detach(), q.codebook[codes])  # forward value: the codes (z + (e - z) rounds)
    (g,) = torch.autograd.grad(z_q.sum(), z)
    assert torch.equal(g, torch.ones_like(z))  # backward: identity
    hand = 0.25 * ((z.detach() - q.codebook[codes]) ** 2).mean()
    assert torch.allclose(loss, hand)
    # commitment only: the codebook is a buffer, the loss pulls z towards its code
    (gl,) = torch.autograd.grad(loss, z)
    assert torch.allclose(gl, 0.25 * 2 * (z.detach() - q.codebook[codes]) / z.numel())


def test_eval_is_stable_and_encode_agrees():
    torch.manual_seed(0)
    q = VectorQuantizer(num_codes=16, code_dim=4).eval()  # defaults: l2_norm, kmeans, restarts
    before = _buffers(q)
    z = torch.randn(2, 7, 4)
    z_q1, c1, l1, s1 = q(z)
    z_q2, c2, l2, s2 = q(z)
    assert torch.equal(c1, c2) and torch.equal(z_q1, z_q2) and torch.equal(l1, l2)
    assert s1["dead_codes"].item() == 0
    assert all(torch.equal(v, before[k]) for k, v in q.state_dict().items())  # no update in eval
    assert torch.equal(q.encode(z), c1)
    q.train()
    assert torch.equal(q.encode(z), c1)  # encode never updates, in any mode
    assert all(torch.equal(v, before[k]) for k, v in q.state_dict().items())
    assert torch.equal(q.lookup(c1), q.codebook[c1])


def test_ema_update_by_hand():
    q = _vq(num_codes=3, code_dim=2, l2_norm=False, decay=0.5).train()
    _set_codebook(q, torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))
    z = torch.tensor([[[1.0, 0.0], [-1.0, 2.0], [9.0, 1.0]]])
    _, codes, _, stats = q(z)
    assert codes.tolist() == [[0, 0, 1]]
    # counts [2, 1, 0]; sums [(0, 2), (9, 1), (0, 0)]
    assert torch.allclose(q.cluster_size, torch.tensor([1.5, 1.0, 0.5]))
    assert torch.allclose(q.embed_sum, torch.tensor([[0.0, 1.0], [9.5, 0.5], [0.0, 5.0]]))
    expected = torch.tensor([[0.0, 1.0 / 1.5], [9.5, 0.5], [0.0, 10.0]])  # code 2 unused: kept as is
    assert torch.allclose(q.codebook, expected, atol=1e-4)
    assert torch.equal(q.codebook[2], torch.tensor([0.0, 10.0]))
    p = torch.tensor([2 / 3, 1 / 3])
    assert torch.allclose(stats["perplexity"], torch.exp(-(p * p.log()).sum()))
    assert torch.allclose(stats["code_usage"], torch.tensor(2 / 3))


def test_kmeans_init_finds_every_cluster():
    torch.manual_seed(0)
    centres = torch.eye(8)[:4] * 3.0
    z = (centres[:, None, :] + 0.05 * torch.randn(4, 32, 8)).reshape(8, 16, 8)  # 128 vectors
    q = VectorQuantizer(num_codes=4, code_dim=8, kmeans_iters=5).train()
    _, codes, _, stats = q(z)
    assert bool(q.initted)
    cos = F.normalize(centres, dim=-1) @ q.codebook.t()  # [centre, code]
    assert (cos.max(dim=1).values > 0.99).all()
    assert stats["code_usage"].item() == 1.0
    assert stats["dead_codes"].item() == 0
    assert torch.allclose(stats["perplexity"], torch.tensor(4.0))


def test_dead_codes_are_restarted_to_batch_vectors():
    torch.manual_seed(0)
    q = _vq(num_codes=8, code_dim=2, l2_norm=False, decay=0.5, restart_dead_codes=True, dead_code_threshold=0.1)
    q.train()
    cb = torch.tensor([[1.0, 0.0], [-1.0, 0.0]] + [[100.0 + i, 100.0] for i in range(6)])
    _set_codebook(q, cb)
    usages, restarted = [], None
    for _ in range(6):
        z = torch.randn(4, 16, 2) * 2.0
        _, _, _, stats = q(z)
        usages.append(stats["code_usage"].item())
        if stats["dead_codes"].item() > 0 and restarted is None:
            restarted = int(stats["dead_codes"].item())
            flat = z.reshape(-1, 2)
            # the far codes (2..7) were never chosen: they are now exact input vectors
            for c in q.codebook[2:]:
                assert (flat == c).all(-1).any()
            assert torch.equal(q.cluster_size[2:], torch.ones(6))
    assert restarted == 6  # 0.5^4 < 0.1: after four unused steps
    assert usages[0] == 0.25 and max(usages[4:]) > 0.25


def test_state_dict_round_trip():
    torch.manual_seed(0)
    kw = dict(num_codes=8, code_dim=4, decay=0.5, dead_code_threshold=0.2)
    q1 = VectorQuantizer(**kw).train()
    for _ in range(3):
        q1(torch.randn(2, 10, 4))
    q2 = VectorQuantizer(**kw).train()
    q2.load_state_dict(q1.state_dict())
    assert all(torch.equal(v, q2.state_dict()[k]) for k, v in q1.state_dict().items())
    z = torch.randn(2, 10, 4)
    outs = []
    for q in (q1, q2):
        torch.manual_seed(1)
        outs.append(q(z))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert all(torch.equal(v, q2.state_dict()[k]) for k, v in q1.state_dict().items())


def _batches(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    full = [torch.randn(4, 6, 4, generator=g) for _ in range(3)]  # 3 steps, global batch 4
    return [b[2 * rank : 2 * rank + 2] for b in full] if rank >= 0 else full


_NO_RESTART = dict(num_codes=8, code_dim=4, decay=0.8, kmeans_init=False, restart_dead_codes=False)
_RESTART = dict(num_codes=8, code_dim=4, decay=0.5, kmeans_init=True, kmeans_iters=3, dead_code_threshold=1.5)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # different initial codebooks per rank: the first call must broadcast rank 0's (= seed 0)
        torch.manual_seed(rank)
        out = {}
        for name, kw in (("plain", _NO_RESTART), ("restart", _RESTART)):
            q = VectorQuantizer(**kw).train()
            stats = [q(b)[3] for b in _batches(rank)]
            out[name] = (_buffers(q), stats)
        torch.save(out, os.path.join(out_dir, f"vq{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_agree_and_match_the_global_batch(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "vq0.pt"), torch.load(tmp_path / "vq1.pt")
    for name in ("plain", "restart"):
        for k in r0[name][0]:
            assert torch.equal(r0[name][0][k], r1[name][0][k]), (name, k)
    torch.manual_seed(0)
    ref = VectorQuantizer(**_NO_RESTART).train()
    ref_stats = [ref(b)[3] for b in _batches(-1)]
    for k, v in _buffers(ref).items():
        assert torch.allclose(r0["plain"][0][k].float(), v.float(), atol=1e-6), k
    for s_ref, s0 in zip(ref_stats, r0["plain"][1]):
        for k in s_ref:
            assert torch.allclose(s_ref[k], s0[k]), k
    assert sum(s["dead_codes"].item() for s in r0["restart"][1]) > 0  # the restart path did run
