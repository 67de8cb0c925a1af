"""C13: the paper's Fourier KArAt ("Kolmogorov-Arnold Attention: Is Learnable Attention Better For Vision
Transformers?", Sec. 4, Eq. 2, Algorithms 1-2): a rank-r Fourier KAN operator on each logit row, then W."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.nn import FourierKArAt
from attnkit.ops.exact.karat import fourier_karat, simplex_projection
from attnkit.testing import assert_close


def _qkv(n=10, h=2, hkv=1, d=4, dv=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, h, n, d, generator=g, dtype=dtype), torch.randn(2, hkv, n, d, generator=g, dtype=dtype),
            torch.randn(2, hkv, n, dv, generator=g, dtype=dtype))


def test_simplex_projection_is_algorithm_1():
    y = torch.tensor([[0.6, 0.5, -1.0], [2.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.2, 0.3, 0.5]], dtype=torch.float64)
    want = torch.tensor([[0.55, 0.45, 0.0], [1.0, 0.0, 0.0], [1 / 3] * 3, [0.2, 0.3, 0.5]], dtype=torch.float64)
    assert_close(simplex_projection(y), want)
    z = simplex_projection(torch.randn(5, 7, dtype=torch.float64) * 3, dim=0)
    assert_close(z.sum(0), torch.ones(7, dtype=torch.float64))
    assert bool((z >= 0).all())
    # the projection is the closest simplex point: no random simplex point is closer
    y = torch.randn(6, dtype=torch.float64)
    x = simplex_projection(y)
    others = torch.distributions.Dirichlet(torch.ones(6, dtype=torch.float64)).sample((2000,))
    assert float((x - y).norm()) <= float((others - y).norm(dim=-1).min()) + 1e-12


@pytest.mark.parametrize("l1", [False, True])
@pytest.mark.parametrize("chunk", [3, 64])
def test_fast_path_equals_term_by_term_reference(l1, chunk):
    torch.manual_seed(0)
    mod = FourierKArAt(2, 10, rank=3, grid=2, l1_projection=l1, chunk=chunk).double()
    q, k, v = (t.requires_grad_(True) for t in _qkv())
    out = mod(q, k, v)
    ref = mod.reference(q, k, v)
    assert_close(out, ref)
    g_out = torch.autograd.grad(out.square().sum(), (q, k, v, mod.coef_cos, mod.proj))
    g_ref = torch.autograd.grad(ref.square().sum(), (q, k, v, mod.coef_cos, mod.proj))
    for a, b in zip(g_out, g_ref):
        assert_close(a, b)


def test_each_unit_belongs_to_one_key_position():
    """phi_pq acts on the logit of key position q only (Eq. 2): with every unit but those of key 3 zeroed, the
    operator output, hence the attention weights, ignore the other keys' logits."""
    torch.manual_seed(1)
    mod = FourierKArAt(2, 8, rank=3, grid=3).double()
    with torch.no_grad():
        keep = torch.zeros(8, dtype=torch.float64)
        keep[3] = 1
        mod.coef_cos.mul_(keep[:, None])
        mod.coef_sin.mul_(keep[:, None])
    q, k, v = _qkv(n=8)
    k2 = k.clone()
    k2[:, :, [0, 5, 7]] += 1.5  # other keys' logits change, values do not
    assert_close(mod(q, k2, v), mod(q, k, v))
    k3 = k.clone()
    k3[:, :, 3] += 1.5
    assert (mod(q, k3, v) - mod(q, k, v)).abs().amax() > 1e-3


def test_parameter_count_and_linearity_in_w():
    mod = FourierKArAt(3, 16, rank=12, grid=3)
    # the paper: O(2 N r h G) Fourier coefficients per block, plus W [N, r] per head
    assert sum(p.numel() for p in mod.parameters()) == 2 * 16 * 12 * 3 * 3 + 3 * 16 * 12
    q, k, v = _qkv(n=16, h=3, hkv=3, dtype=torch.float32)
    out = mod(q, k, v)
    with torch.no_grad():
        mod.proj.mul_(2.0)
    assert_close(mod(q, k, v), 2 * out)


def test_fixed_length_and_no_causal_form():
    mod = FourierKArAt(2, 10, rank=2)
    q, k, v = _qkv(n=9, dtype=torch.float32)
    with pytest.raises(ValueError, match="built for seq_len=10"):
        mod(q, k, v)
    with pytest.raises(ValueError, match="rank must be"):
        FourierKArAt(2, 10, rank=0)
    with pytest.raises(attnkit.NotSupportedError):
        attnkit.get("fourier_karat", num_heads=2, seq_len=10, causal=True)
    with pytest.raises(ValueError, match="coef_cos and coef_sin"):
        fourier_karat(*_qkv(n=10), mod.coef_cos[:, :, :9].double(), mod.coef_sin.double(), mod.proj.double())
    m = attnkit.mechanism_info("fourier_karat")
    assert not m.causal and set(m.needs) == {"num_heads", "seq_len"}
