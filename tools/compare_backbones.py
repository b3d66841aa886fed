"""Does SeT learn as well as windows? Backbone variants x seeds through the
demo recipes, at one budget, with mean +- std over seeds.

    python tools/compare_backbones.py --dry-run        # the plan and an ETA
    nohup python tools/compare_backbones.py > compare.log 2>&1 &   # all of it
    python tools/compare_backbones.py --tasks seg --variants setformer swin \
        --seeds 0 1 2 --iters 750
    python tools/compare_backbones.py --report-only    # tables from the state

Every (task, variant, seed) is a run of this repo's own ``tools/train.py``
then ``tools/test.py`` (subprocesses) on the embedded shapes dataset, with a
small generated delta config over the demo config
(``configs/mask_rcnn_setformer_nano_shapes_demo.py`` for ``det``,
``configs/upernet_setformer_nano_shapes_demo.py`` for ``seg``): only the
backbone, the seed and the budget change. Each run has its own folder
``<work-dir>/runs/<task>/<variant>/seed<k>/`` (config, logs, metrics).

Resume: ``<work-dir>/state.json`` records every finished run (metrics,
wall-clock, the CPU time of its processes, load average) and, once per
(task, variant), params and FLOPs. A second call skips what is recorded
and restarts a half-finished run from scratch (its folder is wiped), so the
matrix can be stopped (Ctrl-C, kill) and continued at any time; two calls
on one work dir are refused. After every run, and with ``--report-only``,
the report is regenerated from the state file alone: ``<out>/accuracy.md``,
``accuracy.json`` and ``accuracy.png``. ``accuracy.json`` holds every
finished run, so a work dir without a state file (a fresh clone) starts
from it: the matrix accumulates over sittings and machines through the
committed report.

Budget: the same for every variant, ``--epochs`` (det) and ``--iters``
(seg); the demo's schedules (warm-up, lr steps, poly decay) are scaled to
it. Validation during training is skipped (the final test is what counts).
"""
import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import os
import os.path as osp
import platform
import pprint
import resource
import shutil
import signal
import subprocess
import sys
import time
import warnings
from typing import Dict, List, Optional

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)
STATE_VERSION = 1

# -- what is compared -------------------------------------------------------
# Every variant has the nano's output widths, so the necks and heads of the
# demo configs are unchanged. SeTformer variants merge into the demo's
# backbone (SeTformer-nano: widths 32-256, depths 1-1-2-1, heads 1-2-4-8,
# MLP ratio 2, m = 64, eps = 0.3, sigma = 0.8, T = 3); peers replace it.
WIDTHS = [32, 64, 128, 256]
DEPTHS = (1, 1, 2, 1)
REFERENCE = 'setformer'
VARIANTS: Dict[str, dict] = {
    'setformer': dict(
        label='SeTformer-nano, T = 3 (paper)',
        backbone=dict()),
    'setformer_t0': dict(
        label='SeTformer-nano, T = 0 (agent attention)',
        backbone=dict(num_iters=0)),
    'setformer_nolpe': dict(
        label='SeTformer-nano, LPE off',
        backbone=dict(use_lpe=False)),
    'setformer_m16': dict(
        label='SeTformer-nano, m = 16',
        backbone=dict(num_refs=16)),
    # mmdet's SwinTransformer in the det config, mmseg's in the seg config
    # (same arguments): the nano's widths, depths, heads and MLP ratio.
    'swin': dict(
        label='Swin (window 7)',
        backbone=dict(
            _delete_=True, type='SwinTransformer', embed_dims=WIDTHS[0],
            depths=DEPTHS, num_heads=(1, 2, 4, 8), window_size=7,
            mlp_ratio=2, drop_path_rate=0., out_indices=(0, 1, 2, 3))),
    'convnext': dict(
        label='ConvNeXt (mmpretrain)',
        imports=['mmpretrain.models'],
        backbone=dict(
            _delete_=True, type='mmpretrain.ConvNeXt',
            arch=dict(depths=list(DEPTHS), channels=WIDTHS),
            out_indices=(0, 1, 2, 3), gap_before_final_norm=False,
            drop_path_rate=0.)),
}

