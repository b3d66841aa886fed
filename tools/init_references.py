"""Initialise SeT references from data: spherical k-means centroids of each
layer's normalised query features over batches of the training set.

    python tools/init_references.py configs/setformer_t_in1k.py \
        --num-batches 20 --out work_dirs/setformer_t_kmeans_refs.pth
    python tools/init_references.py CONFIG --checkpoint ckpt.pth \
        --num-batches 50 --max-vectors 50000 --out refs.pth

The output holds the model's full state dict with the new references (all
other weights unchanged): use it with ``load_from=...`` or
``init_cfg=dict(type='Pretrained', checkpoint=..., prefix='backbone.')``.
"""
import argparse
import os
import os.path as osp
import sys
import time

import torch
from mmengine.utils import ProgressBar

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from mmsetformer.apis import DictAction, init_model, load_config  # noqa
from mmsetformer.references import init_references  # noqa: E402
from mmsetformer.visualization import find_backbone  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('config')
    p.add_argument('--checkpoint', help='start from these weights')
    p.add_argument('--num-batches', type=int, default=20,
                   help='training batches to collect features from')
    p.add_argument('--max-vectors', type=int, default=20000,
                   help='reservoir size per layer (vectors per head)')
    p.add_argument('--iters', type=int, default=30, help='k-means iterations')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available()
                   else 'cpu')
    p.add_argument('--out', required=True, help='output checkpoint (.pth)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction)
    return p.parse_args()


def main():
    args = parse_args()
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner
    cfg = load_config(args.config, args.cfg_options)
    model = init_model(cfg, args.checkpoint, device=args.device)
    backbone = find_backbone(model)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    loader_cfg = cfg.train_dataloader.copy()
    loader = Runner.build_dataloader(loader_cfg, seed=args.seed)
    batches = []
    print(f'collecting {args.num_batches} training batches')
    bar = ProgressBar(args.num_batches)
    for data in loader:
        if len(batches) == args.num_batches:
            break
        with torch.no_grad():
            batches.append(model.data_preprocessor(data, False)['inputs'])
        bar.update()
    print()
    t0 = time.time()
    stats = init_references(backbone, batches, args.max_vectors, args.iters,
                            args.seed)
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    meta = dict(config=osp.basename(args.config), init_references=dict(
        num_batches=len(batches), max_vectors=args.max_vectors,
        iters=args.iters, seed=args.seed,
        layers=[{k: v for k, v in s.items()} for s in stats]))
    if getattr(model, 'dataset_meta', None):
        meta['dataset_meta'] = model.dataset_meta
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    torch.save(dict(state_dict=state, meta=meta), args.out)
    print(f'{len(stats)} layers initialised in {time.time() - t0:.1f}s; '
          f'wrote {args.out}')


if __name__ == '__main__':
    main()
