"""KV-cache policies during generation (issue 25): every compressing cache holds, at every step, what its paper's
policy keeps among the prompt *and the generated tokens*, and its output equals dense attention under that mask.

Each policy is checked against a plain simulator written here from the paper (python sets, one loop per token),
and each decoding step against ``attnkit.attention`` over the full keys with the held set as the mask."""

import math

import pytest
import torch

import attnkit
from attnkit import patterns as P
from attnkit.cache import AdaptiveKVCache
from attnkit.testing import assert_close, random_qkv


def _dense_step(q, k, v, p, held, g):
    """Query ``p`` attends to the positions ``held [b, hkv, p]`` plus itself, over the full keys (dense mask)."""
    b, hkv = held.shape[:2]
    mask = torch.cat([held, torch.ones(b, hkv, 1, dtype=torch.bool)], 2)  # [b, hkv, p + 1]
    return attnkit.attention(q[:, :, p:p + 1], k[:, :, :p + 1], v[:, :, :p + 1], engine="reference",
                             pattern=P.custom(lambda bi, hi, qi, ki: mask[bi, hi // g, ki]))


# -- FastGen (G10) ------------------------------------------------------------------------------------------------
def _fastgen_simulator(q, k, policy, prompt, special, punct, r_local, r_freq):
    """FastGen (Ge et al. 2024, Algorithm 1) for one policy on every head, position by position in float64:
    returns the held position sets after each token ``[(b, kv head) -> set]`` from the prompt's end on."""
    b, h, n, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    parts = set(policy.split("+"))
    s = q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2) * d ** -0.5
    held, score, history = {}, {}, []
    for bi in range(b):
        for hi in range(hkv):
            # prompt: causal attention, averaged over the kv head's query heads
            a = torch.softmax(s[bi, hi * g:(hi + 1) * g, :prompt, :prompt].masked_fill(
                torch.ones(prompt, prompt, dtype=torch.bool).triu(1), -math.inf), -1).mean(0)
            score[bi, hi] = {j: float(a[:, j].sum()) for j in range(prompt)}
            held[bi, hi] = _fastgen_keep(parts, set(range(prompt)), score[bi, hi], prompt, special[bi], punct[bi],
                                         r_local, r_freq)
    history.append({key: set(val) for key, val in held.items()})
    for p in range(prompt, n):
        for bi in range(b):
            for hi in range(hkv):
                cand = sorted(held[bi, hi] | {p})
                a = torch.softmax(s[bi, hi * g:(hi + 1) * g, p, cand], -1).mean(0)
                sc = score[bi, hi]
                sc[p] = 0.0
                for j, w in zip(cand, a.tolist()):
                    sc[j] += w
                held[bi, hi] = _fastgen_keep(parts, set(cand), sc, p + 1, special[bi], punct[bi], r_local, r_freq)
        history.append({key: set(val) for key, val in held.items()})
    return history


def _fastgen_keep(parts, cand, score, length, special, punct, r_local, r_freq):
    if "full" in parts:
        return set(cand)
    keep = set()
    if "special" in parts:
        keep |= {j for j in cand if special[j]}
    if "punct" in parts:
        keep |= {j for j in cand if punct[j]}
    if "local" in parts:
        keep |= {j for j in cand if j >= length - math.ceil(r_local * length)}
    if "frequent" in parts:
        keep |= set(sorted(cand, key=lambda j: -score[j])[:math.ceil(r_freq * length)])
    return keep


POLICY_CASES = ["special", "special+punct", "special+punct+frequent", "special+punct+frequent+local", "local",
                "frequent", "full"]


@pytest.mark.parametrize("policy", POLICY_CASES)
def test_fastgen_generation_follows_the_policy_and_equals_dense_attention_under_it(policy):
    prompt, steps, h, hkv, d = 16, 24, 4, 2, 8
    n = prompt + steps
    q, k, v = random_qkv(2, h, n, n, d, kv_heads=hkv, dtype=torch.float64, seed=3)
    g = torch.Generator().manual_seed(4)
    special = torch.rand(2, n, generator=g) < 0.15
    special[:, 0] = True
    punct = torch.rand(2, n, generator=g) < 0.2
    cache = AdaptiveKVCache(policies=(policy,), special=special[:, :prompt], punct=punct[:, :prompt],
                            local_ratio=0.25, frequent_ratio=0.2)
    assert_close(cache.attend(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt]),
                 attnkit.attention(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], pattern=P.causal()))
    history = _fastgen_simulator(q, k, policy, prompt, special.tolist(), punct.tolist(), 0.25, 0.2)
    for t, p in enumerate(range(prompt, n)):
        held = cache.held_positions()
        assert {key: set(torch.nonzero(held[key]).flatten().tolist()) for key in history[t]} == history[t], p
        cache.mark_next(special=special[:, p:p + 1], punct=punct[:, p:p + 1])
        out = cache.attend(q[:, :, p:p + 1], k[:, :, p:p + 1], v[:, :, p:p + 1])
        assert_close(out, _dense_step(q, k, v, p, held, h // hkv))
    final = cache.held_positions()
    assert {key: set(torch.nonzero(final[key]).flatten().tolist()) for key in history[-1]} == history[-1]
    assert cache.held_bytes == int(final.sum()) * 2 * d * 8 and cache.nbytes >= cache.held_bytes


def test_fastgen_special_heads_stay_at_the_special_tokens_and_local_heads_at_their_window():
    # the defect of issue 25: every generated token used to be appended to every head (1 -> 9 entries over 8
    # steps on a special-token head; a local head kept all 20 generated tokens)
    prompt, steps = 12, 20
    q, k, v = random_qkv(1, 2, prompt + steps, prompt + steps, 8, dtype=torch.float64, seed=5)
    special_head = AdaptiveKVCache(policies=("special",))
    local_head = AdaptiveKVCache(policies=("local",), local_ratio=0.25)
    for cache in (special_head, local_head):
        cache.attend(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt])
        for p in range(prompt, prompt + steps):
            cache.attend(q[:, :, p:p + 1], k[:, :, p:p + 1], v[:, :, p:p + 1])
            if cache is special_head:
                assert cache.held.tolist() == [[1, 1]] and cache.k.shape[2] == 1
            else:
                window = math.ceil(0.25 * (p + 1))
                assert cache.held.tolist() == [[window, window]]
                assert cache.held_positions()[0, 0, p + 1 - window:].all()
    special_head.mark_next(special=True)
    p = prompt + steps
    q2, k2, v2 = random_qkv(1, 2, 1, 1, 8, dtype=torch.float64, seed=6)
    special_head.attend(q2, k2, v2)  # a generated special token stays
    assert special_head.held.tolist() == [[2, 2]] and special_head.held_positions()[0, :, p].all()


def test_fastgen_mark_next_errors():
    cache = AdaptiveKVCache()
    q, k, v = random_qkv(1, 2, 4, 4, 8)
    cache.attend(q, k, v)
    cache.mark_next(special=[True, False, True])
    with pytest.raises(ValueError, match=r"mark_next\(special=...\) must be"):
        cache.attend(q[:, :, :2], k[:, :, :2], v[:, :, :2])
