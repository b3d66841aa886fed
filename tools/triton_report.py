"""SeT's Triton kernels compiled ahead of time for GPUs this machine need not
have: per kernel launch of one forward + backward, the shared memory, the
registers, the bytes spilled to local memory and the instruction mix of the
machine code (fp32 FMAs against tensor-core MMAs, exps, local loads and
stores), from Triton's bundled ptxas and cuobjdump.

    python tools/triton_report.py                  # SeTformer's head: d = 32
    python tools/triton_report.py --d 40 --cc 86 90 --precision ieee tf32x3
    python tools/triton_report.py --tf32-error     # TF32's error, emulated

Spills and a shared-memory overflow are found here, on any machine, instead
of as a slow or failing launch on the one GPU that has them.  Instruction
counts are static (in the code, not executed: a loop body counts once).
"""
import argparse
import json
import os
import re
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The most shared memory one block may use (CUDA's opt-in maximum): sm_86
# (RTX 30; sm_89 the same) is the tightest; sm_80 (A100) has 163 KB; sm_90
# (H100 / H200) compiles differently (wgmma).
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024,
                90: 227 * 1024}
# SASS opcodes reported, by what they cost
MIX = dict(fma=('FFMA', 'DFMA'), mma=('HMMA', 'HGMMA', 'DMMA'),
           exp=('MUFU', ), local_ops=('LDL', 'STL'))
INTS = ('n', 'm', 'd', 'c', 'heads', 'chunk', 'r')  # the kernels' int args


MODES = ('kept', 'streamed')  # the kernel kept, or rebuilt in every pass


def record_launches(d: int = 32, m: int = 66, n_side=(7, 10), num_iters=2,
                    lpe: bool = True, precisions=('ieee', ),
                    cc: int = 90, modes=MODES) -> list:
    """[(kernel name, warps, constexprs, pointer type)] of one SeT forward
    + backward at head dim ``d`` in each of ``precisions`` (fp32 inputs at
    a ``tl.dot`` precision, or ``fp64``: float64 inputs) and ``modes``
    (see ``fused_triton.STREAM_BYTES``) with the tiles chosen for compute
    capability ``cc`` (tiles may depend on both), run
    under Triton's interpreter (which must be on before triton is imported:
    ``TRITON_INTERPRET=1``); the defaults give full 64-wide tiles and
    partial ones, and two Sinkhorn steps (a kept kernel's backward fuses
    a reversed step only from the second on)."""
    import unittest.mock

    import torch

    from mmsetformer.ops import (fused_triton, grid_positions, set_attention,
                                 set_backend)
    seen, launch = {}, fused_triton._launch

    def record(kernel, grid, *args, warps=fused_triton.WARPS, **meta):
        ptr = str(args[0].dtype).replace('torch.float', 'fp')
        seen[kernel.fn.__name__, warps, json.dumps(meta, sort_keys=True),
             ptr] = meta
        launch(kernel, grid, *args, warps=warps, **meta)

    g = torch.Generator().manual_seed(0)
    n = n_side[0] * n_side[1]
    q, v = (torch.randn(1, 1, n, d, generator=g) for _ in range(2))
    r = torch.randn(1, m, d, generator=g)
    pos = (grid_positions(*n_side), grid_positions(6, (m + 5) // 6)[:m]) \
        if lpe else None
    with unittest.mock.patch.object(fused_triton, '_launch', record), \
            unittest.mock.patch.object(fused_triton, 'INTERPRETED_CC',
                                       divmod(cc, 10)), \
            set_backend('triton'):
        for prec, mode in ((p, md) for p in precisions for md in modes):
            dtype = torch.float64 if prec == 'fp64' else torch.float32
            leaves = [t.to(dtype).requires_grad_() for t in (q, v, r)]
            with unittest.mock.patch.dict(
                    os.environ, MMSETFORMER_SET_PRECISION=prec
                    if prec != 'fp64' else 'ieee'), \
                    fused_triton.stream_above(2**62 if mode == 'kept'
                                              else 0):
                y = set_attention(*leaves, eps=0.3, num_iters=num_iters,
                                  pos=pos and tuple(p.to(dtype) for p in pos),
                                  sigma=0.5 if lpe else None)
                torch.autograd.grad(y.sum(), leaves)
    return [(name, warps, meta, ptr)
            for (name, warps, _, ptr), meta in seen.items()]


def _tf32(a):
    """fp32 array rounded to TF32 (10-bit mantissa) as tensor cores take it:
    to nearest, ties away from zero (PTX cvt.rna.tf32.f32)."""
    import numpy as np
    bits = a.astype(np.float32).view(np.uint32)
    return ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(
        np.float32)


def _emulating_dot(dot):
    """Triton's interpreter runs every tl.dot in full fp32 whatever its
    input precision; this one rounds TF32 inputs first (tf32x3: the
    3-product split hi.hi + hi.lo + lo.hi of each fp32 input)."""
    import numpy as np
    from triton.runtime.interpreter import TensorHandle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        name = str(input_precision).split('.')[-1].upper()
        if a.data.dtype != np.float32 or name not in ('TF32', 'TF32X3'):
            return dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        ah, bh = _tf32(a.data), _tf32(b.data)
        out = np.matmul(ah, bh, dtype=np.float32)
        if name == 'TF32X3':
            out += np.matmul(ah, _tf32(b.data - bh), dtype=np.float32) + \
                np.matmul(_tf32(a.data - ah), bh, dtype=np.float32)
        return TensorHandle(out + d.data, d.dtype.scalar)
    return create_dot


def emulated_errors(precisions=('ieee', 'tf32x3', 'tf32'), d: int = 32,
                    eps: float = 0.1, sigma: float = 0.8, num_iters=3,
                    n_side=(14, 14), grid=(8, 8)) -> dict:
    """{precision: {y, dq, dv, drefs: error}}: SeT through the Triton
    kernels in fp32 under Triton's interpreter (``TRITON_INTERPRET=1``),
    with TF32 ``tl.dot`` inputs emulated, against the reference in float64;
    an error is max |a - a64| / max |a64|.  Arithmetic, not a GPU
    measurement: tensor cores may also accumulate in another order."""
    import unittest.mock

    import torch
    from triton.runtime import interpreter

    from mmsetformer.ops import grid_positions, set_attention, set_backend
    g = torch.Generator().manual_seed(0)
    n, m = n_side[0] * n_side[1], grid[0] * grid[1]
    q, v = (torch.randn(1, 2, n, d, generator=g, dtype=torch.float64)
            for _ in range(2))
    r = torch.randn(2, m, d, generator=g, dtype=torch.float64)
    pos = (grid_positions(*n_side, dtype=torch.float64),
           grid_positions(*grid, dtype=torch.float64))

    def run(backend, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, v, r)]
        with set_backend(backend):
            y = set_attention(*leaves, eps=eps, num_iters=num_iters,
                              pos=tuple(p.to(dtype) for p in pos),
                              sigma=sigma)
        gy = torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y)
        return [y.detach()] + list(torch.autograd.grad(y, leaves, gy))

    ref = run('reference', torch.float64)
    builder = interpreter.InterpreterBuilder
    out = {}
    with unittest.mock.patch.object(builder, 'create_dot',
                                    _emulating_dot(builder.create_dot)):
        for prec in precisions:
            with unittest.mock.patch.dict(
                    os.environ, MMSETFORMER_SET_PRECISION=prec):
                ours = run('triton', torch.float32)
            out[prec] = {k: ((a.double() - b).abs().max() /
                             b.abs().max()).item()
                         for k, a, b in zip(('y', 'dq', 'dv', 'drefs'),
                                            ours, ref)}
    return out


