"""SeTAttention: the SeT operator as a multi-head attention layer."""
import contextlib
from typing import Optional, Sequence, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from mmengine.model import BaseModule
from torch import nn

from ..ops import (grid_positions, kernel_workspace, reference_grid,
                   set_attention, shared_grid_positions, transport_plan)

# Most elongated reference grid accepted for a 2-D map (g_w / g_h).
MAX_GRID_ASPECT = 4

NOT_SCRIPTABLE = (
    'SeTformer cannot be compiled with torch.jit.script: the SeT operator is '
    'a torch.autograd.Function with a hand-written backward, which '
    'TorchScript does not support. Use torch.jit.trace, torch.export, '
    'torch.onnx.export (tools/export.py) or torch.compile instead.')


def set_op(q: torch.Tensor, v: torch.Tensor, refs: torch.Tensor,
           ref_grid: Optional[Tuple[int, int]], hw_shape, eps: float,
           num_iters: int, sigma: float) -> torch.Tensor:
    """The SeT operator of one layer on an ``H x W`` token map, its
    references on a ``ref_grid`` grid (the positions for the LPE are built
    here, once per forward pass for all layers: ``shared_grid_positions``;
    ``ref_grid=None``: no LPE).

    A leaf of ``torch.fx`` tracing (``torch.fx.wrap``): symbolic tracing,
    torchvision's and timm's fx feature extraction record one call of it per
    layer instead of tracing the operator's shape checks and autograd
    function, and the traced graph runs it unchanged.
    """
    pos = None
    if ref_grid is not None:
        pos = (shared_grid_positions(*hw_shape, device=refs.device),
               shared_grid_positions(*ref_grid, device=refs.device))
    return set_attention(q, v, refs, eps=eps, num_iters=num_iters, pos=pos,
                         sigma=sigma)


torch.fx.wrap('set_op')


