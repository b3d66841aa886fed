"""End to end through the real CLI tools, the real Runner and the real
metrics, on tiny data written to disk in the real formats."""
import glob
import json
import math
import os
import os.path as osp
import re
import subprocess
import sys

import pytest
import torch
from shrink import ROOT, cls_config, det_config, seg_config

PY = sys.executable


def run(args, cwd, timeout=600, env=None):
    env = dict(os.environ, **(env or {}))
    env.setdefault('OMP_NUM_THREADS', '2')
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(
            f'{" ".join(map(str, args))} failed ({proc.returncode}):\n'
            f'{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}')
    return proc.stdout + proc.stderr


@pytest.fixture(scope='session')
def shapes(tmp_path_factory):
    from mmsetformer.data.shapes import generate
    root = str(tmp_path_factory.mktemp('shapes'))
    generate(root, num_train=8, num_val=4, size=(128, 160),
             num_cls_per_class=(6, 2), cls_size=56, seed=0,
             log=lambda *_: None)
    return root


def _write(path, text):
    with open(path, 'w') as f:
        f.write(text)
    return str(path)


def _train_test(tmp_path, cfg_text, ckpt_name, test_args=()):
    cfg = _write(tmp_path / 'cfg.py', cfg_text)
    work = str(tmp_path / 'work')
    log = run([PY, 'tools/train.py', cfg, '--work-dir', work], cwd=ROOT)
    ckpt = osp.join(work, ckpt_name)
    assert osp.isfile(ckpt), log[-2000:]
    metrics_file = str(tmp_path / 'metrics.json')
    run([PY, 'tools/test.py', cfg, ckpt, '--work-dir', work,
         '--metrics-json', metrics_file, *test_args], cwd=ROOT)
    with open(metrics_file) as f:
        return json.load(f), log, cfg, work


def _finite(metrics, keys):
    for k in keys:
        assert k in metrics, (k, metrics)
        assert math.isfinite(metrics[k]) and 0 <= metrics[k] <= 100, k


def test_mask_rcnn_train_then_coco_eval(shapes, tmp_path):
    metrics, log, _, _ = _train_test(tmp_path, det_config(shapes, 1),
                                     'epoch_1.pth')
    _finite(metrics, ['coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP',
                      'coco/segm_mAP_50'])
    assert 'loss_mask' in log and 'loss_rpn_cls' in log


def test_upernet_train_then_miou_single_and_multi_scale(shapes, tmp_path):
    metrics, _, cfg, work = _train_test(tmp_path, seg_config(shapes, 4, 4),
                                        'iter_4.pth')
    _finite(metrics, ['mIoU', 'aAcc', 'mAcc'])
    tta_file = str(tmp_path / 'tta.json')
    log = run([PY, 'tools/test.py', cfg, osp.join(work, 'iter_4.pth'),
               '--work-dir', work, '--tta', '--metrics-json', tta_file],
              cwd=ROOT)
    with open(tta_file) as f:
        _finite(json.load(f), ['mIoU', 'aAcc'])
    assert 'SegTTAModel' in log or 'TestTimeAug' in log


def test_classifier_train_then_top_k(shapes, tmp_path):
    metrics, _, _, _ = _train_test(tmp_path, cls_config(shapes, 1),
                                   'epoch_1.pth')
    _finite(metrics, ['accuracy/top1', 'accuracy/top3'])


def _iters_logged(log):
    return [int(m) for m in re.findall(r'Iter\(train\) \[\s*(\d+)/', log)]


def test_resume_continues_at_the_right_iteration(shapes, tmp_path):
    cfg = _write(tmp_path / 'cfg.py', seg_config(shapes, 4, 2))
    work = str(tmp_path / 'work')
    log = run([PY, 'tools/train.py', cfg, '--work-dir', work], cwd=ROOT)
    assert _iters_logged(log) == [1, 2, 3, 4]
    work2 = str(tmp_path / 'resumed')
    log2 = run([PY, 'tools/train.py', cfg, '--work-dir', work2, '--resume',
                osp.join(work, 'iter_2.pth')], cwd=ROOT)
    assert 'resumed epoch: 0, iter: 2' in log2
    assert _iters_logged(log2) == [3, 4]
    ckpt = torch.load(osp.join(work2, 'iter_4.pth'), map_location='cpu')
    assert ckpt['meta']['iter'] == 4
    # the optimizer state was restored, not re-initialised
    assert ckpt['optimizer']['state']


