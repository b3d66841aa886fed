"""Work-arounds for upstream incompatibilities, applied at import."""
import importlib.util
import os.path as osp
import sys
from importlib.metadata import PackageNotFoundError, version


def _major(package: str) -> int:
    try:
        return int(version(package).split('.')[0])
    except (PackageNotFoundError, ValueError):
        return -1


def mmpretrain_without_broken_multimodal() -> bool:
    """mmpretrain 1.x imports its multimodal models (BLIP, Flamingo, ...)
    whenever transformers >= 4.28 is installed.  Their imports fail with
    transformers >= 5, and with them ``import mmpretrain`` -- and
    ``mmdet.models``, which imports mmpretrain.  There the multimodal models
    register as placeholders instead, as mmpretrain does without
    transformers.  Returns whether the work-around was applied."""
    if 'mmpretrain' in sys.modules or _major('transformers') < 5 \
            or _major('mmpretrain') != 1:
        return False
    spec = importlib.util.find_spec('mmpretrain')  # does not import it
    path = osp.join(osp.dirname(spec.origin), 'utils', 'dependency.py')
    if not osp.isfile(path):
        return False
    name = 'mmpretrain.utils.dependency'
    dep_spec = importlib.util.spec_from_file_location(name, path)
    dep = importlib.util.module_from_spec(dep_spec)
    dep_spec.loader.exec_module(dep)  # needs mmengine only
    dep.WITH_MULTIMODAL = False
    # the package import finds this module here and keeps it
    sys.modules[name] = dep
    return True