def shared_kernel_workspace():
    """``ops.kernel_workspace()`` for a forward pass of SeT layers, or no
    context under ``torch.compile``: dynamo cannot guard the thread-local
    workspace (it fails on "Guard failed on the same frame it was created"
    with torch 2.14), and compiled code does not use it anyway."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return kernel_workspace()


def check_num_refs(num_refs, ref_grid: Optional[Sequence[int]] = None,
                   field: str = 'num_refs') -> Tuple[int, int]:
    """Validate ``num_refs`` and return its reference grid ``(g_h, g_w)``.

    References sit on a ``g_h x g_w`` grid of the image for the positional
    encoding.  By default the grid is the most square factorisation of m,
    which must not be more elongated than 1 x 4 (e.g. 500 -> 20 x 25,
    750 -> 25 x 30, 800 -> 25 x 32; a prime such as 503 is refused); pass
    ``ref_grid`` to choose it explicitly.
    """
    if isinstance(num_refs, bool) or not isinstance(num_refs, int) \
            or num_refs < 1:
        raise ValueError(f'{field} must be an integer >= 1, got {num_refs!r}')
    if ref_grid is not None:
        g_h, g_w = (int(g) for g in ref_grid)
        if g_h < 1 or g_w < 1 or g_h * g_w != num_refs:
            raise ValueError(f'ref_grid {tuple(ref_grid)} must be two '
                             f'positive ints whose product is {field}='
                             f'{num_refs}')
        return g_h, g_w
    g_h, g_w = reference_grid(num_refs)
    if g_w > MAX_GRID_ASPECT * g_h:
        near = [k for k in range(max(1, num_refs - 8), num_refs + 9)
                if (lambda g: g[1] <= MAX_GRID_ASPECT * g[0])(
                    reference_grid(k))]
        raise ValueError(
            f'{field}={num_refs} only factors into a {g_h} x {g_w} reference '
            f'grid (more elongated than 1 x {MAX_GRID_ASPECT}); choose a '
            f'value with a near-square factorisation (e.g. {near[:4]}) or '
            'pass ref_grid=(g_h, g_w)')
    return g_h, g_w


class SeTAttention(BaseModule):
    """Multi-head SeT attention over a token map.

    Args:
        embed_dims (int): channels C.
        num_heads (int): heads h; C must be divisible by h.
        num_refs (int): references m per head, on a ``ref_grid`` grid.
        eps (float): entropic regularisation of the transport (> 0).
        sigma (float): LPE bandwidth (> 0); used when ``use_lpe``.
        num_iters (int): Sinkhorn iterations T (>= 0).
        use_lpe (bool): linear positional encoding on/off.
        ref_grid (tuple, optional): ``(g_h, g_w)`` with product ``num_refs``.
        qv_bias (bool): bias in the query/value projection.
        proj_drop (float): dropout after the output projection.
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 num_refs: int = 500,
                 eps: float = 0.1,
                 sigma: float = 0.5,
                 num_iters: int = 3,
                 use_lpe: bool = True,
                 ref_grid: Optional[Sequence[int]] = None,
                 qv_bias: bool = True,
                 proj_drop: float = 0.,
                 init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        if num_heads < 1 or embed_dims % num_heads:
            raise ValueError(f'embed_dims={embed_dims} must be divisible by '
                             f'num_heads={num_heads}')
        if not eps > 0:
            raise ValueError(f'eps must be > 0, got {eps}')
        if use_lpe and not sigma > 0:
            raise ValueError(f'sigma must be > 0, got {sigma}')
        if isinstance(num_iters, bool) or not isinstance(num_iters, int) \
                or num_iters < 0:
            raise ValueError(f'num_iters must be an integer >= 0, got '
                             f'{num_iters!r}')
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.head_dims = embed_dims // num_heads
        self.num_refs = num_refs
        self.ref_grid = check_num_refs(num_refs, ref_grid)
        self.eps = float(eps)
        self.sigma = float(sigma)
        self.num_iters = num_iters
        self.use_lpe = use_lpe

        self.qv = nn.Linear(embed_dims, 2 * embed_dims, bias=qv_bias)
        # Unit-norm references: the kernel only sees directions, and unit
        # scale keeps their optimiser steps comparable to data centroids.
        self.refs = nn.Parameter(F.normalize(
            torch.randn(num_heads, num_refs, self.head_dims), dim=-1))
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return (f'heads={self.num_heads}, refs={self.num_refs} '
                f'({self.ref_grid[0]}x{self.ref_grid[1]}), eps={self.eps}, '
                f'sigma={self.sigma if self.use_lpe else None}, '
                f'T={self.num_iters}')

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling:
        # fail with the reason and the alternatives, not a parser error
        raise RuntimeError(NOT_SCRIPTABLE)

    def _split(self, x: torch.Tensor, hw_shape):
        B, n, C = x.shape
        # (under fx tracing the shapes are symbolic; set_op checks them)
        if not isinstance(x, torch.fx.Proxy) and (
                C != self.embed_dims or n != hw_shape[0] * hw_shape[1]):
            raise ValueError(f'expected x of shape (B, {hw_shape[0]}*'
                             f'{hw_shape[1]}, {self.embed_dims}), got '
                             f'{tuple(x.shape)}')
        qv = self.qv(x).view(B, n, 2, self.num_heads, self.head_dims)
        q, v = qv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, n, d) each
        return q, v

    def _pos(self, hw_shape):
        if not self.use_lpe:
            return None
        return (grid_positions(*hw_shape, device=self.refs.device),
                grid_positions(*self.ref_grid, device=self.refs.device))

    def plan(self, x: torch.Tensor, hw_shape) -> torch.Tensor:
        """Transport plan of this layer for ``x`` (B, n, C): (B, h, n, m)."""
        q, _ = self._split(x, hw_shape)
        return transport_plan(
            q, self.refs, eps=self.eps, num_iters=self.num_iters,
            pos=self._pos(hw_shape), sigma=self.sigma)

    def forward(self, x: torch.Tensor, hw_shape) -> torch.Tensor:
        """x: (B, n, C) tokens of an H x W map (``hw_shape``) -> (B, n, C)."""
        q, v = self._split(x, hw_shape)
        y = set_op(q, v, self.refs, self.ref_grid if self.use_lpe else None,
                   hw_shape, self.eps, self.num_iters, self.sigma)
        y = y.transpose(1, 2).reshape(x.shape)
        return self.proj_drop(self.proj(y))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # References trained with another m (e.g. ImageNet m=500 -> COCO
        # m=750) are resampled on their grid, like position tables.
        key = prefix + 'refs'
        src = state_dict.get(key)
        if src is not None and src.dim() == 3 and src.shape[1] != \
                self.num_refs and src.shape[0] == self.num_heads \
                and src.shape[2] == self.head_dims:
            state_dict[key] = resample_refs(src, self.ref_grid)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def resample_refs(refs: torch.Tensor, ref_grid: Tuple[int, int]):
    """Bilinearly resample (h, m, d) references to a ``ref_grid`` grid."""
    h, m, d = refs.shape
    src_grid = reference_grid(m)
    grid = refs.float().permute(0, 2, 1).reshape(h, d, *src_grid)
    out = F.interpolate(grid, size=tuple(ref_grid), mode='bilinear',
                        align_corners=False)
    out = out.reshape(h, d, -1).permute(0, 2, 1)
    return F.normalize(out, dim=-1).to(refs.dtype)
