"""The SeT operator; depends on torch alone (Triton, which ships with torch,
is imported only when its kernels run)."""
from . import fused_cpu, fused_triton
from .set_attention import (BACKENDS, get_backend, gibbs_kernel,
                            grid_positions, kernel_workspace, measured_choices,
                            reference_grid, set_attention, set_backend,
                            shared_grid_positions, sinkhorn_scalings,
                            transport_plan)

__all__ = [
    'set_attention', 'transport_plan', 'grid_positions', 'reference_grid',
    'gibbs_kernel', 'sinkhorn_scalings', 'kernel_workspace', 'set_backend',
    'get_backend', 'measured_choices', 'BACKENDS', 'fused_cpu',
    'fused_triton', 'shared_grid_positions'
]
