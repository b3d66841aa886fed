"""Builds the compiled SeT CPU kernel (mmsetformer/ops/csrc) with the
installed torch; everything else is pure Python (setup.cfg).

``pip install --no-build-isolation -e .`` builds it against the environment's
torch (``tools/install.sh`` does).  Without torch at build time, or with
``MMSETFORMER_WITH_CPU_EXT=0``, the package installs without it and SeT runs
its reference implementation on the CPU.
"""
import os
import platform
from setuptools import setup


def cpu_extension():
    if os.environ.get('MMSETFORMER_WITH_CPU_EXT', '1') == '0':
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return {}
    flags = ['-O3', '-fopenmp']
    if platform.machine().lower() in ('x86_64', 'amd64'):
        # ATen's 256-bit vectors; both CPU kinds here (and every x86 server
        # since 2013/2017) have AVX2 + FMA, checked again at run time.
        flags += ['-mavx2', '-mfma', '-mf16c', '-DCPU_CAPABILITY=AVX2',
                  '-DCPU_CAPABILITY_AVX2']
    ext = CppExtension(
        'mmsetformer.ops._set_cpu', ['mmsetformer/ops/csrc/set_cpu.cpp'],
        extra_compile_args=flags, extra_link_args=['-fopenmp'])
    return dict(ext_modules=[ext], cmdclass={'build_ext': BuildExtension})


setup(**cpu_extension())
