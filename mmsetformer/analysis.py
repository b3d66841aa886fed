"""Parameter and FLOP counting with mmengine's complexity analysis.

mmengine (like fvcore) counts one multiply-add of convolutions, linears and
matmuls as one FLOP and ignores element-wise work.  SeT's Sinkhorn loop is
matmuls against the kernel (counted), but its kernel is built by element-wise
ops on an n x m tensor (exp, scaling, max), so a second figure adds every
element-wise and reduction op at one FLOP per element: both are reported.
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
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel('ERROR')  # its per-op "unsupported" warnings are noise
    try:
        with torch.no_grad():
            base = FlopAnalyzer(model, inputs)
            base.unsupported_ops_warnings(False)
            base.uncalled_modules_warnings(False)
            flops = base.total()
            full = FlopAnalyzer(model, inputs)
            full.unsupported_ops_warnings(False)
            full.uncalled_modules_warnings(False)
            full.set_op_handle(
                **{op: elementwise_flop_counter(0, 1)
                   for op in ELEMENTWISE_OPS},
                **{op: elementwise_flop_counter(1, 0)
                   for op in REDUCTION_OPS})
            flops_all = full.total()
    finally:
        logger.setLevel(level)
        model.train(was_training)
    params = sum(p.numel() for p in model.parameters())
    return dict(params=params, flops=flops, flops_all=flops_all)
