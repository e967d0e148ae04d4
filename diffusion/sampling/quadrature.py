"""The numerical pieces several multistep samplers share: Lagrange bases integrated by Gauss-Legendre
quadrature (DEIS-tAB, SA-Solver) and weighted sums of tensors (SA-Solver, UniPC)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

# 16 points integrate polynomials up to degree 31 exactly: far beyond the orders (<= 4) these samplers use.
_LEGENDRE_NODES, _LEGENDRE_WEIGHTS = np.polynomial.legendre.leggauss(16)


def gauss_legendre(start: float, end: float) -> tuple[np.ndarray, np.ndarray]:
    """Quadrature points and weights on [start, end] (either order): sum(w * f(points)) ~ int f."""
    half = 0.5 * (end - start)
    return 0.5 * (end + start) + half * _LEGENDRE_NODES, _LEGENDRE_WEIGHTS * half


def lagrange_basis(nodes: Sequence[float], points: np.ndarray) -> list[np.ndarray]:
    """L_j(points) for each Lagrange basis polynomial L_j through `nodes` (1 at nodes[j], 0 at the others)."""
    bases = []
    for j, node in enumerate(nodes):
        basis = np.ones_like(points)
        for k, other in enumerate(nodes):
            if k != j:
                basis *= (points - other) / (node - other)
        bases.append(basis)
    return bases


def weighted_sum(weights: Sequence[float], tensors: Sequence[Tensor]) -> Tensor | float:
    """sum_j w_j t_j, left to right; 0.0 when there is nothing to sum."""
    total: Tensor | float = 0.0
    for weight, tensor in zip(weights, tensors):
        total = total + tensor * float(weight)
    return total
