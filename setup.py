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
    src = ['mmsetformer/ops/csrc/set_cpu.cpp']

    def ext(name, isa_flags):
        return CppExtension(f'mmsetformer.ops.{name}', src,
                            extra_compile_args=flags + isa_flags,
                            extra_link_args=['-fopenmp'])

    if platform.machine().lower() not in ('x86_64', 'amd64'):
        exts = [ext('_set_cpu', [])]
    else:
        # The same source twice, as ATen builds its CPU kernels: ATen's
        # 256-bit vectors (AVX2 + FMA: every x86 server since 2013/2017)
        # and its 512-bit ones (AVX-512: Intel Xeon since Skylake, AMD
        # since Zen 4).  fused_cpu picks the widest the CPU runs, as
        # torch.backends.cpu.get_cpu_capability() reports it.
        exts = [
            ext('_set_cpu', ['-mavx2', '-mfma', '-mf16c',
                             '-DCPU_CAPABILITY=AVX2',
                             '-DCPU_CAPABILITY_AVX2']),
            ext('_set_cpu_avx512', ['-mavx512f', '-mavx512bw',
                                    '-mavx512vl', '-mavx512dq', '-mfma',
                                    '-DCPU_CAPABILITY=AVX512',
                                    '-DCPU_CAPABILITY_AVX512']),
        ]
    return dict(ext_modules=exts, cmdclass={'build_ext': BuildExtension})


setup(**cpu_extension())
