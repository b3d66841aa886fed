"""Sweep the backbone swap over every model family shipped with the
installed mmdet, mmseg and mmpretrain, and write the report.

    python tools/swap_sweep.py               # every family: ~1 h, 1 thread
    python tools/swap_sweep.py --scopes mmseg --families upernet sem_fpn \
        --update                             # re-run some, update the report

For each family (a folder of the library's ``.mim/configs``) it takes the
first config, ResNet-50 baselines first, whose backbone yields a
multi-scale pyramid (or a single map, for classifiers), writes the swap
with ``tools/swap_backbone.py`` (a tiny SeTformer: widths 16-128, one
block per stage, m = 16), builds the written config with the library's
MODELS registry and runs one training step and one prediction on a
synthetic batch (64 x 64 images). Families with no such config (plain
ViTs, multimodal models, ...) are listed as excluded by design.
"""
import argparse
import importlib.util
import json
import os
import os.path as osp
import platform
import sys
import tempfile
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)


def load_swap_tool():
    """``tools/swap_backbone.py``'s ``main(argv)``: the sweep runs the
    tool itself, so the tool is what is tested."""
    spec = importlib.util.spec_from_file_location(
        'swap_backbone', osp.join(ROOT, 'tools', 'swap_backbone.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--scopes', nargs='+',
                   default=['mmdet', 'mmseg', 'mmpretrain'])
    p.add_argument('--families', nargs='+', default=None,
                   help='only these families (folder names)')
    p.add_argument('--out', default=osp.join(ROOT, 'results',
                                             'backbone_swap.md'))
    p.add_argument('--json', default=osp.join(ROOT, 'results',
                                              'backbone_swap.json'),
                   help='the results as JSON (also read by --update)')
    p.add_argument('--update', action='store_true',
                   help='re-run only the selected families and update the '
                   'results in --json, then re-write the report')
    p.add_argument('--render', action='store_true',
                   help='only re-write the report from --json')
    p.add_argument('--sizes', type=int, nargs='+', default=[64, 224, 384],
                   help='input sizes, tried in turn while the check fails')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import warnings

    import mmengine
    import torch
    from mmengine.logging import MMLogger

    import mmsetformer
    from mmsetformer.swap_check import (FamilyResult, families,
                                        report_markdown, sweep_family)
    warnings.filterwarnings('ignore')
    MMLogger.get_instance('mmengine', log_level='ERROR')
    tool = load_swap_tool()
    results = []
    old = []
    if args.render:
        args.update, args.families = True, ['']  # runs nothing
    if args.update:
        with open(args.json) as f:
            old = [FamilyResult(**r) for r in json.load(f)]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        for scope in args.scopes:
            for fam in families(scope):
                if args.families and fam not in args.families:
                    continue
                r = sweep_family(scope, fam, tool, work, sizes=args.sizes)
                results.append(r)
                print(f'{scope:10s} {fam:24s} {r.status:8s} '
                      f'{r.seconds:5.1f}s {r.config or ""} {r.reason}',
                      flush=True)
    seconds = time.perf_counter() - t0
    if args.update:  # the new results replace the old ones of the family
        new = {(r.scope, r.family): r for r in results}
        results = [new.pop((r.scope, r.family), r) for r in old]
        results += list(new.values())
        seconds = sum(r.seconds for r in results)
    threads = torch.get_num_threads()
    versions = ', '.join(
        f'{m} {importlib.import_module(m).__version__}'
        for m in ('mmdet', 'mmseg', 'mmpretrain'))
    header = (
        f'Written by `tools/swap_sweep.py` ({time.strftime("%Y-%m-%d")}; '
        f'{versions}, mmengine {mmengine.__version__}, torch '
        f'{torch.__version__}, mmsetformer {mmsetformer.__version__}, '
        f'{platform.machine()} CPU, {threads} thread'
        f'{"s" if threads > 1 else ""}). '
        'One representative config per model family (a folder of the '
        "library's shipped configs; ResNet-50 baselines first), swapped "
        'with `tools/swap_backbone.py` to a tiny SeTformer (widths 16-128, '
        'one block per stage, m = 16), built with the library\'s MODELS '
        'registry, then one training step (data preprocessor, loss, '
        'backward, optimizer step) and one prediction (the recipe\'s test '
        f'batch size) on synthetic {args.sizes[0]} x {args.sizes[0]} images '
        f'(again at {", ".join(map(str, args.sizes[1:]))} if that fails: '
        'some heads need more tokens or larger maps), with the library\'s '
        'data structures: boxes, masks and semantic / panoptic maps where '
        'the model reads them, three branches for semi-supervised '
        'detectors, 2-frame clips for trackers, several views for '
        'self-supervised methods. When the swapped config fails, the '
        'upstream config as shipped gets the same check; if it fails too, '
        'the failure is not the swap\'s: the next config of the family is '
        'tried (two at most), or the family is listed as not run. Around '
        'the model the sweep does what the Runner would (SyncBN -> BN when '
        'not distributed, epoch info) and only turns off what resizes the '
        'batch to the recipe\'s size (batch augments, mmseg\'s fixed pad '
        'size), AMP (needs a GPU) and checkpoint downloads of distillation '
        'teachers, and caps RoI samplers at 32 RoIs per image (CPU time). '
        'Re-run a few families with `--families ... --update`.')
    text = report_markdown(results, seconds, header)
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        f.write(text)
    for r in results:  # keep the file small: tracebacks of failures only
        if r.details.get('traceback'):
            if r.status == 'fails':
                r.details['traceback'] = r.details['traceback'][-1500:]
            else:
                del r.details['traceback']
    with open(args.json, 'w') as f:
        json.dump([r.__dict__ for r in results], f, indent=1, default=str)
    n = {k: sum(r.status == k for r in results)
         for k in ('works', 'fails', 'not run', 'excluded')}
    print(f'{n["works"]} of {n["works"] + n["fails"]} families work, '
          f'{n["not run"]} not run, {n["excluded"]} excluded by design; '
          f'report: {args.out} ({seconds / 60:.1f} min)')
    return results


if __name__ == '__main__':
    main()