# Headline metrics (plotted, compared) first; all of them are tabulated.
TASKS = {
    'det': dict(
        config='configs/mask_rcnn_setformer_nano_shapes_demo.py',
        unit='epochs', default_budget=24, demo_budget=24,
        metrics=[('coco/bbox_mAP', 'bbox AP'), ('coco/segm_mAP', 'segm AP'),
                 ('coco/bbox_mAP_50', 'bbox AP50'),
                 ('coco/segm_mAP_50', 'segm AP50')],
        headline=2, digits=3),
    'seg': dict(
        config='configs/upernet_setformer_nano_shapes_demo.py',
        unit='iters', default_budget=1500, demo_budget=1500,
        metrics=[('mIoU', 'mIoU (%)'), ('mAcc', 'mAcc (%)'),
                 ('aAcc', 'aAcc (%)')],
        headline=1, digits=2),
}
# Seconds per budget unit (det: an epoch of 200 images; seg: an iteration
# of 8 crops) and the fixed cost of a run (two process start-ups, the
# test), on this project's 2-core machine with the machine to itself and 2
# threads: calibrated on the demo's measured times (README) for SeTformer;
# the variants' per-iteration times were within the noise of the shared
# machine of each other, so one rate serves all. Used for --dry-run and the
# ETA until runs of this work dir give their own figures.
ESTIMATE = dict(det=dict(per_unit=23.0, fixed=30.0),
                seg=dict(per_unit=0.18, fixed=30.0))
COMPLEXITY_INPUT = (128, 160)  # the demos' test size (H, W)


# -- small helpers ------------------------------------------------------------
def _log(msg: str, logfile: Optional[str] = None) -> None:
    line = f'[{datetime.datetime.now():%H:%M:%S}] {msg}'
    print(line, flush=True)
    if logfile:
        with open(logfile, 'a') as f:
            f.write(line + '\n')


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f'{h}:{rest // 60:02d}:{rest % 60:02d}' if h else \
        f'{rest // 60}:{rest % 60:02d}'


