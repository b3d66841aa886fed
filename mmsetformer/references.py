"""Data-driven SeT references: spherical k-means centroids of each layer's
normalised query features (the paper's Nystrom centres)."""
import math
from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F

from .models import SeTformer

__all__ = ['spherical_kmeans', 'Reservoir', 'init_references']


def _best_cos(x: torch.Tensor, c: torch.Tensor, chunk: int = 8192):
    """Max cosine and argmax over centroids c (h, k, d) for x (h, N, d)."""
    best, idx = [], []
    for s in range(0, x.shape[1], chunk):
        sim = torch.bmm(x[:, s:s + chunk], c.transpose(1, 2))
        v, i = sim.max(-1)
        best.append(v)
        idx.append(i)
    return torch.cat(best, 1), torch.cat(idx, 1)


def _kmeanspp(x: torch.Tensor, k: int, gen: torch.Generator):
    """k-means++ seeding on the cosine distance, batched over heads."""
    h, n, d = x.shape
    ar = torch.arange(h, device=x.device)
    first = torch.randint(n, (h, ), generator=gen, device='cpu').to(x.device)
    centers = torch.empty(h, k, d, dtype=x.dtype, device=x.device)
    centers[:, 0] = x[ar, first]
    dist = (1 - torch.bmm(x, centers[:, :1].transpose(1, 2))[..., 0]).clamp_(
        min=0)
    for j in range(1, k):
        w = dist.square()
        # all points equal to a centre already: pick uniformly
        w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))
        pick = torch.multinomial(w.cpu(), 1, generator=gen)[:, 0].to(
            x.device)
        centers[:, j] = x[ar, pick]
        new = 1 - torch.bmm(x, centers[:, j:j + 1].transpose(1, 2))[..., 0]
        dist = torch.minimum(dist, new.clamp_(min=0))
    return centers


def spherical_kmeans(x: torch.Tensor,
                     k: int,
                     iters: int = 30,
                     seed: int = 0,
                     tol: float = 1e-6) -> Dict[str, torch.Tensor]:
    """Spherical k-means of x (h, N, d) into k unit centroids per head.

    Cosine similarity, k-means++ seeding; an empty cluster is re-seeded with
    the point farthest from its centroid. Returns ``centroids`` (h, k, d),
    ``labels`` (h, N), ``inertia`` (h,) = mean (1 - cos) to the centroid and
    ``sizes`` (h, k).
    """
    if x.dim() == 2:
        x = x[None]
    h, n, d = x.shape
    if n < k:
        raise ValueError(f'{n} feature vectors cannot make {k} clusters; '
                         'collect more (--num-batches)')
    x = F.normalize(x.float(), dim=-1)
    gen = torch.Generator().manual_seed(seed)
    c = _kmeanspp(x, k, gen)
    prev = math.inf
    ar = torch.arange(h, device=x.device)
    for _ in range(max(iters, 1)):
        # Lloyd step: assign, then move every centroid to the normalised
        # mean of its points, so the result is a consistent fixed point
        cos, labels = _best_cos(x, c)
        sums = torch.zeros(h, k, d, dtype=x.dtype, device=x.device)
        sums.scatter_add_(1, labels[..., None].expand(-1, -1, d), x)
        sizes = torch.bincount(
            (labels + ar[:, None] * k).flatten(), minlength=h * k).view(h, k)
        empty = sizes == 0
        if empty.any():
            # re-seed with the worst-fitted points, one per empty cluster
            far = cos.argsort(1)
            for hh in empty.nonzero()[:, 0].unique().tolist():
                slots = empty[hh].nonzero()[:, 0]
                sums[hh, slots] = x[hh, far[hh, :len(slots)]]
        c = F.normalize(sums, dim=-1)
        inertia = (1 - cos).mean().item()
        if prev - inertia <= tol * max(prev, 1e-12) and not empty.any():
            break
        prev = inertia
    fit = (x * c[ar[:, None], labels]).sum(-1)
    return dict(centroids=c, labels=labels, inertia=(1 - fit).mean(1),
                sizes=sizes)


