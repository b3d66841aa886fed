import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tests'))

# Without a GPU, Triton kernels run under Triton's interpreter (read when
# triton is first imported, so set before any test imports it).
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')

# Deterministic, and no oversubscription of the 2 CI cores.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def root():
    return ROOT


def pytest_sessionfinish(session, exitstatus):
    # A run that executed no test proves nothing: make it fail.
    reporter = session.config.pluginmanager.get_plugin('terminalreporter')
    passed = len(reporter.stats.get('passed', [])) if reporter else 0
    if exitstatus == 0 and passed == 0:
        session.exitstatus = 1
        if reporter:
            reporter.write_line('ERROR: no test passed (none ran?)', red=True)


@pytest.fixture(scope='session')
def trained(tmp_path_factory):
    """Shrunken detection, segmentation and classification recipes with a
    checkpoint each, saved as the Runner saves them (weights + dataset
    meta), and the shapes dataset they read: what a user has after
    training (tests of tools/infer.py and tools/export.py)."""
    from mmengine.config import Config
    from shrink import cls_config, det_config, seg_config

    from mmsetformer.apis import build_model
    from mmsetformer.data.shapes import CLASSES, SEG_CLASSES, generate
    root = tmp_path_factory.mktemp('trained')
    generate(str(root), num_train=2, num_val=4, size=(128, 160),
             num_cls_per_class=(3, 1), cls_size=56, seed=0,
             log=lambda *_: None)
    out = dict(root=root)
    for task, text, classes in [('det', det_config(str(root)), CLASSES),
                                ('seg', seg_config(str(root)), SEG_CLASSES),
                                ('cls', cls_config(str(root)), CLASSES)]:
        cfg_file = root / f'{task}.py'
        cfg_file.write_text(text)
        cfg = Config.fromfile(str(cfg_file))
        cfg.model.backbone.pop('init_cfg', None)
        torch.manual_seed(0)
        model = build_model(cfg)
        model.init_weights()
        ckpt = root / f'{task}.pth'
        torch.save({'state_dict': model.state_dict(),
                    'meta': {'dataset_meta': {'classes': list(classes)}}},
                   ckpt)
        out[task] = (str(cfg_file), str(ckpt))
    return out
