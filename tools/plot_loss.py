"""Plot training losses of an mmengine run (its ``vis_data/scalars.json``).

    python tools/plot_loss.py work_dirs/demo_det --out loss.png
    python tools/plot_loss.py work_dirs/x/20261122_0001/vis_data/scalars.json \
        --keys loss loss_cls loss_mask
"""
import argparse
import glob
import json
import os
import os.path as osp

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402


def find_scalars(path: str) -> str:
    """The newest ``scalars.json`` under a work dir (or the file itself)."""
    if osp.isfile(path):
        return path
    found = glob.glob(osp.join(path, '*', 'vis_data', 'scalars.json'))
    # a test run also writes one (without losses): keep training logs
    found = [f for f in found if _has_losses(f)]
    if not found:
        raise FileNotFoundError(f'no training scalars.json under {path}')
    return max(found, key=osp.getmtime)


def _has_losses(path: str) -> bool:
    with open(path) as f:
        return any('"loss"' in line for line in f)


def read_losses(path: str):
    """{key: ([steps], [values])} for every loss-like key."""
    series = {}
    with open(find_scalars(path)) as f:
        for line in f:
            rec = json.loads(line)
            if 'loss' not in rec or 'step' not in rec:
                continue
            for k, v in rec.items():
                if 'loss' in k:
                    s = series.setdefault(k, ([], []))
                    s[0].append(rec['step'])
                    s[1].append(v)
    return series


def plot_losses(path: str, out: str, keys=None, title=None) -> str:
    series = read_losses(path)
    keys = keys or sorted(series, key=lambda k: (k != 'loss', k))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for k in keys:
        if k in series:
            ax.plot(*series[k], label=k, lw=2.2 if k == 'loss' else 1.0)
    ax.set_xlabel('iteration')
    ax.set_ylabel('loss')
    ax.set_yscale('log')
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=8)
    ax.set_title(title or 'training loss')
    fig.tight_layout()
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('path', help='work dir or scalars.json')
    p.add_argument('--keys', nargs='+', help='loss keys (default: all)')
    p.add_argument('--out', default='loss_curve.png')
    p.add_argument('--title')
    args = p.parse_args()
    print(plot_losses(args.path, args.out, args.keys, args.title))


if __name__ == '__main__':
    main()
