"""Iterative Moore-Penrose pseudo-inverses used by the landmark methods (Nystromformer, SOFT).

Both start from ``Z0 = A^T / (||A||_1 ||A||_inf)``, which makes ``||I - A Z0|| < 1`` for the matrices these
methods build (positive kernels), so the iterations converge to ``pinv(A)``. They run in at least float32
because the m x m systems are small and half precision loses the inverse.
"""

from __future__ import annotations

import torch


def _initial(a: torch.Tensor) -> torch.Tensor:
    norm1 = a.abs().sum(dim=-2).amax(dim=-1)  # max column sum
    norminf = a.abs().sum(dim=-1).amax(dim=-1)  # max row sum
    return a.transpose(-1, -2) / (norm1 * norminf).clamp_min(torch.finfo(a.dtype).tiny)[..., None, None]


def _upcast(a: torch.Tensor) -> torch.Tensor:
    return a.float() if a.dtype in (torch.float16, torch.bfloat16) else a


def newton_schulz_pinv(a: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Pseudo-inverse of ``a [..., m, m]`` by the third-order iteration of the Nystromformer paper
    (Xiong et al., 2021, eq. 12): ``Z <- 1/4 Z (13 I - AZ (15 I - AZ (7 I - AZ)))``."""
    a = _upcast(a)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    z = _initial(a)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def newton_raphson_pinv(a: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """Pseudo-inverse of ``a [..., m, m]`` by the Newton-Raphson iteration used by SOFT (Lu et al., 2021):
    ``Z <- 2 Z - Z A Z``."""
    a = _upcast(a)
    z = _initial(a)
    for _ in range(iterations):
        z = 2 * z - z @ (a @ z)
    return z


def pseudo_inverse(a: torch.Tensor, method: str, iterations: int) -> torch.Tensor:
    """``method``: ``"newton_schulz"``, ``"newton_raphson"`` or ``"exact"`` (``torch.linalg.pinv``)."""
    if method == "exact":
        return torch.linalg.pinv(_upcast(a))
    if method == "newton_schulz":
        return newton_schulz_pinv(a, iterations)
    if method == "newton_raphson":
        return newton_raphson_pinv(a, iterations)
    raise ValueError(f"pinv must be 'newton_schulz', 'newton_raphson' or 'exact', got {method!r}")
