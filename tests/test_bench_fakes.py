"""Fake mechanisms for the bench and CLI tests (no tests here): registered for one test, removed after."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

import attnkit
from attnkit import registry
from attnkit.registry import Mechanism

PAPER = "A Paper That Only The Tests Cite"


class BandPattern:
    """A minimal pattern (the protocol the bench uses): keys within ``w`` of the query, causal optional."""

    def __init__(self, w: int, causal: bool = False):
        self.w, self.causal = w, causal

    def allowed(self, b, h, q_idx, kv_idx, q_len, kv_len):
        d = q_idx - kv_idx
        ok = d.abs() <= self.w
        return ok & (d >= 0) if self.causal else ok

    def density(self, q_len, kv_len=None):
        kv_len = q_len if kv_len is None else kv_len
        qi = torch.arange(q_len)[:, None]
        ki = torch.arange(kv_len)[None, :]
        return float(self.allowed(None, None, qi, ki, q_len, kv_len).float().mean())

    def mask_mod(self, q_len, kv_len):
        def mask_mod(b, h, q_idx, kv_idx):
            return self.allowed(b, h, q_idx, kv_idx, q_len, kv_len)

        return mask_mod


def _sdpa_factory(causal: bool = False):
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _band_factory(causal: bool = False, window: int = 4):
    def run(q, k, v):
        n = q.shape[2]
        idx = torch.arange(n, device=q.device)
        mask = BandPattern(window, causal).allowed(None, None, idx[:, None], idx[None, :], n, n)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return run


def _mean_factory(causal: bool = False):
    # "Approximation": every query attends uniformly (exact softmax when q = 0).
    def run(q, k, v):
        return v.mean(dim=2, keepdim=True).expand(*q.shape[:3], v.shape[-1]).contiguous()

    return run


def _failing_factory(causal: bool = False):
    def run(q, k, v):
        raise RuntimeError("this mechanism is broken on purpose")

    return run


def _oom_factory(causal: bool = False, limit: int = 32):
    def run(q, k, v):
        if q.shape[2] > limit:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10^12 bytes")
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def _interrupt_factory(causal: bool = False, at: int = 64):
    def run(q, k, v):
        if q.shape[2] >= at:
            raise KeyboardInterrupt
        return F.scaled_dot_product_attention(q, k, v)

    return run


def _jitter_factory(causal: bool = False, slow_s: float = 0.02):
    # Every other call is slow, as on a machine where another process takes the core now and then.
    calls = [0]

    def run(q, k, v):
        import time

        calls[0] += 1
        if calls[0] % 2 == 0:
            time.sleep(slow_s)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def _fake_flops(batch, heads, q_len, kv_len, head_dim, causal=False, **params):
    return 1000.0 * q_len


FAKES = {
    "fake_exact": Mechanism("fake_exact", "fakes", PAPER, True, "O(n^2 d)", True, _sdpa_factory,
                             in_default_bench=True, source="paper"),
    "fake_band": Mechanism("fake_band", "fakes", PAPER, True, "O(n w d)", True, _band_factory,
                            bench_params={"window": 4}, in_default_bench=True,
                            extras={"pattern": lambda seq_len, causal=False, window=4: BandPattern(window, causal)},
                            source="paper+catalogue"),
    "fake_mean": Mechanism("fake_mean", "fakes_approx", PAPER, False, "O(n d)", False, _mean_factory,
                            flops=_fake_flops, source="deviation: the mean of the values, not the paper's attention"),
    "fake_failing": Mechanism("fake_failing", "fakes", PAPER, True, "O(n^2 d)", False, _failing_factory,
                               source="paper"),
    "fake_oom": Mechanism("fake_oom", "fakes", PAPER, True, "O(n^2 d)", True, _oom_factory, source="paper"),
    "fake_jitter": Mechanism("fake_jitter", "fakes", PAPER, True, "O(n^2 d)", True, _jitter_factory, source="paper"),
    "fake_interrupt": Mechanism("fake_interrupt", "fakes", PAPER, True, "O(n^2 d)", False,
                                 _interrupt_factory, source="paper"),
}


@contextlib.contextmanager
def registered(*names: str):
    """Register the named fakes (all by default) for the duration of a ``with`` block."""
    attnkit.list_mechanisms()  # load the real families first, so they do not load in the middle
    chosen = [FAKES[n] for n in (names or FAKES)]
    for m in chosen:
        registry.register(m)
    try:
        yield chosen
    finally:
        for m in chosen:
            registry._REGISTRY.pop(m.name, None)
