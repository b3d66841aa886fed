"""What SeT's reference cells gather: the transport plan of one layer over an
image (the view of the paper's Figure 4)."""
from typing import Optional, Tuple

import numpy as np
import torch

from .models import SeTformer
from .models.set_attention import SeTAttention

__all__ = ['find_backbone', 'layer_plan', 'plot_plan', 'image_tensor']


def find_backbone(model) -> SeTformer:
    for m in model.modules():
        if isinstance(m, SeTformer):
            return m
    raise TypeError(f'{type(model).__name__} has no SeTformer backbone')


def image_tensor(img_bgr: np.ndarray, preprocessor_cfg: dict) -> torch.Tensor:
    """(1, 3, H, W) input normalised as the config's data preprocessor."""
    cfg = preprocessor_cfg or {}
    img = img_bgr.astype(np.float32)
    if cfg.get('bgr_to_rgb', cfg.get('to_rgb', False)):
        img = img[..., ::-1]
    mean = np.array(cfg.get('mean', [0., 0., 0.]), np.float32)
    std = np.array(cfg.get('std', [1., 1., 1.]), np.float32)
    img = (img - mean) / std
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None]


@torch.no_grad()
def layer_plan(backbone: SeTformer, x: torch.Tensor, stage: int,
               block: int) -> Tuple[torch.Tensor, Tuple[int, int], tuple]:
    """Transport plan P (heads, n, m) of ``stages[stage].blocks[block]`` for
    image ``x`` (1, 3, H, W), with the token map shape and reference grid."""
    try:
        attn: SeTAttention = backbone.stages[stage].blocks[block].attn
    except IndexError:
        depths = [len(s.blocks) for s in backbone.stages]
        raise IndexError(f'no block {block} in stage {stage}; depths are '
                         f'{depths}') from None
    captured = {}

    def hook(module, args):
        captured['x'], captured['hw'] = args[0], tuple(args[1])

    handle = attn.register_forward_pre_hook(hook)
    try:
        backbone.eval()(x)
    finally:
        handle.remove()
    plan = attn.plan(captured['x'], captured['hw'])[0]
    return plan.float(), captured['hw'], attn.ref_grid


def plot_plan(img_bgr: np.ndarray, plan: torch.Tensor, hw: Tuple[int, int],
              ref_grid: Tuple[int, int], out: str, title: str = '',
              head: Optional[int] = None, num_show: int = 8) -> str:
    """Image | hard assignment of tokens to cells | the cells that gather the
    most focused regions (columns of P normalised over tokens)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    P = plan.mean(0) if head is None else plan[head]  # (n, m)
    n, m = P.shape
    H, W = img_bgr.shape[:2]
    rgb = img_bgr[..., ::-1]
    # colour each reference by its place on the reference grid
    gy, gx = np.divmod(np.arange(m), ref_grid[1])
    hue = np.stack([gx / max(ref_grid[1] - 1, 1),
                    gy / max(ref_grid[0] - 1, 1), np.full(m, 0.6)], 1)
    assign = P.argmax(1).numpy().reshape(hw)
    assign_rgb = hue[assign]
    cols = P / P.sum(0, keepdim=True).clamp_min(1e-30)  # what cell j gathers
    entropy = -(cols * cols.clamp_min(1e-30).log()).sum(0)
    order = entropy.argsort()[:num_show].tolist()  # most focused cells
    ncol = 1 + (num_show + 1) // 2
    fig = plt.figure(figsize=(2.6 * ncol, 5.4), dpi=110)
    ax = fig.add_subplot(2, ncol, 1)
    ax.imshow(rgb)
    ax.set_title('image', fontsize=9)
    ax = fig.add_subplot(2, ncol, ncol + 1)
    ax.imshow(rgb)
    ax.imshow(assign_rgb, alpha=0.65, extent=(0, W, H, 0),
              interpolation='nearest')
    ax.set_title(f'token -> cell (argmax P)\n{hw[0]}x{hw[1]} tokens, '
                 f'{m} cells', fontsize=8)
    for k, j in enumerate(order):
        r, c = divmod(k, ncol - 1)
        ax = fig.add_subplot(2, ncol, r * ncol + c + 2)
        ax.imshow(rgb)
        heat = cols[:, j].numpy().reshape(hw)
        ax.imshow(heat / max(heat.max(), 1e-30), cmap='magma', alpha=0.7,
                  extent=(0, W, H, 0), interpolation='bilinear')
        ax.set_title(f'cell {j} (grid {gy[j]},{gx[j]})', fontsize=8)
    for a in fig.axes:
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle(title or 'SeT transport plan', fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
