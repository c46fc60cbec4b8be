"""EMA vector quantizer: the codebook of a BEiT v2 visual tokenizer.

References: Peng et al. 2022, "BEiT v2: Masked Image Modeling with Vector-quantized Visual
Tokenizers" (microsoft/unilm `beit2/norm_ema_quantizer.py`, `NormEMAVectorQuantizer`); van den Oord
et al. 2017, "Neural Discrete Representation Learning" (VQ-VAE: nearest-code lookup, straight-through
gradient, commitment loss `beta * ||z - sg(e)||^2`, EMA codebook of its appendix / VQ-VAE-2).

The codebook is learnt by exponential moving averages of the vectors assigned to each code, not by
gradients, so it lives in buffers (the optimizer never sees it) and the only loss is the commitment
term. Two update rules (`update`):

* "norm_ema", BEiT v2's `NormEMAVectorQuantizer` (`norm_ema_inplace`): each code used in the batch
  moves towards the l2-normalised mean of the vectors assigned to it, and is renormalised,
  `e <- l2norm(d * e + (1 - d) * l2norm(sum_i z_i / n))`: every used code moves by the same
  fraction whatever its count (the VQ-KD default; needs `l2_norm`);
* "ema", VQ-VAE's (van den Oord et al. 2017, appendix; VQ-VAE-2): EMAs of the counts N and of the
  sums m of assigned vectors, `e <- m / N` (l2-normalised when `l2_norm`): a code's update is
  weighted by how many vectors it received over time (the pixel tokenizer's rule here).
 Codebooks easily collapse onto a few codes ("dead codes": never nearest to any input, so
never updated, so never chosen). Three remedies, all optional:

* l2-normalised inputs and codes (BEiT v2): the lookup is by cosine similarity, so a code cannot be
  stranded far away in norm, and all codes live on the same sphere as the data;
* k-means initialisation from the first training batch (BEiT v2; seeded by k-means++ here): codes
  start where the data is instead of at random points most inputs are never nearest to;
* restart (Dhariwal et al. 2020 Jukebox; Zeghidour et al. 2021 SoundStream): a code whose EMA
  cluster size falls below `dead_code_threshold` is moved onto a random input vector of the
  current batch, where it is guaranteed to be nearest to at least that vector.

Choices: codes unused in a batch keep their value exactly (as in BEiT v2: `torch.where` on the
batch counts), while their EMA statistics keep decaying, which is how they are detected as dead.
The statistics start as a pseudo-count of one vector sitting at each initial code, so an unused
code is declared dead after log(threshold) / log(decay) steps (~690 at 0.99 and 1e-3).
Under torch.distributed, counts and sums are summed over processes, and every random choice
(k-means, restarts) is made on rank 0 and broadcast, so all ranks hold bit-identical codebooks.
Everything is computed in float32, outside autocast: argmin over thousands of codes in bf16 ties.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vfm import distributed as vdist


class VectorQuantizer(nn.Module):
    def __init__(
        self,
        *,
        num_codes: int = 8192,
        code_dim: int = 32,
        beta: float = 1.0,
        decay: float = 0.99,
        update: str = "ema",
        l2_norm: bool = True,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        restart_dead_codes: bool = True,
        dead_code_threshold: float = 1e-3,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if update not in ("norm_ema", "ema"):
            raise ValueError(f"method.codebook_update must be 'norm_ema' or 'ema', got {update!r}")
        if update == "norm_ema" and not l2_norm:
            raise ValueError("the norm_ema codebook update keeps unit-norm codes: it needs l2_norm=True")
        self.update = update
        self.num_codes, self.code_dim, self.beta, self.decay = num_codes, code_dim, beta, decay
        self.l2_norm, self.kmeans_init, self.kmeans_iters = l2_norm, kmeans_init, kmeans_iters
        self.restart_dead_codes, self.dead_code_threshold, self.eps = restart_dead_codes, dead_code_threshold, eps
        codebook = torch.randn(num_codes, code_dim)
        if l2_norm:
            codebook = F.normalize(codebook, dim=-1)
        self.register_buffer("codebook", codebook)
        self.register_buffer("cluster_size", torch.ones(num_codes))
        self.register_buffer("embed_sum", codebook.clone())
        # False until the first training call, which k-means-initialises or at least broadcasts
        # the codebook (ranks seeded differently would otherwise average unrelated codebooks).
        self.register_buffer("initted", torch.tensor(False))

    @staticmethod
    def _nearest(x: torch.Tensor, codebook: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
        """Index of the nearest code (Euclidean; = cosine for unit vectors) for each row of x [N, D]."""
        # argmin ||x - c||^2 = argmax (2 x.c - ||c||^2); chunked so [N, K] never exists at once
        c2 = codebook.pow(2).sum(-1)
        return torch.cat([(2 * xc @ codebook.t() - c2).argmax(-1) for xc in x.split(chunk)])

    @staticmethod
    def _kmeans_pp_seeds(x: torch.Tensor, k: int) -> torch.Tensor:
        """k-means++ seeding (Arthur & Vassilvitskii 2007): each seed drawn with prob. ~ squared distance
        to the nearest seed so far. Uniform seeds land in every one of k equal clusters only with
        probability k!/k^k, and Lloyd iterations rarely undo that (two codes split one cluster)."""
        n = x.shape[0]
        # uniforms from the CPU generator (saved by the trainer), inverse-CDF on the device: no syncs
        u = torch.rand(k).to(x.device)
        seeds = x.new_empty(k, x.shape[1])
        # index_select with 1-element index tensors: indexing by a 0-dim CUDA tensor would sync
        seeds[:1] = x.index_select(0, (u[:1] * n).long().clamp(max=n - 1))
        d2 = (x - seeds[0]).pow(2).sum(-1)
        for i in range(1, k):
            cdf = d2.cumsum(0)
            idx = torch.searchsorted(cdf, u[i : i + 1] * cdf[-1:], right=True).clamp(max=n - 1)
            seeds[i : i + 1] = x.index_select(0, idx)
            d2 = torch.minimum(d2, (x - seeds[i]).pow(2).sum(-1))
        return seeds

    def _kmeans(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, k = x.shape[0], self.num_codes
        if n >= k:
            means = self._kmeans_pp_seeds(x, k)
        else:  # fewer vectors than codes: sample with replacement; the surplus codes end up restarted
            means = x[torch.randint(n, (k,)).to(x.device)].clone()
        for _ in range(self.kmeans_iters):
            assign = self._nearest(x, means)
            bins = torch.bincount(assign, minlength=k)
            new = torch.zeros_like(means).index_add_(0, assign, x) / bins.clamp(min=1)[:, None]
            if self.l2_norm:
                new = F.normalize(new, dim=-1)
            means = torch.where((bins > 0)[:, None], new, means)  # empty clusters keep their sample
        return means, torch.bincount(self._nearest(x, means), minlength=k).float()

    @torch.no_grad()
    def _init_codebook(self, flat: torch.Tensor) -> None:
        if self.kmeans_init:
            if vdist.get_rank() == 0:
                means, bins = self._kmeans(flat)
                self.codebook.copy_(means)
                # rank 0 saw 1/world of the global batch: scale its counts to the global EMA scale
                self.cluster_size.copy_(bins * vdist.get_world_size())
            if vdist.is_dist():
                dist.broadcast(self.codebook, 0)
                dist.broadcast(self.cluster_size, 0)
            self.embed_sum.copy_(self.codebook * self.cluster_size[:, None])
        elif vdist.is_dist():
            dist.broadcast(self.codebook, 0)
            self.embed_sum.copy_(self.codebook * self.cluster_size[:, None])
        self.initted.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor) -> int:
        sums = vdist.all_reduce_sum(torch.zeros_like(self.embed_sum).index_add_(0, codes, flat))  # one-hot^T z
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        if self.update == "norm_ema":
            batch_mean = F.normalize(sums / counts.clamp(min=1)[:, None], dim=-1)
            new = F.normalize(self.decay * self.codebook + (1 - self.decay) * batch_mean, dim=-1)
        else:
            self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            new = self.embed_sum / (self.cluster_size + self.eps)[:, None]
            if self.l2_norm:
                new = F.normalize(new, dim=-1)
        self.codebook.copy_(torch.where((counts > 0)[:, None], new, self.codebook))
        if not self.restart_dead_codes:
            return 0
        dead = (self.cluster_size < self.dead_code_threshold).nonzero().squeeze(1)
        n_dead = dead.numel()  # identical on all ranks: cluster_size is
        if n_dead == 0:
            return 0
        # every rank draws (same RNG consumption everywhere), rank 0's choice wins via broadcast;
        # rank 0's local batch is a random part of the global one, and gathering it all costs more
        n = flat.shape[0]
        idx = torch.randperm(n)[:n_dead] if n >= n_dead else torch.randint(n, (n_dead,))
        fresh = flat[idx.to(flat.device)].clone()
        if vdist.is_dist():
            dist.broadcast(fresh, 0)
        self.codebook[dead] = fresh
        self.embed_sum[dead] = fresh
        self.cluster_size[dead] = 1.0  # a pseudo-count of one vector, like the initial codes
        return n_dead

    def _prepare(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[-1] != self.code_dim:
            raise ValueError(f"VectorQuantizer expects [..., {self.code_dim}], got {tuple(z.shape)}")
        z = z.float()
        return F.normalize(z, dim=-1) if self.l2_norm else z

    # Always eager, also under trainer.compile: the forward updates the codebook buffers in place
    # (EMA, k-means, restarts), which a compiled graph's saved tensors do not survive ("modified by
    # an inplace operation" in backward). The quantizer is a small part of a step.
    @torch.compiler.disable
    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """z [..., D] -> (straight-through z_q [..., D] float32, codes [...] long, commitment loss, stats).

        In training mode, first initialises the codebook if needed, then updates it by EMA with this
        batch (after the lookup: the returned codes and z_q use the codebook the batch saw).
        """
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = self._prepare(z)
            flat = z.reshape(-1, self.code_dim)
            if self.training and not bool(self.initted):
                self._init_codebook(flat.detach())
            codes = self._nearest(flat.detach(), self.codebook)
            z_q = self.codebook[codes].view_as(z)
            loss = self.beta * F.mse_loss(z, z_q.detach())
            z_q = z + (z_q - z).detach()
            counts = torch.bincount(codes, minlength=self.num_codes).float()
            n_dead = 0
            if self.training:
                # collectives only in training: eval may run on one rank alone (e.g. visualisation)
                counts = vdist.all_reduce_sum(counts)
                n_dead = self._ema_update(flat.detach(), codes, counts)
            p = counts / counts.sum().clamp(min=1)
            entropy = -(p * torch.log(p.clamp(min=1e-12))).sum()
            stats = {
                "perplexity": entropy.exp().detach(),
                "code_usage": (counts > 0).float().mean(),
                "dead_codes": torch.tensor(float(n_dead), device=z.device),
            }
        return z_q, codes.view(z.shape[:-1]), loss, stats

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Codes [...] for z [..., D]; never updates the codebook, in any mode."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = self._prepare(z)
            return self._nearest(z.reshape(-1, self.code_dim), self.codebook).view(z.shape[:-1])

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors [..., D] for integer codes [...]."""
        return self.codebook[codes]

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, code_dim={self.code_dim}, l2_norm={self.l2_norm}, decay={self.decay}, "
                f"update={self.update}")