def test_dist_train_two_cpu_processes(shapes, tmp_path):
    cfg = _write(tmp_path / 'cfg.py', det_config(shapes, 1))
    work = str(tmp_path / 'work')
    log = run(['bash', 'tools/dist_train.sh', cfg, '2', '--work-dir', work],
              cwd=ROOT, env=dict(PORT='29517', OMP_NUM_THREADS='1'))
    assert 'backend set to gloo' in log
    assert osp.isfile(osp.join(work, 'epoch_1.pth'))
    # 8 images, 2 processes x 2 per batch: 2 iterations per epoch
    assert re.search(r'Epoch\(train\)\s+\[1\]\[2/2\]', log), log[-3000:]
    assert glob.glob(osp.join(work, '*', '*.log'))


_MALLINFO = """
import ctypes, sys, torch
sys.path.insert(0, 'tools')
import benchmark
how = benchmark.keep_freed_memory() if sys.argv[1] == 'keep' else 'system'
class MallInfo2(ctypes.Structure):
    _fields_ = [(k, ctypes.c_size_t) for k in (
        'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks',
        'fsmblks', 'uordblks', 'fordblks', 'keepcost')]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
act = torch.ones(6 << 20)  # a 24 MiB activation
mapped = libc.mallinfo2().hblkhd  # bytes in blocks mapped on their own
del act
kept = libc.mallinfo2().fordblks  # freed bytes malloc holds for reuse
print(how, '|', mapped >> 20, kept >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith('linux'),
                    reason='glibc malloc')
def test_benchmark_keeps_freed_memory():
    # the benchmark's allocator setting: a freed 24 MiB activation stays
    # in malloc's heap for the next one, instead of a mapping of its own
    # handed back to the system (whose pages the next one faults in again)
    out = {}
    for mode in ('system', 'keep'):
        how, mib = run([PY, '-c', _MALLINFO, mode],
                       cwd=ROOT).strip().splitlines()[-1].split(' | ')
        out[mode] = (how, *map(int, mib.split()))
    assert 'glibc malloc keeps freed blocks' in out['keep'][0]
    _, mapped, kept = out['system']
    assert mapped >= 24 and kept < 24, out
    _, mapped, kept = out['keep']
    assert mapped < 24 <= kept, out


def test_benchmark_swin_from_timm_matches_mmdet():
    # the GPU session's baseline before mmdet imports: the same Swin-T
    sys.path.insert(0, osp.join(ROOT, 'tools'))
    import benchmark
    assert benchmark.swin_source() == 'mmdet'  # mmdet imports here
    x = torch.randn(1, 3, 64, 96)
    nets = {src: benchmark.backbones(True, src)['Swin-T'](64, x.shape[-2:])
            for src in ('mmdet', 'timm')}
    params = {k: sum(p.numel() for p in n.parameters())
              for k, n in nets.items()}
    assert abs(params['timm'] / params['mmdet'] - 1) < 1e-3, params
    for n in nets.values():
        n.eval()  # (mmdet's Swin returns None from train())
    with torch.no_grad():
        shapes = {k: [tuple(o.shape) for o in n(x)] for k, n in nets.items()}
    # mmdet: NCHW, timm: NHWC; strides 4-32, widths 96-768
    assert [(s[0], s[2], s[3], s[1]) for s in shapes['mmdet']] == \
        shapes['timm'] == [(1, 64 // s, 96 // s, 96 * s // 4)
                           for s in (4, 8, 16, 32)]


def test_benchmark_rounds_fit_a_time_budget():
    """Interleaved timing: every candidate as often, fewer rounds where a
    round (judged from the last warm-up call) would exceed the budget."""
    sys.path.insert(0, osp.join(ROOT, 'tools'))
    import time

    import benchmark
    calls = []

    def make(name, s):
        return lambda: (calls.append(name), time.sleep(s))

    cands = {'slow': make('slow', 0.05), 'fast': make('fast', 0.)}
    cpu = torch.device('cpu')
    benchmark.Interleaved(cpu, 8, warmup=2, budget_s=0.16).run(cands)
    # 0.16 s / ~0.05 s a round: 3 rounds (fewer if sleeps overrun), not 8
    assert calls.count('slow') == calls.count('fast') in (2 + 2, 2 + 3)
    calls.clear()
    benchmark.Interleaved(cpu, 8, warmup=1).run(cands)
    assert calls.count('slow') == calls.count('fast') == 1 + 8


def test_benchmark_forces_each_set_variant():
    """The backbone part's SeTformer-T variants run the reference and, on
    CUDA, the Triton kernels (fp32, 3xTF32, streamed), inside their forward
    only."""
    sys.path.insert(0, osp.join(ROOT, 'tools'))
    import benchmark

    from mmsetformer.ops import get_backend
    assert {k for k in benchmark.backbones(False, cuda=True)
            if k.startswith('SeTformer-T (')} == {
        'SeTformer-T (reference SeT)', 'SeTformer-T (Triton SeT)',
        'SeTformer-T (Triton SeT, 3xTF32)',
        'SeTformer-T (Triton SeT, streamed)'}
    assert [k for k in benchmark.backbones(False)
            if k.startswith('SeTformer-T (')] == [
        'SeTformer-T (reference SeT)']
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append((get_backend(),
                         os.environ.get('MMSETFORMER_SET_PRECISION'),
                         fused_triton.STREAM_BYTES))
            return x

    from mmsetformer.ops import fused_triton
    before = (get_backend(), os.environ.get('MMSETFORMER_SET_PRECISION'),
              fused_triton.STREAM_BYTES)
    benchmark._SeTBackend(Probe(), 'triton', 'tf32x3')(torch.zeros(1))
    benchmark._SeTBackend(Probe(), 'reference')(torch.zeros(1))
    benchmark._SeTBackend(Probe(), 'triton', None, True)(torch.zeros(1))
    assert seen == [('triton', 'tf32x3', before[2]),
                    ('reference', before[1], before[2]),
                    ('triton', before[1], 0)]
    assert (get_backend(), os.environ.get('MMSETFORMER_SET_PRECISION'),
            fused_triton.STREAM_BYTES) == before


def test_benchmark_reports_what_a_gpu_run_measures():
    """On CUDA each backbone row carries the share of its step the GPU's
    kernels took (below 1 where the step waits for launches): a column
    then, none on the CPU; and what ``auto`` measured, a table."""
    sys.path.insert(0, osp.join(ROOT, 'tools'))
    import benchmark
    rows = [dict(setting='224x224, batch 64', mode='inference', model=k,
                 batch=64, time=t, peak_mem=2**20, params=1e6, flops=1e9,
                 busy=busy) for k, t, busy in (('SeTformer-T', 0.2, 0.4),
                                               ('Swin-T', 0.1, 0.97))]
    report = dict(machine='x', date='d', quick=False, backbone=rows)
    lines = benchmark.to_markdown(report).splitlines()
    table = [ln for ln in lines if ln.startswith('| 224x224')]
    assert [ln.split('|')[-2].strip() for ln in table] == ['40%', '97%']
    assert any(ln.endswith(' GPU busy |') for ln in lines)
    for r in rows:
        del r['busy']
    assert 'GPU busy' not in benchmark.to_markdown(report)
    report['set_choices'] = [dict(
        bits=21, d=28, num_iters=3, lpe=True, backward=True,
        precision='ieee', times=dict(reference=0.002, triton=0.0031),
        choice='reference')]
    assert '| 2^21 | 28 | 3 | on | yes | ieee | 2.00 | 3.10 | reference |' \
        in benchmark.to_markdown(report)


def test_benchmark_reports_partial_runs():
    """A GPU lease's report: a variant not run at the largest n and a mode
    not reached yet render as dashes and are left out of the scaling
    table (a KeyError here cost a lease its backbone part); the backbones'
    operator profiles render as a top-N table; ``--models`` picks single
    variants."""
    sys.path.insert(0, osp.join(ROOT, 'tools'))
    import benchmark
    rows = [dict(n=n, op=op, mode=mode, time=1e-3 * n, peak_mem=n * 2**10)
            for n in (1024, 4096) for mode in ('forward', 'forward+backward')
            for op in ('SeT', 'SeT (triton, tf32)', 'softmax (SDPA)')
            if not (n == 4096 and (op == 'SeT (triton, tf32)' or
                                   mode == 'forward+backward'))]
    ops = [dict(kernel=f'aten::op{i}', calls=1, ms=10. - i, share=.1)
           for i in range(10)]
    report = dict(machine='x', date='d', quick=False, operator=dict(
        m=64, heads=2, head_dim=32, eps=0.3, sigma=0.8, num_iters=3,
        rows=rows), backbone=[dict(
            setting='224x224, batch 64', mode='inference', model=k, batch=64,
            time=0.1, peak_mem=2**20, params=1e6, flops=1e9, busy=0.9,
            ops=ops) for k in ('SeTformer-T', 'Swin-T')])
    lines = benchmark.to_markdown(report).splitlines()
    big = [ln for ln in lines if ln.startswith('| 4096 |')]
    assert len(big) == 1 and big[0].split(' | ')[3] == '—', big
    assert big[0].split(' | ')[6] == '—' and '| — |' in big[0]
    assert any(ln.startswith('| SeT, forward |') for ln in lines)
    assert not any('forward+backward |' in ln and ln.startswith('| SeT')
                   for ln in lines)
    prof = [ln for ln in lines if ln.startswith('| inference | Swin-T |')]
    assert len(prof) == 9 and '(the rest)' in prof[-1] and \
        '| 2 | 3.00 |' in prof[-1]
    names = list(benchmark.backbones(False, 'timm', True))
    assert [k for k in names if benchmark._wanted(
        k, ['SeTformer-T', 'SeTformer-T (Triton SeT)'])] == [
            'SeTformer-T', 'SeTformer-T (Triton SeT)', 'Swin-T']
    assert len([k for k in names if benchmark._wanted(
        k, ['SeTformer-T'])]) == 6


def test_benchmark_quick_smoke(tmp_path):
    out = str(tmp_path / 'bench')
    run([PY, 'tools/benchmark.py', '--quick', '--out', out,
         '--plan-checkpoint', ''], cwd=ROOT)
    md = open(osp.join(out, 'benchmark.md')).read()
    for section in ('**Operator**', '**Backbones**', '**Whole models**',
                    '**Sinkhorn iterations**'):
        assert section in md
    report = json.load(open(osp.join(out, 'benchmark.json')))
    from mmsetformer.ops import fused_cpu
    assert {r['op'] for r in report['operator']['rows']} == {
        'SeT', 'SeT (reference)', 'softmax (SDPA)', 'window 7x7'} | (
            {'SeT (streamed)'} if fused_cpu.available() else set())
    assert 'glibc malloc keeps freed blocks' in md.splitlines()[0] or \
        not sys.platform.startswith('linux')
    assert 'machine' in report and (
        f'SeT CPU kernel {fused_cpu.ISA}' in report['machine']
        if fused_cpu.available() else 'no SeT CPU kernel' in
        report['machine'])
    assert all(r['time'] > 0 and r['peak_mem'] > 0
               for r in report['operator']['rows'])
    # every SeT candidate's error against the float64 reference, reported
    acc = report['operator']['accuracy']
    assert set(acc) == {'SeT', 'SeT (reference)'} | (
        {'SeT (streamed)'} if fused_cpu.available() else set())
    assert all(0 < e < 1e-4 for e in acc.values()), acc
    # where each SeT implementation's time goes, shares of the whole
    kern = report['operator']['kernels']['rows']
    for impl in ('SeT', 'SeT (reference)'):
        shares = [r['share'] for r in kern if r['impl'] == impl]
        assert len(shares) > 1 and abs(sum(shares) - 1) < 1e-6, kern
    assert "Where SeT's forward + backward spends its time" in md
    assert osp.getsize(osp.join(out, 'benchmark_scaling.png')) > 10000
