"""The SeT operator; depends on torch alone."""
from .set_attention import (gibbs_kernel, grid_positions, kernel_workspace,
                            reference_grid, set_attention, sinkhorn_scalings,
                            transport_plan)

__all__ = [
    'set_attention', 'transport_plan', 'grid_positions', 'reference_grid',
    'gibbs_kernel', 'sinkhorn_scalings', 'kernel_workspace'
]