def _res_usage(cubin: bytes, bindir: str) -> dict:
    """Registers, spill stack and instruction mix of one compiled kernel."""
    import tempfile
    with tempfile.NamedTemporaryFile(suffix='.cubin') as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([os.path.join(bindir, 'cuobjdump'), '-res-usage',
                              f.name], capture_output=True, text=True,
                             check=True).stdout
        sass = subprocess.run([os.path.join(bindir, 'cuobjdump'), '-sass',
                               f.name], capture_output=True, text=True,
                              check=True).stdout
    usage = {k.lower(): int(v) for k, v in
             re.findall(r'\b(REG|STACK|LOCAL):(\d+)', res)}
    code = [(int(a, 16), op, rest) for a, op, rest in re.findall(
        r'/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T\d]\s+)?([A-Z][A-Z0-9]*)([^;]*);',
        sass)]
    ops = Counter(op for _, op, _ in code)
    usage.update({k: sum(ops[o] for o in names)
                  for k, names in MIX.items()})
    usage['instructions'] = len(code)
    # loops: the spans closed by a backward branch; a spill outside them
    # (a value saved across a loop) costs nothing next to the tile loops
    loops = [(int(t, 16), a) for a, op, rest in code if op == 'BRA'
             for t in re.findall(r'0x([0-9a-f]+)', rest)[-1:]
             if int(t, 16) < a]
    # the tile loops' bodies: what one tile of K costs a program
    in_loops = [op for a, op, _ in code
                if any(t <= a <= end for t, end in loops)]
    usage.update(loops=len(loops), loop_instructions=len(in_loops),
                 loop_local_ops=sum(op in MIX['local_ops'] for op in in_loops))
    return usage


def compile_forward_backward(d: int, ccs=(86, 90), precisions=('ieee', ),
                             lpe: bool = True, modes=MODES) -> list:
    """``compile_launches`` of each GPU's ``record_launches``."""
    return [row for cc in ccs for row in compile_launches(
        record_launches(d, lpe=lpe, precisions=precisions, cc=cc,
                        modes=modes), [cc])]


