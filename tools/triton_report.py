"""SeT's Triton kernels compiled ahead of time for GPUs this machine need not
have: per kernel launch of one forward + backward, the shared memory, the
registers, the bytes spilled to local memory and the instruction mix of the
machine code (fp32 FMAs against tensor-core MMAs, exps, local loads and
stores), from Triton's bundled ptxas and cuobjdump.

    python tools/triton_report.py                  # SeTformer's head: d = 32
    python tools/triton_report.py --d 40 --cc 86 90 --precision ieee tf32x3

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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The most shared memory one block may use (CUDA's opt-in maximum): sm_86
# (RTX 30; sm_89 the same) is the tightest; sm_80 (A100) has 163 KB; sm_90
# (H100 / H200) compiles differently (wgmma).
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024,
                90: 227 * 1024}
# SASS opcodes reported, by what they cost
MIX = dict(fma=('FFMA', 'DFMA'), mma=('HMMA', 'HGMMA', 'DMMA'),
           exp=('MUFU', ), local_ops=('LDL', 'STL'))
INTS = ('n', 'm', 'dp', 'd', 'kp', 'c', 'heads', 'chunk', 'r')


def record_launches(d: int = 32, m: int = 66, n_side=(7, 10), num_iters=1,
                    lpe: bool = True, precisions=('ieee', )) -> list:
    """[(kernel name, warps, constexprs)] of one SeT forward + backward at
    head dim ``d``, run under Triton's interpreter (which must be on before
    triton is imported: ``TRITON_INTERPRET=1``); the defaults give full
    64-wide tiles and partial ones."""
    import torch

    from mmsetformer.ops import (fused_triton, grid_positions, set_attention,
                                 set_backend)
    seen, launch = {}, fused_triton._launch

    def record(kernel, grid, *args, warps=fused_triton.WARPS, **meta):
        for prec in precisions:
            meta_p = dict(meta, PREC=prec)
            seen[kernel.fn.__name__, warps,
                 json.dumps(meta_p, sort_keys=True)] = meta_p
        launch(kernel, grid, *args, warps=warps, **meta)

    g = torch.Generator().manual_seed(0)
    n = n_side[0] * n_side[1]
    q, v = (torch.randn(1, 1, n, d, generator=g).requires_grad_()
            for _ in range(2))
    r = torch.randn(1, m, d, generator=g).requires_grad_()
    pos = (grid_positions(*n_side), grid_positions(6, (m + 5) // 6)[:m]) \
        if lpe else None
    fused_triton._launch = record
    try:
        with set_backend('triton'):
            y = set_attention(q, v, r, eps=0.3, num_iters=num_iters, pos=pos,
                              sigma=0.5 if lpe else None)
            torch.autograd.grad(y.sum(), (q, v, r))
    finally:
        fused_triton._launch = launch
    return [(name, warps, meta) for (name, warps, _), meta in seen.items()]


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
    ops = Counter(m.group(1) for m in re.finditer(
        r'/\*[0-9a-f]{4}\*/\s+(?:@!?U?P[T\d]\s+)?([A-Z][A-Z0-9]*)', sass))
    usage.update({k: sum(ops[o] for o in names)
                  for k, names in MIX.items()})
    return usage


def compile_launches(launches: list, ccs=(86, 90), stages=None) -> list:
    """Compile each launch for each compute capability in ``ccs`` at the
    deepest software pipeline that fits its shared memory (as
    ``fused_triton._launch`` tries them); one dict per (launch, cc).  Runs
    in a fresh process, since Triton's interpreter setting is read once."""
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), '--compile'],
        input=json.dumps(dict(launches=launches, ccs=list(ccs),
                              stages=stages)),
        capture_output=True, text=True, env=env, timeout=1200)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout)


def _compile_worker() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mmsetformer.ops import _triton_kernels, fused_triton
    job = json.loads(sys.stdin.read())
    bindir = os.path.join(os.path.dirname(triton.__file__), 'backends',
                          'nvidia', 'bin')
    out = []
    for name, warps, meta in job['launches']:
        fn = getattr(_triton_kernels, name)
        sig = {a: 'constexpr' if a in meta else 'i32' if a in INTS
               else '*fp32' for a in fn.arg_names}
        for cc in job['ccs']:
            for s in job['stages'] or fused_triton.STAGES:
                k = triton.compile(ASTSource(fn, sig, meta), options=dict(
                    num_warps=warps, num_stages=s),
                    target=GPUTarget('cuda', int(cc), 32))
                if k.metadata.shared <= SHARED_LIMIT[int(cc)]:
                    break
            out.append(dict(kernel=name, warps=warps, meta=meta, cc=int(cc),
                            stages=s, shared=k.metadata.shared,
                            **_res_usage(k.asm['cubin'], bindir)))
    print(json.dumps(out))


def table(rows: list) -> str:
    keys = ('BN', 'BM', 'BD', 'BC', 'BR', 'HAS_MAT', 'PREC')
    lines = ['| kernel | sm | tiles / constants | warps | stages | shared KiB '
             '| registers | stack bytes | FMA | MMA | exp | local ld/st |',
             '| --- ' * 12 + '|']
    for r in rows:
        meta = ' '.join(f'{k}={r["meta"][k]}' for k in keys
                        if k in r['meta'])
        lines.append(
            f'| {r["kernel"]} | {r["cc"]} | {meta} | {r["warps"]} | '
            f'{r["stages"]} | {r["shared"] / 1024:.0f} | {r["reg"]} | '
            f'{r["stack"]} | {r["fma"]} | {r["mma"]} | {r["exp"]} | '
            f'{r["local_ops"]} |')
    return '\n'.join(lines)


def main():
    if sys.argv[1:] == ['--compile']:
        return _compile_worker()
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--d', type=int, default=32, help='head dim (32)')
    p.add_argument('--cc', type=int, nargs='+', default=[86, 90],
                   choices=sorted(SHARED_LIMIT))
    p.add_argument('--precision', nargs='+', default=['ieee'],
                   choices=('ieee', 'tf32x3', 'tf32'))
    p.add_argument('--no-lpe', action='store_true')
    p.add_argument('--json', help='also write the rows here')
    args = p.parse_args()
    os.environ['TRITON_INTERPRET'] = '1'
    launches = record_launches(args.d, lpe=not args.no_lpe,
                               precisions=args.precision)
    rows = compile_launches(launches, args.cc)
    print(f'SeT Triton kernels, head dim {args.d}, '
          f'LPE {"off" if args.no_lpe else "on"}: static counts per '
          'kernel (a loop body counts once)\n')
    print(table(rows))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)


if __name__ == '__main__':
    main()