class Reservoir:
    """Uniform sample of at most ``size`` rows from a stream (per head)."""

    def __init__(self, size: int, seed: int = 0):
        self.size = size
        self.seen = 0
        self.data: Optional[torch.Tensor] = None
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, rows: torch.Tensor) -> None:
        """rows: (h, N, d)."""
        rows = rows.detach().float().cpu()
        n = rows.shape[1]
        if self.data is None:
            self.data = rows[:, :0].clone()
        room = self.size - self.data.shape[1]
        if room > 0:
            self.data = torch.cat([self.data, rows[:, :room]], 1)
            rows, start = rows[:, room:], self.seen + room
        else:
            start = self.seen
        if rows.shape[1]:
            # Algorithm R, vectorised: row t replaces slot j < size w.p.
            # size / (t + 1)
            t = torch.arange(start, start + rows.shape[1])
            j = (torch.rand(len(t), generator=self.gen) * (t + 1)).long()
            keep = j < self.size
            self.data[:, j[keep]] = rows[:, keep]
        self.seen += n


@torch.no_grad()
def init_references(backbone: SeTformer,
                    batches: Iterable[torch.Tensor],
                    max_vectors: int = 20000,
                    iters: int = 30,
                    seed: int = 0,
                    log: Callable[[str], None] = print,
                    keep_samples: bool = False) -> List[dict]:
    """Set every SeT layer's references to k-means centroids of its queries.

    Layers are done in the order they run: layer l is initialised before
    the features of layer l+1 are computed, so later layers see the new
    earlier ones. ``batches`` are preprocessed images (B, 3, H, W); their
    activations at the current layer are kept in memory (one layer at a
    time). Returns one stats dict per layer.
    """
    backbone.eval()
    feats = [backbone.stem(x) for x in batches]
    if not feats:
        raise ValueError('no batches to collect features from')
    layers = sum(len(s.blocks) for s in backbone.stages)
    stats, done = [], 0
    for i, stage in enumerate(backbone.stages):
        if stage.downsample is not None:
            feats = [stage.downsample(f) for f in feats]
        hws = [tuple(f.shape[-2:]) for f in feats]
        tokens = [f.flatten(2).transpose(1, 2) for f in feats]
        for j, block in enumerate(stage.blocks):
            attn = block.attn
            sample = Reservoir(max_vectors, seed=seed + done)
            for t, hw in zip(tokens, hws):
                q, _ = attn._split(block.norm1(t), hw)  # (B, h, n, d)
                sample.add(F.normalize(q.float(), dim=-1).transpose(
                    0, 1).flatten(1, 2))
            res = spherical_kmeans(sample.data.to(attn.refs.device),
                                   attn.num_refs, iters, seed + done)
            attn.refs.copy_(res['centroids'].to(attn.refs))
            sizes = res['sizes'].float()
            stat = dict(
                layer=f'stages.{i}.blocks.{j}', vectors=sample.data.shape[1],
                seen=sample.seen, inertia=res['inertia'].mean().item(),
                size_min=int(sizes.min()), size_max=int(sizes.max()),
                size_cv=(sizes.std() / sizes.mean()).item())
            if keep_samples:
                stat.update(samples=sample.data, labels=res['labels'])
            stats.append(stat)
            done += 1
            log(f'[{done}/{layers}] stages.{i}.blocks.{j}: '
                f'{stat["vectors"]} of {stat["seen"]} vectors, inertia '
                f'{stat["inertia"]:.4f}, cluster sizes {stat["size_min"]}-'
                f'{stat["size_max"]} (cv {stat["size_cv"]:.2f})')
            tokens = [block(t, hw) for t, hw in zip(tokens, hws)]
        feats = [
            t.transpose(1, 2).reshape(t.shape[0], -1, *hw)
            for t, hw in zip(tokens, hws)
        ]
    return stats