def compile_launches(launches: list, ccs=(86, 90), stages=None,
                     jobs: int = 0) -> list:
    """Compile each launch for each compute capability in ``ccs`` at the
    deepest software pipeline that fits its shared memory (as
    ``fused_triton._launch`` tries them); one dict per (launch, cc), in
    order.  Runs in ``jobs`` fresh processes (0: one per CPU), since
    Triton's interpreter setting is read once."""
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    jobs = max(1, min(len(launches), jobs or os.cpu_count() or 1))

    def run(part: list) -> list:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), '--compile'],
            input=json.dumps(dict(launches=part, ccs=list(ccs),
                                  stages=stages)),
            capture_output=True, text=True, env=env, timeout=1200)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
        return json.loads(proc.stdout)

    # launch k goes to process k % jobs
    with ThreadPoolExecutor(jobs) as pool:
        outs = list(pool.map(run, [launches[i::jobs] for i in range(jobs)]))
    per = len(ccs)  # rows per launch
    return [row for k in range(len(launches))
            for row in outs[k % jobs][(k // jobs) * per:(k // jobs + 1) * per]]


def _compile_worker() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mmsetformer.ops import _triton_kernels, fused_triton
    job = json.loads(sys.stdin.read())
    bindir = os.path.join(os.path.dirname(triton.__file__), 'backends',
                          'nvidia', 'bin')
    out = []
    for name, warps, meta, ptr in job['launches']:
        fn = getattr(_triton_kernels, name)
        sig = {a: 'constexpr' if a in meta else 'i32' if a in INTS
               else f'*{ptr}' for a in fn.arg_names}
        for cc in job['ccs']:
            for s in job['stages'] or fused_triton.STAGES:
                k = triton.compile(ASTSource(fn, sig, meta), options=dict(
                    num_warps=warps, num_stages=s),
                    target=GPUTarget('cuda', int(cc), 32))
                if k.metadata.shared <= SHARED_LIMIT[int(cc)]:
                    break
            out.append(dict(kernel=name, warps=warps, meta=meta, cc=int(cc),
                            ptr=ptr, stages=s, shared=k.metadata.shared,
                            **_res_usage(k.asm['cubin'], bindir)))
    print(json.dumps(out))


def table(rows: list) -> str:
    keys = ('BN', 'BM', 'BD', 'BC', 'BR', 'HAS_MAT', 'KEPT', 'FIND_MAX',
            'STORE', 'PREC')
    lines = ['| kernel | sm | tiles / constants | warps | stages | shared KiB '
             '| registers | stack bytes | FMA | MMA | exp | local ld/st '
             '| of them in loops | instructions | in loops |',
             '| --- ' * 15 + '|']
    for r in rows:
        meta = ' '.join([f'{k}={r["meta"][k]}' for k in keys
                         if k in r['meta']] + [r['ptr']])
        lines.append(
            f'| {r["kernel"]} | {r["cc"]} | {meta} | {r["warps"]} | '
            f'{r["stages"]} | {r["shared"] / 1024:.0f} | {r["reg"]} | '
            f'{r["stack"]} | {r["fma"]} | {r["mma"]} | {r["exp"]} | '
            f'{r["local_ops"]} | {r["loop_local_ops"]} | '
            f'{r["instructions"]} | {r["loop_instructions"]} |')
    return '\n'.join(lines)


def main():
    if sys.argv[1:] == ['--compile']:
        return _compile_worker()
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--d', type=int, default=32, help='head dim (32)')
    p.add_argument('--cc', type=int, nargs='+', default=[86, 90],
                   choices=sorted(SHARED_LIMIT))
    p.add_argument('--precision', nargs='+', default=['ieee'],
                   choices=('ieee', 'tf32x3', 'tf32', 'fp64'),
                   help="tl.dot's input precision of fp32 inputs, or fp64 "
                   'inputs')
    p.add_argument('--modes', nargs='+', default=list(MODES),
                   choices=MODES, help='the kernel kept (read by the '
                   'passes) or streamed (rebuilt in each): both')
    p.add_argument('--no-lpe', action='store_true')
    p.add_argument('--json', help='also write the rows here')
    p.add_argument('--tf32-error', action='store_true',
                   help='instead: the error of each precision against '
                   'float64, TF32 emulated under the interpreter')
    p.add_argument('--eps', type=float, default=0.1,
                   help='with --tf32-error: eps (the models\' default 0.1)')
    args = p.parse_args()
    os.environ['TRITON_INTERPRET'] = '1'
    if args.tf32_error:
        errs = emulated_errors(('ieee', 'tf32x3', 'tf32'), args.d, args.eps)
        print(f'SeT through the Triton kernels (interpreter, TF32 '
              f'emulated), d = {args.d}, eps = {args.eps}: max |a - a64| '
              '/ max |a64|\n\n| precision | y | dL/dq | dL/dv | dL/drefs '
              '|\n| --- | --- | --- | --- | --- |')
        for prec, e in errs.items():
            print(f'| {prec} | ' + ' | '.join(f'{x:.1e}' for x in e.values())
                  + ' |')
        return
    rows = compile_forward_backward(args.d, args.cc, args.precision,
                                    not args.no_lpe, args.modes)
    print(f'SeT Triton kernels, head dim {args.d}, '
          f'LPE {"off" if args.no_lpe else "on"}: static counts per '
          'kernel (a loop body counts once)\n')
    print(table(rows))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)


if __name__ == '__main__':
    main()
