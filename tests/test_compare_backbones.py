"""tools/compare_backbones.py (issue: SeTformer against Swin and the paper's
ablations at equal budget, with seeds): the configs of every variant, the
matrix bookkeeping (resume, restart of a half-finished run, aggregation, the
report) on 1-iteration runs. The full matrix is not part of the suite."""
import importlib.util
import json
import math
import os
import os.path as osp

import pytest
from shrink import ROOT


def _load_tool():
    spec = importlib.util.spec_from_file_location(
        'compare_backbones', osp.join(ROOT, 'tools', 'compare_backbones.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cb = _load_tool()


def _record(task, variant, seed, metrics, wall=60., status='done'):
    return dict(task=task, variant=variant, seed=seed, budget=2,
                status=status, metrics=metrics, wall_s=wall, train_s=wall,
                test_s=0., load_start=1.0, machine='test machine')


def _hand_made_state():
    state = cb.new_state()
    state['budgets'] = dict(det=2)
    state['data'] = dict(det='shapes 8 train / 4 val, 128x160')
    runs = [
        ('setformer', 0, 0.6, 0.70, 50.), ('setformer', 1, 0.7, 0.75, 70.),
        ('setformer', 2, 0.8, 0.80, 60.),
        ('swin', 0, 0.5, 0.60, 40.), ('swin', 1, 0.6, 0.62, 40.)]
    for v, s, box, segm, wall in runs:
        state['runs'][cb.run_key('det', v, s)] = _record(
            'det', v, s, {'coco/bbox_mAP': box, 'coco/segm_mAP': segm,
                          'coco/bbox_mAP_50': 0.9, 'coco/segm_mAP_50': 0.9},
            wall)
    # a failed run counts for nothing
    state['runs'][cb.run_key('det', 'swin', 2)] = dict(
        _record('det', 'swin', 2, {}), status='failed')
    state['complexity']['det/setformer'] = dict(
        backbone_params=1163520, backbone_flops=92702720,
        model_params=2417442, input=[128, 160])
    return state


def test_aggregation_math_and_report(tmp_path):
    state = _hand_made_state()
    agg = cb.aggregate(state)
    ref = agg['det']['setformer']
    assert ref['seeds'] == [0, 1, 2]
    box = ref['metrics']['coco/bbox_mAP']
    assert box['n'] == 3 and math.isclose(box['mean'], 0.7)
    assert math.isclose(box['std'], 0.1)  # sample std (n - 1)
    assert math.isclose(ref['wall']['mean'], 60.)
    swin = agg['det']['swin']
    assert swin['seeds'] == [0, 1]  # the failed seed 2 is left out
    assert math.isclose(swin['metrics']['coco/bbox_mAP']['std'],
                        math.sqrt(0.005))
    # Welch: diff 0.55 - 0.7, se^2 = 0.005/2 + 0.01/3
    diff, half = cb.welch_ci([0.5, 0.6], [0.6, 0.7, 0.8])
    va, vb = 0.005 / 2, 0.01 / 3
    df = (va + vb)**2 / (va**2 / 1 + vb**2 / 2)
    from scipy.stats import t
    assert math.isclose(diff, -0.15)
    assert math.isclose(half, t.ppf(0.975, df) * math.sqrt(va + vb))
    assert cb.welch_ci([0.5], [0.6, 0.7]) is None

    out = tmp_path / 'results'
    cb.write_report(state, str(out), pending=1)
    md = (out / 'accuracy.md').read_text()
    assert ('| SeTformer-nano, T = 3 (paper) (`setformer`) | 3 | 1.16 M | '
            '0.093 | 0.700 ± 0.100 | 0.750 ± 0.050 | 0.900 ± 0.000 | '
            '0.900 ± 0.000 | 1.0 min ± 0.2 |') in md
    assert '| Swin (window 7) (`swin`) | 2 | n/a | n/a | 0.550 ± 0.071 |' \
        in md
    assert f'| Swin (window 7) | {diff:+.3f} ± {half:.3f} |' in md
    assert 'Budget: 2 epochs for every variant' in md
    assert 'Not finished: 1 run(s)' in md
    assert 'does not say' in md
    summary = json.loads((out / 'accuracy.json').read_text())
    assert summary['aggregate']['det']['setformer']['metrics'][
        'coco/bbox_mAP']['n'] == 3
    assert summary['runs']['det/swin/seed2']['status'] == 'failed'
    assert (out / 'accuracy.png').stat().st_size > 10000


def test_work_dir_holds_one_budget_and_one_dataset():
    state = _hand_made_state()
    data = state['data']['det']
    cb.check_settings(state, ['det', 'seg'], dict(det=2, seg=5), data)
    with pytest.raises(SystemExit, match='holds runs at 2 epochs'):
        cb.check_settings(state, ['det'], dict(det=3, seg=5), data)
    with pytest.raises(SystemExit, match='another dataset'):
        cb.check_settings(state, ['det'], dict(det=2, seg=5), 'other')


@pytest.mark.parametrize('task', ['det', 'seg'])
def test_every_variant_config_builds_with_the_nano_widths(tmp_path, task):
    import torch
    from mmengine.config import Config
    from mmengine.registry import DefaultScope, init_default_scope

    from mmsetformer.apis import build_model
    demo = Config.fromfile(osp.join(ROOT, cb.TASKS[task]['config']))
    budget = cb.TASKS[task]['demo_budget']
    types = {}
    # a merged SeTformer variant and the two replaced backbones (every
    # variant of both tasks is built and trained for one iteration by
    # `compare_backbones.py --epochs 1 --iters 1 --quick-data --seeds 0`,
    # outside the suite: config parsing costs ~2 s each here)
    for variant in ('setformer_m16', 'swin', 'convnext'):
        path = tmp_path / f'{variant}.py'
        path.write_text(cb.make_config(task, variant, 7, budget,
                                       str(tmp_path / 'data')))
        cfg = Config.fromfile(str(path))
        # only the backbone, the seed and the data paths differ; at the
        # demo's budget the schedule is the demo's
        assert cfg.param_scheduler == demo.param_scheduler
        assert cfg.optim_wrapper.optimizer == demo.optim_wrapper.optimizer
        assert cfg.train_dataloader.batch_size == \
            demo.train_dataloader.batch_size
        assert cfg.randomness == dict(seed=7, deterministic=True)
        assert cfg.train_dataloader.dataset.data_root == \
            str(tmp_path / 'data') + '/'
        if variant == 'setformer_m16':
            for k in ('arch', 'eps', 'sigma', 'out_indices'):
                assert cfg.model.backbone[k] == demo.model.backbone[k]
            assert cfg.model.backbone.num_refs == 16
        types[variant] = cfg.model.backbone.type
        scope = cfg.default_scope
        init_default_scope(scope)
        with DefaultScope.overwrite_default_scope(scope):
            model = build_model(cfg)
            outs = model.backbone(torch.randn(1, 3, 64, 96))
        assert [o.shape[1] for o in outs] == cb.WIDTHS, variant
        assert [o.shape[-1] for o in outs] == [24, 12, 6, 3], variant
    assert types['setformer_m16'] == 'SeTformer'
    assert types['swin'] == 'SwinTransformer'
    assert types['convnext'] == 'mmpretrain.ConvNeXt'


def test_scaled_schedules():
    det = cb._det_schedule(12)
    assert det[0]['end'] == 50 and det[1]['milestones'] == [9, 11]
    assert cb._det_schedule(1)[1]['milestones'] == [1]
    seg = cb._seg_schedule(750)
    assert seg[0]['end'] == 50 and seg[1]['begin'] == 50
    assert [s['type'] for s in cb._seg_schedule(1)] == ['PolyLR']


def test_dry_run_prints_plan_and_eta(tmp_path, capsys):
    assert cb.main(['--dry-run', '--work-dir', str(tmp_path / 'w'),
                    '--seeds', '0', '1']) == 0
    out = capsys.readouterr().out
    assert '2 task(s) x 6 variant(s) x 2 seed(s) = 24 runs' in out
    assert 'seg/convnext/seed1' in out and 'ETA' in out
    assert not osp.exists(tmp_path / 'w')  # nothing written


def test_one_iteration_matrix_resumes_and_reports(tmp_path, capsys):
    work, out = tmp_path / 'work', tmp_path / 'results'
    common = ['--tasks', 'seg', '--variants', 'setformer', '--iters', '1',
              '--quick-data', '--threads', '1', '--work-dir', str(work),
              '--out', str(out)]
    assert cb.main(common + ['--seeds', '0']) == 0
    state = json.loads((work / 'state.json').read_text())
    first = state['runs']['seg/setformer/seed0']
    assert first['status'] == 'done' and 'mIoU' in first['metrics']
    assert first['train_s'] > 0 and first['test_s'] > 0
    # the run's processes' CPU time: two processes of at least an import
    assert 1 < first['cpu_s'] < 2 * first['wall_s']
    assert state['complexity']['seg/setformer']['backbone_params'] > 1e6
    assert (work / 'runs/seg/setformer/seed0/config.py').read_text() \
        .startswith('# compare_backbones: seg / setformer')
    assert not list((work / 'runs/seg/setformer/seed0/work').glob('*.pth'))
    # seed 1 was started before and killed: its folder is half-written
    stale = work / 'runs/seg/setformer/seed1'
    os.makedirs(stale)
    (stale / 'left_over.txt').write_text('killed mid-run')
    capsys.readouterr()

    assert cb.main(common + ['--seeds', '0', '1']) == 0
    log = capsys.readouterr().out
    assert '1 recorded in' in log and '1 to run' in log
    assert 'seg/setformer/seed0: training' not in log
    state = json.loads((work / 'state.json').read_text())
    assert state['runs']['seg/setformer/seed0'] == first  # skipped
    assert state['runs']['seg/setformer/seed1']['status'] == 'done'
    assert not (stale / 'left_over.txt').exists()  # restarted clean
    md = (out / 'accuracy.md').read_text()
    row = [ln for ln in md.splitlines() if '(`setformer`)' in ln]
    assert len(row) == 1 and row[0].split(' | ')[1] == '2'
    assert 'Not finished' not in md

    # the report follows from the state file alone
    os.remove(out / 'accuracy.md')
    assert cb.main(['--report-only', '--work-dir', str(work), '--out',
                    str(out)]) == 0
    assert (out / 'accuracy.md').read_text() == md

    # a fresh clone has the committed report but no work dir: the matrix
    # continues from the report's runs instead of starting over
    capsys.readouterr()
    fresh = ['--work-dir', str(tmp_path / 'fresh')] + common[-2:]
    assert cb.main(common[:-4] + fresh + ['--seeds', '0', '1']) == 0
    log = capsys.readouterr().out
    assert 'starting from the 2 finished run(s)' in log
    assert '2 recorded in' in log and '0 to run' in log
    again = json.loads((tmp_path / 'fresh' / 'state.json').read_text())
    for key, rec in state['runs'].items():
        assert {k: again['runs'][key].get(k) for k in cb.RUN_FIELDS} == \
            {k: rec.get(k) for k in cb.RUN_FIELDS}
    assert again['complexity'] == state['complexity']
    assert (out / 'accuracy.md').read_text() == md


def test_report_only_elsewhere_rebuilds_the_committed_report(tmp_path):
    """On a clone without a work dir, ``--report-only --out ELSEWHERE``
    rebuilds the committed report there (no report in ELSEWHERE to
    continue from)."""
    committed = osp.join(cb.ROOT, 'results', 'accuracy.md')
    if not osp.isfile(committed):
        pytest.skip('no committed accuracy report')
    out = tmp_path / 'elsewhere'
    assert cb.main(['--report-only', '--work-dir', str(tmp_path / 'none'),
                    '--out', str(out)]) == 0
    with open(committed) as f:
        assert (out / 'accuracy.md').read_text() == f.read()
    assert not (tmp_path / 'none').exists()  # a report reads, never runs
