"""Parameter and FLOP counting with mmengine's complexity analysis.

mmengine (like fvcore) counts one multiply-add of convolutions, linears and
matmuls as one FLOP and ignores element-wise work.  SeT's kernel, Sinkhorn
loop and aggregations run inside one autograd function the tracer cannot
see, so they are counted analytically from the shapes (same convention);
a second figure adds every element-wise and reduction op (including the
exp / max / shift passes over SeT's n x m kernel) at one FLOP per element.
"""
from typing import Dict, Tuple

import torch
from torch import nn

__all__ = ['complexity', 'ELEMENTWISE_OPS', 'REDUCTION_OPS']

# One FLOP per output element.
ELEMENTWISE_OPS = (
    'aten::add', 'aten::add_', 'aten::sub', 'aten::rsub', 'aten::mul',
    'aten::mul_', 'aten::div', 'aten::div_', 'aten::neg', 'aten::exp',
    'aten::exp_', 'aten::reciprocal', 'aten::clamp_min', 'aten::clamp',
    'aten::gelu', 'aten::relu', 'aten::relu_', 'aten::sigmoid',
    'aten::silu', 'aten::sqrt', 'aten::rsqrt', 'aten::pow', 'aten::square',
    'aten::softmax', 'aten::log_softmax', 'aten::maximum', 'aten::minimum',
    'aten::where', 'aten::abs', 'aten::log')
# One FLOP per input element.
REDUCTION_OPS = ('aten::sum', 'aten::mean', 'aten::amax', 'aten::max',
                 'aten::linalg_vector_norm', 'aten::norm')


def _set_flops(model: nn.Module, inputs: Tuple) -> Tuple[int, int]:
    """FLOPs of the SeT operators of ``model(*inputs)``, from shapes.

    The operator is one autograd function (invisible to the tracer), so it
    is counted analytically, per head: the kernel matmul n*m*(d + k + 2),
    2T + 1 Sinkhorn matrix-vector products n*m each, and two aggregation
    products n*m*(d + 1); the element-wise work on the kernel (row max,
    shift, floor, exp) is 4 n*m more.
    """
    from .models.set_attention import SeTAttention
    counts = [0, 0]

    def hook(module, args):
        x, (h, w) = args[0], args[1]
        heads, d = module.num_heads, module.head_dims
        bhnm = x.shape[0] * heads * h * w * module.num_refs
        d_k = d + (4 if module.use_lpe else 0)
        macs = bhnm * (d_k + 2 * module.num_iters + 1 + 2 * (d + 1))
        counts[0] += macs
        counts[1] += macs + 4 * bhnm

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, SeTAttention)]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return counts[0], counts[1]


def complexity(model: nn.Module, inputs: Tuple) -> Dict[str, float]:
    """Params and FLOPs of ``model(*inputs)`` (traced, eval mode).

    Returns ``params``, ``flops`` (matmul/conv/linear multiply-adds, the
    convention of published FLOP figures) and ``flops_all`` (plus every
    element-wise and reduction op).
    """
    from mmengine.analysis import FlopAnalyzer
    from mmengine.analysis.jit_handles import elementwise_flop_counter
    from mmengine.logging import MMLogger
    was_training = model.training
    model.eval()
    set_flops, set_flops_all = _set_flops(model, inputs)
    ignore = {'prim::PythonOp._SeTFunction': None}
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel('ERROR')  # its per-op "unsupported" warnings are noise
    try:
        with torch.no_grad():
            base = FlopAnalyzer(model, inputs)
            base.unsupported_ops_warnings(False)
            base.uncalled_modules_warnings(False)
            base.set_op_handle(**ignore)
            flops = base.total() + set_flops
            full = FlopAnalyzer(model, inputs)
            full.unsupported_ops_warnings(False)
            full.uncalled_modules_warnings(False)
            full.set_op_handle(
                **{op: elementwise_flop_counter(0, 1)
                   for op in ELEMENTWISE_OPS},
                **{op: elementwise_flop_counter(1, 0)
                   for op in REDUCTION_OPS}, **ignore)
            flops_all = full.total() + set_flops_all
    finally:
        logger.setLevel(level)
        model.train(was_training)
    params = sum(p.numel() for p in model.parameters())
    return dict(params=params, flops=flops, flops_all=flops_all)
