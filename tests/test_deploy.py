"""After training (issue: export): tools/export.py writes ONNX files and
torch.export programs with dynamic H x W that match PyTorch at another
size, and tools/train.py / tools/test.py --compile run torch.compile on the
CPU."""
import importlib.util
import json
import os
import os.path as osp
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from mmengine.config import Config
from shrink import ROOT

import mmsetformer  # noqa: F401  (registers)
from mmsetformer.deploy import (TraceableAdaptiveAvgPool2d, check_export,
                                make_traceable)

PY = sys.executable


def _tool(name):
    spec = importlib.util.spec_from_file_location(
        f'{name}_tool', osp.join(ROOT, 'tools', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_traceable_adaptive_pool_is_exact():
    for hw in [(7, 9), (13, 5), (1, 1), (6, 6), (31, 17)]:
        x = torch.randn(2, 3, *hw)
        for size in (1, 2, 3, 6, (2, 5)):
            ref = F.adaptive_avg_pool2d(x, size)
            assert torch.allclose(TraceableAdaptiveAvgPool2d(size)(x), ref,
                                  atol=1e-6)
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(3),
                              torch.nn.AdaptiveAvgPool2d(1))
    make_traceable(net)
    assert isinstance(net[0], TraceableAdaptiveAvgPool2d)
    assert isinstance(net[1], torch.nn.AdaptiveAvgPool2d)  # global: native


def _export(trained, task, fmt, tmp_path, *extra):
    cfg, ckpt = trained[task]
    out = str(tmp_path / f'{task}.{fmt}')
    code = _tool('export').main([cfg, ckpt, '--format', fmt, '--out', out,
                                 '--shape', '64', '96', *extra])
    return code, out


@pytest.mark.parametrize('task,fmt,outputs', [
    ('cls', 'onnx', ['logits']),
    ('seg', 'onnx', ['seg_logits']),
    ('det', 'onnx', ['stage0', 'stage1', 'stage2', 'stage3']),
    ('det', 'pt2', ['stage0', 'stage1', 'stage2', 'stage3']),
])
def test_export_matches_pytorch_at_another_size(trained, tmp_path, capsys,
                                                task, fmt, outputs):
    # torch.export programs require H, W >= 33 (1 x 1 maps at stride 32
    # are specialised away); tracing one Sinkhorn iteration instead of
    # three keeps torch.export's symbolic-shape work (~3/4 of the time) down
    extra = ['--check-shape', '32', '160']
    if fmt == 'pt2':
        extra = ['--check-shape', '80', '48', '--cfg-options',
                 'model.backbone.num_iters=1']
    code, out = _export(trained, task, fmt, tmp_path, *extra)
    log = capsys.readouterr().out
    assert code == 0, log
    meta = json.load(open(osp.splitext(out)[0] + '.json'))
    assert meta['outputs'] == outputs
    assert meta['what'] == ('backbone' if task == 'det' else 'model')
    # checked at the export size and a second one
    assert meta['check']['shapes'][0] == [64, 96]
    assert meta['check']['passed'] and meta['check']['max_abs_diff'] < 1e-4
    assert re.search(r'largest difference: \S+ \(within tolerance', log)
    assert ('80x48' if fmt == 'pt2' else '32x160') in log
    if fmt == 'onnx':
        import onnx
        graph = onnx.load(out).graph
        dims = graph.input[0].type.tensor_type.shape.dim
        assert [d.dim_value or d.dim_param for d in dims] == [
            1, 3, 'height', 'width']
        assert [o.name for o in graph.output] == outputs
    # the check would see a model that differs from the file
    if task == 'seg':
        from mmsetformer.apis import init_model
        from mmsetformer.deploy import build_export_module
        cfg, ckpt = trained[task]
        model = init_model(cfg, ckpt)
        module = build_export_module(model, 'mmseg', 'model')
        with torch.no_grad():
            model.decode_head.conv_seg.bias.add_(0.01)
        rows = check_export(module, 'onnx', out, [(48, 80)])
        assert min(r['max_abs_diff'] for r in rows) > 5e-3


def test_export_refuses_whole_detectors_and_flags_mismatch(trained, tmp_path,
                                                           capsys):
    code, _ = _export(trained, 'det', 'onnx', tmp_path, '--what', 'model')
    assert code == 2
    assert 'NMS and RoI ops' in capsys.readouterr().err
    # a tolerance no float export meets: reported, exit status 1
    code, _ = _export(trained, 'cls', 'onnx', tmp_path, '--tolerance', '-1')
    assert code == 1
    assert 'ABOVE tolerance' in capsys.readouterr().out


def _run(args, cwd=ROOT):
    proc = subprocess.run([PY, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS='2'))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_train_with_compile(trained, tmp_path):
    """--compile (mmengine's `compile` key) compiles the backbone; the
    test uses dynamo's eager backend: inductor's C++ build of even this
    tiny model takes minutes on 2 cores."""
    cfg, _ = trained['cls']
    work = str(tmp_path / 'work')
    log = _run(['tools/train.py', cfg, '--work-dir', work, '--compile',
                '--no-validate', '--cfg-options', 'compile.backend=eager',
                'train_dataloader.batch_size=9'])  # one step
    assert "SeTformer compiled with {'backend': 'eager'}" in log
    assert re.search(r'Epoch\(train\) \[1\]\[1/1\].* loss: [0-9.]+', log)
    assert osp.isfile(osp.join(work, 'epoch_1.pth'))


def test_compile_option_of_test_and_train_tools(trained):
    """tools/test.py and tools/train.py turn --compile and the config's
    `compile` key into the backbone-compiling hook, and keep mmengine from
    compiling the whole train step."""
    import argparse

    from mmsetformer.runner import (add_common_args, prepare_test_cfg,
                                    prepare_train_cfg)
    cfg_file, ckpt = trained['cls']
    parser = argparse.ArgumentParser()
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    for opt in ('--amp', '--auto-scale-lr', '--no-validate', '--tta'):
        parser.add_argument(opt, action='store_true')
    for opt in ('--resume', '--out', '--show-dir'):
        parser.add_argument(opt)
    add_common_args(parser)
    for argv, want in [([], None),
                       (['--compile'], {}),
                       (['--cfg-options', 'compile.mode=max-autotune'],
                        {'mode': 'max-autotune'})]:
        args = parser.parse_args([cfg_file, ckpt, '--skip-data-check',
                                  *argv])
        for prepare in (prepare_test_cfg, prepare_train_cfg):
            cfg = prepare(Config.fromfile(cfg_file), args)
            hooks = [h for h in cfg.get('custom_hooks', [])
                     if h['type'] == 'CompileBackboneHook']
            assert 'compile' not in cfg
            assert [h['compile_cfg'] for h in hooks] == (
                [] if want is None else [want])