def _load_demo():
    """tools/demo.py as a module: its dataset maker and data arguments."""
    spec = importlib.util.spec_from_file_location(
        '_mmsetformer_demo', osp.join(ROOT, 'tools', 'demo.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_key(task: str, variant: str, seed: int) -> str:
    return f'{task}/{variant}/seed{seed}'


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'],
                             cwd=ROOT, capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open('/proc/cpuinfo') as f:
        for line in f:
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    return f'{cpu}, {os.cpu_count()} cores'


# -- the state file -----------------------------------------------------------
def new_state() -> dict:
    return dict(version=STATE_VERSION, runs={}, complexity={}, budgets={},
                data={})


def load_state(path: str) -> dict:
    if not osp.isfile(path):
        return new_state()
    with open(path) as f:
        state = json.load(f)
    if state.get('version') != STATE_VERSION:
        raise SystemExit(f'{path}: state version {state.get("version")}, '
                         f'this tool writes {STATE_VERSION}')
    for k, v in new_state().items():
        state.setdefault(k, v)
    return state


def save_state(state: dict, path: str) -> None:
    """Atomic: a kill mid-write leaves the previous state."""
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(state, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def check_settings(state: dict, tasks, budgets: dict, data_sig: str) -> None:
    """A work dir holds one budget per task and one dataset: mixing runs of
    different budgets or data in one mean would be wrong."""
    for task in tasks:
        done = state['budgets'].get(task)
        if done is not None and done != budgets[task]:
            unit = TASKS[task]['unit']
            raise SystemExit(
                f'{task}: this work dir holds runs at {done} {unit}, this '
                f'call asks for {budgets[task]} {unit}; use another '
                '--work-dir (or the recorded budget)')
        dsig = state['data'].get(task)
        if dsig is not None and dsig != data_sig:
            raise SystemExit(
                f'{task}: this work dir holds runs on another dataset '
                f'({dsig}); use another --work-dir')


# -- configs ------------------------------------------------------------------
def _det_schedule(epochs: int) -> List[dict]:
    """The demo's: 100 warm-up iterations, lr x0.1 at 18 and 22 of 24
    epochs; scaled to ``epochs`` (identical at 24)."""
    steps = sorted({max(1, round(epochs * s / 24)) for s in (18, 22)})
    return [
        dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0,
             end=max(1, round(100 * epochs / 24))),
        dict(type='MultiStepLR', by_epoch=True, begin=0, end=epochs,
             milestones=steps, gamma=0.1)]


def _seg_schedule(iters: int) -> List[dict]:
    """The demo's: 100 linear warm-up iterations then poly decay over 1500;
    scaled to ``iters`` (identical at 1500)."""
    warm = round(100 * iters / 1500)
    poly = dict(type='PolyLR', eta_min=0.0, power=1.0, begin=warm,
                end=iters, by_epoch=False)
    if warm < 1:
        return [poly]
    return [dict(type='LinearLR', start_factor=0.01, by_epoch=False,
                 begin=0, end=warm), poly]


def make_config(task: str, variant: str, seed: int, budget: int,
                data_root: str) -> str:
    """Text of the delta config of one run over the demo config."""
    spec = VARIANTS[variant]
    data_root = data_root.rstrip('/') + '/'
    base = osp.join(ROOT, TASKS[task]['config'])
    imports = ['mmsetformer'] + spec.get('imports', [])
    model = dict(backbone=spec['backbone'])
    lines = [
        f'# compare_backbones: {task} / {variant} ({spec["label"]}) / seed '
        f'{seed} / {budget} {TASKS[task]["unit"]}',
        f'_base_ = [{base!r}]',
        f'custom_imports = dict(imports={imports!r}, '
        'allow_failed_imports=False)',
        f'data_root = {data_root!r}']
    ckpt_hook = dict(interval=budget, max_keep_ckpts=1)
    if task == 'det':
        model['neck'] = dict(in_channels=WIDTHS)
        ann = data_root + 'annotations/instances_validation.json'
        lines += [
            f'model = {pprint.pformat(model, sort_dicts=False)}',
            'train_dataloader = dict(dataset=dict(data_root=data_root))',
            'val_dataloader = dict(dataset=dict(data_root=data_root))',
            'test_dataloader = val_dataloader',
            f'val_evaluator = dict(ann_file={ann!r})',
            'test_evaluator = val_evaluator',
            f'train_cfg = dict(max_epochs={budget}, val_interval={budget})',
            f'param_scheduler = {pprint.pformat(_det_schedule(budget))}']
    else:
        model['decode_head'] = dict(in_channels=WIDTHS)
        model['auxiliary_head'] = dict(in_channels=WIDTHS[2])
        lines += [
            f'model = {pprint.pformat(model, sort_dicts=False)}',
            'train_dataloader = dict(dataset=dict(data_root=data_root))',
            'val_dataloader = dict(dataset=dict(data_root=data_root))',
            'test_dataloader = val_dataloader',
            f'train_cfg = dict(max_iters={budget}, val_interval={budget})',
            f'param_scheduler = {pprint.pformat(_seg_schedule(budget))}']
    lines += [
        f'default_hooks = dict(checkpoint={ckpt_hook!r})',
        # the recipe's no-decay keys, shared by all variants: SeT
        # references and Swin's position tables, like norms and biases
        'optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'
        "'.refs': dict(decay_mult=0.), "
        "'relative_position_bias_table': dict(decay_mult=0.), "
        "'absolute_pos_embed': dict(decay_mult=0.)}))",
        f'randomness = dict(seed={seed}, deterministic=True)', '']
    return '\n'.join(lines)


# -- params and FLOPs ---------------------------------------------------------
def measure_complexity(config_path: str) -> dict:
    """Backbone and whole-model params, backbone FLOPs at the demos' test
    size (mmsetformer.analysis: multiply-adds, SeT's products included)."""
    import torch

    from mmsetformer.analysis import complexity
    from mmsetformer.apis import build_model, load_config
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # upstream deprecation notes
        cfg = load_config(config_path)
        model = build_model(cfg)
    x = torch.randn(1, 3, *COMPLEXITY_INPUT)
    bb = complexity(model.backbone, (x, ))
    return dict(backbone_params=bb['params'], backbone_flops=bb['flops'],
                model_params=sum(p.numel() for p in model.parameters()),
                input=list(COMPLEXITY_INPUT))


# -- running ------------------------------------------------------------------
class _Stop(Exception):
    pass


def _on_term(signum, frame):
    raise _Stop(f'signal {signum}')


def _subprocess(cmd: List[str], log_path: str, env: dict) -> int:
    """Run ``cmd`` with its output in ``log_path``; a stop of this tool
    stops it too (no orphaned trainings)."""
    with open(log_path, 'w') as log:
        log.write('$ ' + ' '.join(cmd) + '\n')
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, env=env)
        try:
            return proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise


def _children_cpu() -> float:
    """User + system CPU seconds of this process's finished children."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _tail(path: str, n: int = 20) -> str:
    with contextlib.suppress(OSError), open(path) as f:
        return ''.join(f.readlines()[-n:])
    return ''


def execute_run(task: str, variant: str, seed: int, budget: int,
                data_root: str, run_dir: str, threads: Optional[int],
                keep_checkpoints: bool) -> dict:
    """Train then test one run in a fresh ``run_dir``; its record."""
    if osp.isdir(run_dir):
        shutil.rmtree(run_dir)  # half-finished before: start clean
    os.makedirs(run_dir)
    cfg_path = osp.join(run_dir, 'config.py')
    with open(cfg_path, 'w') as f:
        f.write(make_config(task, variant, seed, budget, data_root))
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        [ROOT] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep)
                  if p])
    if threads:
        env['OMP_NUM_THREADS'] = str(threads)
    record = dict(task=task, variant=variant, seed=seed, budget=budget,
                  run_dir=osp.relpath(run_dir, ROOT) if run_dir.startswith(
                      ROOT) else run_dir,
                  threads=threads or int(env.get('OMP_NUM_THREADS', 0)) or
                  os.cpu_count(), load_start=round(os.getloadavg()[0], 2),
                  started=datetime.datetime.now().isoformat(
                      timespec='seconds'))
    # the runner's own folder: it dumps the full config there, so the delta
    # config above stays as written
    work = osp.join(run_dir, 'work')
    t0, cpu0 = time.time(), _children_cpu()
    rc = _subprocess([sys.executable, 'tools/train.py', cfg_path,
                      '--work-dir', work, '--no-validate'],
                     osp.join(run_dir, 'train.log'), env)
    record['train_s'] = round(time.time() - t0, 1)
    if rc != 0:
        return dict(record, status='failed', error=f'train exited {rc}',
                    log_tail=_tail(osp.join(run_dir, 'train.log')))
    with open(osp.join(work, 'last_checkpoint')) as f:
        ckpt = f.read().strip()
    metrics_file = osp.join(run_dir, 'metrics.json')
    t1 = time.time()
    rc = _subprocess([sys.executable, 'tools/test.py', cfg_path, ckpt,
                      '--work-dir', work, '--metrics-json',
                      metrics_file], osp.join(run_dir, 'test.log'), env)
    record['test_s'] = round(time.time() - t1, 1)
    record['wall_s'] = round(time.time() - t0, 1)
    # unlike the wall-clock, no pauses and no waiting for a core count
    # (but threads spinning on oversubscribed cores do)
    record['cpu_s'] = round(_children_cpu() - cpu0, 1)
    record['load_end'] = round(os.getloadavg()[0], 2)
    if rc != 0 or not osp.isfile(metrics_file):
        return dict(record, status='failed', error=f'test exited {rc}',
                    log_tail=_tail(osp.join(run_dir, 'test.log')))
    with open(metrics_file) as f:
        metrics = json.load(f)
    record['metrics'] = {k: float(v) for k, v in metrics.items()
                         if isinstance(v, (int, float))}
    record['status'] = 'done'
    record['finished'] = datetime.datetime.now().isoformat(
        timespec='seconds')
    if not keep_checkpoints:
        for name in os.listdir(work):
            if name.endswith('.pth'):
                os.remove(osp.join(work, name))
    return record


def estimate_run(state: dict, task: str, variant: str, budget: int) -> float:
    """Seconds for one run: the mean of this work dir's finished runs of the
    same task and variant at this budget, else of the same task, else the
    built-in rates."""
    done = [r for r in state['runs'].values()
            if r.get('status') == 'done' and r['task'] == task and
            r['budget'] == budget]
    for walls in ([r['wall_s'] for r in done if r['variant'] == variant],
                  [r['wall_s'] for r in done]):
        if walls:
            return sum(walls) / len(walls)
    est = ESTIMATE[task]
    return est['fixed'] + est['per_unit'] * budget


def _pending(state: dict, plan) -> int:
    return sum(state['runs'].get(run_key(*r), {}).get('status') != 'done'
               for r in plan)


def plan_runs(tasks, variants, seeds) -> List[tuple]:
    """Seed-major: after each pass over the seeds every variant has the
    same number of runs, so a half-finished matrix is already balanced."""
    return [(t, v, s) for s in seeds for t in tasks for v in variants]


# -- aggregation and report ---------------------------------------------------
def mean_std(values: List[float]) -> dict:
    n = len(values)
    mean = sum(values) / n if n else float('nan')
    std = math.sqrt(sum((v - mean)**2 for v in values) /
                    (n - 1)) if n > 1 else float('nan')
    return dict(mean=mean, std=std, n=n)


def _t_quantile(df: float, q: float = 0.975) -> float:
    try:
        from scipy.stats import t
        return float(t.ppf(q, df))
    except ImportError:  # normal approximation
        return 1.959964


def welch_ci(a: List[float], b: List[float]) -> Optional[tuple]:
    """Mean of a - b and the half-width of its 95 % Welch interval."""
    if len(a) < 2 or len(b) < 2:
        return None
    sa, sb = mean_std(a), mean_std(b)
    va, vb = sa['std']**2 / len(a), sb['std']**2 / len(b)
    diff = sa['mean'] - sb['mean']
    if va + vb == 0:
        return diff, 0.0
    df = (va + vb)**2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return diff, _t_quantile(df) * math.sqrt(va + vb)


def aggregate(state: dict) -> dict:
    """Per task and variant: mean, std (n - 1) and n of every metric and of
    the wall-clock, over the finished seeds; params/FLOPs."""
    out = {}
    for rec in state['runs'].values():
        if rec.get('status') != 'done':
            continue
        task = out.setdefault(rec['task'], {})
        v = task.setdefault(rec['variant'], dict(seeds=[], values={},
                                                 wall_s=[], cpu_s=[]))
        v['seeds'].append(rec['seed'])
        v['wall_s'].append(rec['wall_s'])
        v['cpu_s'].append(rec.get('cpu_s'))
        for k, x in rec['metrics'].items():
            v['values'].setdefault(k, []).append(x)
    for task, variants in out.items():
        for name, v in variants.items():
            order = sorted(range(len(v['seeds'])), key=v['seeds'].__getitem__)
            v['seeds'] = [v['seeds'][i] for i in order]
            v['wall_s'] = [v['wall_s'][i] for i in order]
            v['cpu_s'] = [v['cpu_s'][i] for i in order]
            v['values'] = {k: [xs[i] for i in order]
                           for k, xs in v['values'].items()}
            v['metrics'] = {k: mean_std(xs) for k, xs in v['values'].items()}
            v['wall'] = mean_std(v['wall_s'])
            v['cpu'] = mean_std([x for x in v['cpu_s'] if x is not None])
            v['complexity'] = state['complexity'].get(f'{task}/{name}')
    return out


def _variant_order(names):
    known = [v for v in VARIANTS if v in names]
    return known + sorted(set(names) - set(known))


def _fmt(stat: dict, scale: float = 1., digits: int = 3) -> str:
    if not stat or stat['n'] == 0:
        return 'n/a'
    m = stat['mean'] * scale
    if stat['n'] < 2:
        return f'{m:.{digits}f}'
    return f'{m:.{digits}f} ± {stat["std"] * scale:.{digits}f}'


def _minutes(stat: dict) -> str:
    if not stat['n']:
        return 'n/a'
    return f'{stat["mean"] / 60:.1f} min' + (
        f' ± {stat["std"] / 60:.1f}' if stat['n'] > 1 else '')


def markdown(state: dict, agg: dict, pending: int = 0) -> str:
    out = ['# Accuracy at equal budget', '',
           'Generated by `tools/compare_backbones.py` from its state file; '
           'mean ± standard deviation (n − 1) over seeds, n = number of '
           'finished seeds.', '']
    for task in [t for t in TASKS if t in agg]:
        spec = TASKS[task]
        variants = agg[task]
        budget = state['budgets'].get(task)
        out += [f'## {task}: {osp.basename(spec["config"])}', '',
                f'Budget: {budget} {spec["unit"]} for every variant (the '
                f'demo: {spec["demo_budget"]}); data: '
                f'{state["data"].get(task, "?")}.', '']
        metric_cols = [label for _, label in spec['metrics']]
        out.append('| variant | n | backbone params | backbone GFLOPs | ' +
                   ' | '.join(metric_cols) +
                   ' | wall-clock / run | CPU time / run |')
        out.append('| --- ' * (6 + len(metric_cols)) + '|')
        for name in _variant_order(variants):
            v = variants[name]
            cx = v['complexity'] or {}
            params = f'{cx["backbone_params"] / 1e6:.2f} M' if cx else 'n/a'
            flops = f'{cx["backbone_flops"] / 1e9:.3f}' if cx else 'n/a'
            label = VARIANTS.get(name, {}).get('label', name)
            cells = [_fmt(v['metrics'].get(k), digits=spec['digits'])
                     for k, _ in spec['metrics']]
            out.append(f'| {label} (`{name}`) | {v["wall"]["n"]} | {params} '
                       f'| {flops} | ' + ' | '.join(cells) +
                       f' | {_minutes(v["wall"])} | {_minutes(v["cpu"])} |')
        out.append('')
        ref = variants.get(REFERENCE)
        heads = spec['metrics'][:spec['headline']]
        if ref is not None and len(variants) > 1:
            out += [f'Difference to {VARIANTS[REFERENCE]["label"]}: mean of '
                    'the variant − mean of the reference, ± the half-width '
                    "of a 95 % Welch interval (an interval that contains 0 "
                    'means these seeds cannot tell the two apart).', '',
                    '| variant | ' + ' | '.join(f'Δ {lb}' for _, lb in heads)
                    + ' |', '| --- ' * (1 + len(heads)) + '|']
            for name in _variant_order(variants):
                if name == REFERENCE:
                    continue
                cells = []
                for key, _ in heads:
                    ci = welch_ci(variants[name]['values'].get(key, []),
                                  ref['values'].get(key, []))
                    d = spec['digits']
                    cells.append('n/a (n < 2)' if ci is None else
                                 f'{ci[0]:+.{d}f} ± {ci[1]:.{d}f}')
                label = VARIANTS.get(name, {}).get('label', name)
                out.append(f'| {label} | ' + ' | '.join(cells) + ' |')
            out.append('')
    if pending:
        out += [f'**Not finished: {pending} run(s) of the requested matrix '
                'are missing from these figures.**', '']
    machines = sorted({r.get('machine', '?') for r in state['runs'].values()
                       if r.get('status') == 'done'})
    loads = [r.get('load_start') for r in state['runs'].values()
             if r.get('status') == 'done' and r.get('load_start') is not None]
    out += ['Machine: ' + '; '.join(machines) + (
        f'; load average at run start {min(loads):.1f}–{max(loads):.1f}'
        if loads else '') + '. Wall-clock is train + test per run and '
            'depends on the load of the machine; CPU time (user + system '
            'of the run\'s processes) leaves out pauses and waiting for a '
            'core, but grows too while other jobs oversubscribe the cores '
            '(OpenMP threads spin): compare runs that had the machine to '
            'themselves.', '',
            'What this does and does not say: small models (≈ 1 M backbone '
            'parameters) trained from scratch on a small synthetic dataset '
            'on a CPU budget, one recipe for all. It compares '
            'the variants with each other under exactly these conditions; '
            'it is not evidence about COCO / ADE20K scale, pre-training, '
            'or tuned recipes per backbone.', '']
    return '\n'.join(out)


def plot(state: dict, agg: dict, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    panels = [(task, key, label) for task in TASKS if task in agg
              for key, label in TASKS[task]['metrics'][:TASKS[task]
                                                       ['headline']]]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels),
                                                      4.2), dpi=110,
                             squeeze=False)
    for ax, (task, key, label) in zip(axes[0], panels):
        names = _variant_order(agg[task])
        for i, name in enumerate(names):
            xs = agg[task][name]['values'].get(key, [])
            if not xs:
                continue
            jitter = [i + 0.08 * (j - (len(xs) - 1) / 2)
                      for j in range(len(xs))]
            ax.scatter(jitter, xs, s=14, color='C7', zorder=3)
            st = mean_std(xs)
            ax.errorbar(i, st['mean'], yerr=0 if st['n'] < 2 else st['std'],
                        fmt='o', color=f'C{i % 10}', capsize=5, ms=7,
                        zorder=2)
        ref = agg[task].get(REFERENCE, {}).get('values', {}).get(key)
        if ref:
            ax.axhline(mean_std(ref)['mean'], ls='--', lw=0.8, color='C0',
                       zorder=1)
        ticks = [f'{n} (n={len(agg[task][n]["values"].get(key, []))})'
                 for n in names]
        ax.set_xticks(range(len(names)), ticks, rotation=35, ha='right',
                      fontsize=8)
        ax.set_title(f'{task}: {label}', fontsize=9)
        ax.grid(alpha=0.3, axis='y')
    fig.suptitle('Backbones at equal budget on the shapes dataset (dots: '
                 'seeds; markers: mean ± std; dashed: SeTformer T = 3)',
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# What accuracy.json keeps of a run: enough to continue the matrix from it.
RUN_FIELDS = ('status', 'task', 'variant', 'seed', 'budget', 'metrics',
              'train_s', 'test_s', 'wall_s', 'cpu_s', 'load_start',
              'load_end', 'threads', 'machine', 'commit', 'started',
              'finished')


def state_from_report(path: str) -> Optional[dict]:
    """The finished runs of a report's ``accuracy.json`` as a state, or
    None where there is no report with runs."""
    if not osp.isfile(path):
        return None
    with open(path) as f:
        report = json.load(f)
    runs = {k: r for k, r in report.get('runs', {}).items()
            if r.get('status') == 'done' and r.get('task')}
    if not runs:
        return None
    return dict(new_state(), runs=runs,
                complexity=report.get('complexity', {}),
                budgets=report.get('budgets', {}),
                data=report.get('data', {}))


def write_report(state: dict, out_dir: str, pending: int = 0) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    agg = aggregate(state)
    with open(osp.join(out_dir, 'accuracy.md'), 'w') as f:
        f.write(markdown(state, agg, pending))
    summary = dict(
        generated=datetime.datetime.now().isoformat(timespec='seconds'),
        budgets=state['budgets'], data=state['data'],
        reference=REFERENCE, pending=pending,
        labels={k: v['label'] for k, v in VARIANTS.items()},
        aggregate=agg, complexity=state['complexity'],
        runs={k: {f: r.get(f) for f in RUN_FIELDS}
              for k, r in sorted(state['runs'].items())})
    with open(osp.join(out_dir, 'accuracy.json'), 'w') as f:
        json.dump(summary, f, indent=1, sort_keys=True)
    plot(state, agg, osp.join(out_dir, 'accuracy.png'))
    return agg


# -- main ---------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split('\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='Variants: ' + '; '.join(f'{k}: {v["label"]}'
                                        for k, v in VARIANTS.items()))
    p.add_argument('--tasks', nargs='+', choices=list(TASKS),
                   default=list(TASKS))
    p.add_argument('--variants', nargs='+', choices=list(VARIANTS),
                   default=list(VARIANTS))
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    p.add_argument('--epochs', type=int,
                   default=TASKS['det']['default_budget'],
                   help='det budget in epochs (default %(default)s; the '
                   f'demo trains {TASKS["det"]["demo_budget"]})')
    p.add_argument('--iters', type=int,
                   default=TASKS['seg']['default_budget'],
                   help='seg budget in iterations (default %(default)s; '
                   f'the demo trains {TASKS["seg"]["demo_budget"]})')
    p.add_argument('--work-dir', default=osp.join(ROOT, 'work_dirs',
                                                  'compare_backbones'),
                   help='runs and state.json (default %(default)s)')
    p.add_argument('--out', default=osp.join(ROOT, 'results'),
                   help='where accuracy.md/.json/.png go (default '
                   '%(default)s)')
    p.add_argument('--data', help='dataset root (default data/shapes, the '
                   "demo's; <work-dir>/data with --quick-data)")
    p.add_argument('--quick-data', action='store_true',
                   help="the demo's --quick dataset (8 + 4 images), for "
                   'smoke tests')
    p.add_argument('--threads', type=int,
                   help='OMP_NUM_THREADS of the runs (default: inherited)')
    p.add_argument('--keep-checkpoints', action='store_true')
    p.add_argument('--dry-run', action='store_true',
                   help='print the plan and an ETA, run nothing')
    p.add_argument('--report-only', action='store_true',
                   help='regenerate the report from the state file alone')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    work_dir = osp.abspath(args.work_dir)
    state_path = osp.join(work_dir, 'state.json')
    out_dir = osp.abspath(args.out)
    lock = None
    if not (args.dry_run or args.report_only):
        # one matrix per work dir at a time; the state is read under the
        # lock, so it is the latest
        import fcntl
        os.makedirs(work_dir, exist_ok=True)
        lock = open(osp.join(work_dir, '.lock'), 'w')
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SystemExit(f'another compare_backbones is running on '
                             f'{work_dir}')
    try:
        return _main(args, work_dir, state_path, out_dir)
    finally:
        if lock is not None:
            lock.close()


def _main(args, work_dir: str, state_path: str, out_dir: str) -> int:
    state = load_state(state_path)
    if not osp.isfile(state_path):
        # a fresh clone has no work dir: continue from the report in --out
        # (a report alone may also be rebuilt from the committed one)
        reports = [osp.join(out_dir, 'accuracy.json')]
        if args.report_only:
            reports.append(osp.join(ROOT, 'results', 'accuracy.json'))
        for report_path in dict.fromkeys(reports):
            seeded = state_from_report(report_path)
            if seeded is not None:
                state = seeded
                print(f'{state_path} does not exist: starting from the '
                      f'{len(state["runs"])} finished run(s) in '
                      f'{report_path}')
                break
    if args.report_only:
        if not state['runs']:
            raise SystemExit(f'no runs recorded in {state_path}')
        write_report(state, out_dir)
        print(f'report written to {out_dir}/accuracy.{{md,json,png}}')
        return 0

    budgets = dict(det=args.epochs, seg=args.iters)
    demo = _load_demo()
    data_args = demo.QUICK_DATA_ARGS if args.quick_data else demo.DATA_ARGS
    data_root = osp.abspath(args.data or (
        osp.join(work_dir, 'data') if args.quick_data else
        osp.join(ROOT, 'data', 'shapes')))
    data_sig = (f'shapes {data_args["num_train"]} train / '
                f'{data_args["num_val"]} val, {data_args["size"][0]}x'
                f'{data_args["size"][1]}')
    check_settings(state, args.tasks, budgets, data_sig)
    plan = plan_runs(args.tasks, args.variants, args.seeds)
    todo = [r for r in plan
            if state['runs'].get(run_key(*r), {}).get('status') != 'done']
    eta = sum(estimate_run(state, t, v, budgets[t]) for t, v, _ in todo)
    logfile = None if args.dry_run else osp.join(work_dir, 'progress.log')
    _log(f'matrix: {len(args.tasks)} task(s) x {len(args.variants)} '
         f'variant(s) x {len(args.seeds)} seed(s) = {len(plan)} runs; '
         f'{len(plan) - len(todo)} recorded in {state_path}, {len(todo)} to '
         f'run; budget ' + ', '.join(f'{t} {budgets[t]} '
                                     f'{TASKS[t]["unit"]}'
                                     for t in args.tasks) +
         f'; ETA {_hms(eta)}', logfile)
    if args.dry_run:
        for t, v, s in plan:
            done = state['runs'].get(run_key(t, v, s), {})
            what = 'done' if done.get('status') == 'done' else \
                f'~{_hms(estimate_run(state, t, v, budgets[t]))}'
            print(f'  {run_key(t, v, s):32s} {what}')
        return 0

    old_term = signal.signal(signal.SIGTERM, _on_term)
    failed = []
    try:
        demo.make_data(data_root, data_args)
        commit = git_commit()
        for t in args.tasks:
            state['budgets'][t] = budgets[t]
            state['data'][t] = data_sig
        save_state(state, state_path)
        for i, (task, variant, seed) in enumerate(todo):
            key = run_key(task, variant, seed)
            run_dir = osp.join(work_dir, 'runs', task, variant, f'seed{seed}')
            _log(f'[{i + 1}/{len(todo)}] {key}: training '
                 f'({budgets[task]} {TASKS[task]["unit"]}, '
                 f'~{_hms(estimate_run(state, task, variant, budgets[task]))}'
                 f'), logs in {run_dir}', logfile)
            rec = execute_run(task, variant, seed, budgets[task], data_root,
                              run_dir, args.threads, args.keep_checkpoints)
            rec.update(machine=machine(), commit=commit)
            ckey = f'{task}/{variant}'
            if rec['status'] == 'done' and ckey not in state['complexity']:
                try:
                    state['complexity'][ckey] = measure_complexity(
                        osp.join(run_dir, 'config.py'))
                except Exception as e:  # the accuracy still counts
                    _log(f'params/FLOPs of {ckey} failed: {e!r}', logfile)
            state['runs'][key] = rec
            save_state(state, state_path)
            left = todo[i + 1:]
            eta = sum(estimate_run(state, t, v, budgets[t])
                      for t, v, _ in left)
            if rec['status'] == 'done':
                heads = TASKS[task]['metrics'][:TASKS[task]['headline']]
                shown = ', '.join(f'{lb} {rec["metrics"].get(k, math.nan):.3f}'
                                  for k, lb in heads)
                _log(f'[{i + 1}/{len(todo)}] {key}: done in '
                     f'{_hms(rec["wall_s"])} ({shown}); {len(left)} left, '
                     f'ETA {_hms(eta)}', logfile)
            else:
                failed.append(key)
                _log(f'[{i + 1}/{len(todo)}] {key}: FAILED '
                     f'({rec["error"]}), see {run_dir}; it is retried on '
                     f'the next call\n{rec.get("log_tail", "")}', logfile)
            write_report(state, out_dir, pending=_pending(state, plan))
    except (KeyboardInterrupt, _Stop) as e:
        _log(f'stopped ({e or "interrupt"}): finished runs are recorded; '
             'the same command continues the matrix', logfile)
        return 130
    finally:
        signal.signal(signal.SIGTERM, old_term)
    if state['runs']:
        write_report(state, out_dir, pending=_pending(state, plan))
    _log(f'report: {out_dir}/accuracy.md (.json, .png)' +
         (f'; {len(failed)} run(s) failed: {failed}' if failed else ''),
         logfile)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
