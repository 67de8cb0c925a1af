"""The mixers family (issue 12): the papers' invariants (CATALOGUE-FULL.md section F) and the equivalences
between each mixer's fast path, its reference and its decoding step. Shapes, dtypes, gradients and the
fast-path-vs-reference check at lengths 1 and 36 come from tests/test_conformance.py."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.errors import NotSupportedError
from attnkit.nn import mixers as M
from attnkit.ops.mixers import aft, dynconv, hrr, scan
from attnkit.ops.mixers._common import (
    conv_direct,
    conv_fft,
    conv_reference,
    dwconv2d,
    dwconv2d_reference,
    spectral_filter,
)
from attnkit.testing import assert_close

D64 = torch.float64
MIXERS = [m.name for m in attnkit.list_mechanisms("mixers")]


def _x(*shape, seed=0, dtype=D64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _build(cls, dim=16, **kw):
    torch.manual_seed(0)
    return cls(dim, **kw).to(D64)


# ---- every record: the factory call of `attnkit quality` and bad input ------------------------------------------

@pytest.mark.parametrize("name", MIXERS)
def test_factory_builds_with_dim_and_causal(name):
    m = attnkit.mechanism_info(name)
    assert m.kind == "mixer" and m.needs == ("dim",)
    built = m.factory(dim=32, causal=False)
    assert isinstance(built, torch.nn.Module)
    if m.causal:
        assert m.factory(dim=32, causal=True).causal
    else:
        with pytest.raises(NotSupportedError):
            m.build(dim=32, causal=True)


@pytest.mark.parametrize("name", MIXERS)
def test_wrong_channels_is_a_clear_error(name):
    m = attnkit.mechanism_info(name)
    built = m.factory(dim=32, **m.small_params)
    spatial = (6, 6) if m.example_inputs is not None else (8,)
    with pytest.raises(ValueError, match="dim=32"):
        built(torch.randn(2, *spatial, 16))
    if m.example_inputs is not None:
        with pytest.raises(ValueError, match="dimensions"):
            built(torch.randn(2, 36, 32))


# ---- F1 AFT ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_aft_full_with_zero_biases_equals_aft_simple(causal):
    full = _build(M.AFTFull, max_len=64, causal=causal)
    simple = _build(M.AFTSimple, causal=causal)
    simple.load_state_dict({k: v for k, v in full.state_dict().items() if k not in ("u", "v")})
    with torch.no_grad():
        full.u.zero_()
    x = _x(2, 37, 16)
    assert_close(full(x), simple(x))
    assert_close(full.reference(x), simple(x))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [1, 13, 40])
def test_aft_full_blocks_match_reference(causal, n):
    q, k, v = _x(2, n, 6), _x(2, n, 6, seed=1), _x(2, n, 6, seed=2)
    w = _x(n, n, seed=3)
    assert_close(aft.aft_full(q, k, v, w, causal=causal, block=7), aft.aft_reference(q, k, v, w, causal=causal))


@pytest.mark.parametrize("causal", [False, True])
def test_aft_weights_sum_to_one(causal):
    # With V = 1 the weighted average is 1 whatever the weights, so the output is sigmoid(Q) exactly.
    q, k = _x(2, 19, 5), _x(2, 19, 5, seed=1) * 5
    w = _x(19, 19, seed=2)
    ones = torch.ones_like(q)
    assert_close(aft.aft_full(q, k, ones, w, causal=causal, block=4), torch.sigmoid(q))
    assert_close(aft.aft_simple(q, k, ones, causal=causal), torch.sigmoid(q))
    corr = torch.expm1(_x(9, 5, seed=3) * 0.3)
    assert_close(aft.aft_windowed(q, k, ones, corr, causal=causal), torch.sigmoid(q))


def test_aft_simple_causal_recurrence_equals_masked_quadratic_form():
    mixer = _build(M.AFTSimple, causal=True)
    x = _x(2, 23, 16)
    state, ys = None, []
    for t in range(x.shape[1]):
        y, state = mixer.step(x[:, t], state)
        ys.append(y)
    assert_close(torch.stack(ys, 1), mixer.reference(x))
    assert_close(mixer(x), mixer.reference(x))


def _aft_causal_forms(q, k, v, w, corr_local, corr_conv):
    return {
        "full": aft.aft_full(q, k, v, w, causal=True, block=7),
        "full, one block": aft.aft_full(q, k, v, w, causal=True),
        "local": aft.aft_windowed(q, k, v, corr_local, causal=True, per_position=True, block=5),
        "conv": aft.aft_windowed(q, k, v, corr_conv, causal=True, block=5),
    }


def test_causal_aft_full_local_conv_survive_large_later_tokens():
    # Issue 25, defect 2: exp(K - max over all tokens) included later tokens, so scaling the inputs after token
    # 20 by 100 made every earlier output 0/0 = NaN in float32. Earlier outputs must not change at all, and every
    # output must match the float64 definition.
    n, c = 40, 6
    q, k, v = _x(2, n, c, dtype=torch.float32), _x(2, n, c, seed=1, dtype=torch.float32), \
        _x(2, n, c, seed=2, dtype=torch.float32)
    w = _x(n, n, seed=3, dtype=torch.float32) * 0.5
    corr_local = torch.expm1(_x(n, 9, seed=4, dtype=torch.float32) * 0.3)
    corr_conv = torch.expm1(_x(9, c, seed=5, dtype=torch.float32) * 0.3)
    base = _aft_causal_forms(q, k, v, w, corr_local, corr_conv)
    big = [t.clone() for t in (q, k, v)]
    for t in big:
        t[:, 20:] *= 100
    got = _aft_causal_forms(*big, w, corr_local, corr_conv)
    dense = {"full": w, "full, one block": w,
             "local": aft.window_bias_matrix(corr_local.double(), n, per_position=True),
             "conv": aft.window_bias_matrix(corr_conv.double(), n, per_position=False)}
    for name, out in got.items():
        assert torch.isfinite(out).all(), name
        torch.testing.assert_close(out[:, :20], base[name][:, :20], atol=1e-6, rtol=1e-5, msg=name)
        ref = aft.aft_reference(*(t.double() for t in big), dense[name].double(), causal=True)
        torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("per_position", [False, True])
def test_causal_aft_windowed_offset_path_equals_the_definition_on_ordinary_inputs(per_position, monkeypatch):
    # the offsets-over-visible-tokens path, forced on inputs where the global-offset path would also be used
    monkeypatch.setattr(aft, "_SAFE_GAP", {torch.float64: -1.0, torch.float32: -1.0})
    n, c = 23, 5
    q, k, v = _x(2, n, c), _x(2, n, c, seed=1) * 3, _x(2, n, c, seed=2)
    corr = torch.expm1(_x(n, 7, seed=3) * 0.3) if per_position else torch.expm1(_x(7, c, seed=3) * 0.3)
    got = aft.aft_windowed(q, k, v, corr, causal=True, per_position=per_position, block=6)
    ref = aft.aft_reference(q, k, v, aft.window_bias_matrix(corr, n, per_position=per_position), causal=True)
    assert_close(got, ref)


@pytest.mark.parametrize("cls", [M.AFTFull, M.AFTLocal, M.AFTConv])
def test_causal_aft_modules_survive_inputs_scaled_by_100_after_token_20(cls):
    torch.manual_seed(0)
    mixer = cls(16, causal=True, **({"max_len": 64} if cls is not M.AFTConv else {}))
    x = _x(2, 48, 16, dtype=torch.float32)
    base = mixer(x)
    x2 = x.clone()
    x2[:, 20:] *= 100
    out = mixer(x2)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :20], base[:, :20], atol=1e-5, rtol=1e-5)
    ref = mixer.to(D64).reference(x2.double())
    torch.testing.assert_close(out.double(), ref, atol=5e-4, rtol=2e-4)  # float32 at |y| ~ 80


@pytest.mark.parametrize("cls", [M.AFTLocal, M.AFTConv])
def test_aft_windowed_decoding_steps_equal_the_causal_forward(cls):
    mixer = _build(cls, window=4, causal=True)
    x = _x(2, 11, 16)
    state, ys = None, []
    for t in range(11):
        y, state = mixer.step(x[:, t], state)
        ys.append(y)
    assert_close(torch.stack(ys, 1), mixer(x))


@pytest.mark.parametrize("causal", [False, True])
def test_aft_local_with_a_window_covering_the_sequence_is_aft_full(causal):
    n, s = 9, 12
    mixer = _build(M.AFTLocal, max_len=32, window=s, causal=causal)
    x = _x(2, n, 16)
    q, k, v = mixer.qkv(x).chunk(3, dim=-1)
    # the dense biases w[t, t'] = w_local[t, t' - t + s - 1]
    w = torch.stack([mixer.w[t, torch.arange(n) - t + s - 1] for t in range(n)])
    assert_close(mixer(x), mixer.out(aft.aft_reference(q, k, v, w, causal=causal)))


# ---- F2 Mega ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 50, 129])
def test_mega_ema_recurrence_equals_fft_convolution(n):
    mixer = _build(M.Mega, ema_dim=3)
    p, q, g = mixer.ema_coefficients()
    u = _x(2, n, 16)
    expected, h_last = scan.ema_reference(u, p, q, g)
    assert_close(scan.ema_fft(u, p, q, g), expected)
    for chunk in (1, 7, 32):
        assert_close(scan.ema_chunked(u, p, q, g, chunk=chunk), expected)
    h, ys = None, []
    for t in range(n):
        y, h = mixer.ema_step(u[:, t], h)
        ys.append(y)
    assert_close(torch.stack(ys, 1), expected)
    assert_close(h, h_last)


@pytest.mark.parametrize("causal", [False, True])
def test_mega_chunk_equal_to_length_is_full_mega(causal):
    x = _x(2, 21, 16)
    full = _build(M.Mega, chunk_size=None, causal=causal)
    chunked = _build(M.Mega, chunk_size=21, causal=causal)
    chunked.load_state_dict(full.state_dict())
    assert_close(chunked(x), full(x))
    assert_close(full(x), full.reference(x))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 7])
def test_mega_chunked_equals_block_local_masked_mega(causal, chunk):
    mixer = _build(M.Mega, chunk_size=chunk, causal=causal)
    x = _x(2, 30, 16)  # 30 is not a multiple of 4 or 7: a padded last chunk
    assert_close(mixer(x), mixer.reference(x))


# ---- F3, F4 channel attention ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [3, 300])
def test_xca_map_is_dh_by_dh_whatever_the_length(n):
    mixer = _build(M.XCA, dim=24, num_heads=3)
    a = mixer.attention_map(_x(2, n, 24))
    assert a.shape == (2, 3, 8, 8)
    assert_close(a.sum(-1), torch.ones(2, 3, 8, dtype=D64))


@pytest.mark.parametrize("cls", [M.XCA, M.ChannelGroupAttention, M.SwiftFormerMixer])
def test_channel_and_pooling_mixers_are_token_permutation_equivariant(cls):
    mixer = _build(cls, dim=16)
    x = _x(2, 17, 16)
    perm = torch.randperm(17, generator=torch.Generator().manual_seed(1))
    assert_close(mixer(x[:, perm]), mixer(x)[:, perm])


def test_xca_map_is_unchanged_by_token_permutation():
    mixer = _build(M.XCA, dim=16)
    x = _x(2, 17, 16)
    perm = torch.randperm(17, generator=torch.Generator().manual_seed(1))
    assert_close(mixer.attention_map(x[:, perm]), mixer.attention_map(x))


# ---- F5 lambda ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [3, 20])
def test_lambda_convolution_equals_explicit_position_lambdas(n):
    mixer = _build(M.LambdaLayer, dim=16, num_heads=2, key_dim=4, receptive_field=7)
    x = _x(2, n, 16)
    assert_close(mixer(x), mixer.reference(x))


def test_lambda_content_lambda_is_shared_by_every_query():
    # The content part alone (position embedding zeroed) is q_n^T lambda_c with one lambda_c for all n:
    # queries that are equal give equal outputs wherever they are.
    mixer = _build(M.LambdaLayer, dim=16, num_heads=2, key_dim=4, receptive_field=5)
    with torch.no_grad():
        mixer.embedding.zero_()
    x = _x(1, 12, 16)
    x[:, 9] = x[:, 2]
    y = mixer(x)
    assert_close(y[:, 9], y[:, 2])


# ---- F6, F7 light, dynamic and span-based convolutions -------------------------------------------------------

def test_lightconv_kernel_is_softmax_normalised_and_shared_per_head():
    mixer = _build(M.LightConv, dim=16, num_heads=4, kernel_size=5)
    assert_close(mixer.kernel().sum(-1), torch.ones(4, dtype=D64))
    # An impulse in every channel: each head's channels show the same (normalised) kernel.
    x = torch.zeros(1, 11, 16, dtype=D64)
    x[:, 5] = 1.0
    y = dynconv.lightconv(x, mixer.weight)
    resp = y[0, 3:8].t().reshape(4, 4, 5)  # [head, channel in head, tap]
    assert_close(resp, resp[:, :1].expand_as(resp))
    assert_close(resp.sum(-1), torch.ones(4, 4, dtype=D64))


@pytest.mark.parametrize("k", [1, 4, 5])
@pytest.mark.parametrize("causal", [False, True])
def test_lightconv_unfold_equals_conv1d(k, causal):
    x, w = _x(2, 13, 8), _x(2, k, seed=1)
    expected = dynconv.lightconv_reference(x, w, causal=causal)  # unfold
    assert_close(dynconv.lightconv(x, w, causal=causal), expected)  # shifted products
    grouped = torch.softmax(w, -1).repeat_interleave(4, dim=0)[:, None]  # [C, 1, k], shared per head
    left = dynconv.pad_left(k, causal)
    conv = torch.nn.functional.conv1d(torch.nn.functional.pad(x.transpose(1, 2), (left, k - 1 - left)), grouped,
                                      groups=8)
    assert_close(conv.transpose(1, 2), expected)


@pytest.mark.parametrize("cls", [M.LightConv, M.DynamicConv])
def test_causal_conv_sees_only_the_last_k_inputs(cls):
    mixer = _build(cls, dim=8, num_heads=2, kernel_size=3, causal=True)
    x = _x(1, 10, 8).requires_grad_(True)
    mixer(x)[0, 6].sum().backward()
    touched = x.grad[0].abs().sum(-1) > 0
    assert touched.tolist() == [i in (4, 5, 6) for i in range(10)]


@pytest.mark.parametrize("cls", [M.LightConv, M.DynamicConv])
def test_conv_decoding_steps_equal_the_causal_forward(cls):
    mixer = _build(cls, dim=8, num_heads=2, kernel_size=4, causal=True)
    x = _x(2, 9, 8)
    window, ys = None, []
    for t in range(9):
        y, window = mixer.step(x[:, t], window)
        ys.append(y)
    assert_close(torch.stack(ys, 1), mixer(x))


def test_convbert_kernels_sum_to_one_and_all_attention_heads_is_mha():
    mixer = _build(M.ConvBERTMixer, dim=16, num_heads=4, conv_heads=2, kernel_size=5)
    _, _, kernels = mixer._parts(_x(2, 9, 16), conv_direct)
    assert_close(kernels.sum(-1), torch.ones(2, 9, 2, dtype=D64))

    attn_only = _build(M.ConvBERTMixer, dim=16, num_heads=4, conv_heads=0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True).to(D64)
    with torch.no_grad():
        mha.in_proj_weight.copy_(attn_only.qkv.weight)
        mha.in_proj_bias.copy_(attn_only.qkv.bias)
        mha.out_proj.weight.copy_(attn_only.out.weight)
        mha.out_proj.bias.copy_(attn_only.out.bias)
    x = _x(2, 9, 16)
    assert_close(attn_only(x), mha(x, x, x, need_weights=False)[0])


def test_swiftformer_pooling_weights_sum_to_one():
    mixer = _build(M.SwiftFormerMixer, dim=16)
    assert_close(mixer.pooling_weights(_x(3, 21, 16)).sum(1), torch.ones(3, dtype=D64))


# ---- F9-F11, F19 2-D convolutions ----------------------------------------------------------------------------

def test_lka_receptive_field_is_the_composed_support():
    # K = 21, d = 3: a 5x5 conv then a 7x7 conv dilated by 3, whose support is 4 + 18 + 1 = 23 wide
    # (the paper calls it a 21 x 21 kernel; the composition reaches one tap further on each side).
    mixer = _build(M.LargeKernelAttention, dim=2)
    x = torch.zeros(1, 41, 41, 2, dtype=D64)
    x[0, 20, 20] = 1.0
    with torch.no_grad():
        a = dwconv2d(dwconv2d(x, mixer.conv0), mixer.conv_spatial, dilation=3)
    rows, cols = torch.nonzero(a[0].abs().sum(-1) > 0, as_tuple=True)
    assert (rows.min().item(), rows.max().item(), cols.min().item(), cols.max().item()) == (9, 31, 9, 31)


def test_depthwise_conv_is_translation_equivariant_with_circular_padding():
    x, w = _x(2, 9, 8, 3), _x(3, 1, 5, 5, seed=1)
    y = dwconv2d(x, w, padding_mode="circular")
    shifted = dwconv2d(torch.roll(x, (2, 3), dims=(1, 2)), w, padding_mode="circular")
    assert_close(shifted, torch.roll(y, (2, 3), dims=(1, 2)))
    assert_close(y, dwconv2d_reference(x, w, padding_mode="circular"))


def test_lkca_convolution_equals_its_attention_matrix_on_a_non_square_grid():
    mixer = _build(M.LKCA, dim=4, kernel_size=5)
    x = _x(2, 5, 7, 4)
    assert_close(mixer(x), mixer.reference(x))


def test_parcnet_sees_the_whole_axis_and_is_not_translation_equivariant():
    mixer = _build(M.ParCNetV2Mixer, dim=4, size=6)
    x = _x(1, 6, 6, 4).requires_grad_(True)
    mixer(x)[0, 0, 0].sum().backward()
    # along H (column 0) and along W (row 0) every input position reaches output (0, 0)
    assert (x.grad[0, :, 0].abs().sum(-1) > 0).all() and (x.grad[0, 0, :].abs().sum(-1) > 0).all()
    with torch.no_grad():
        y, ys = mixer(x), mixer(torch.roll(x, 1, dims=1))
    assert (ys - torch.roll(y, 1, dims=1)).abs().max() > 1e-3


def test_parcnet_resamples_its_kernels_to_other_sizes():
    mixer = _build(M.ParCNetV2Mixer, dim=4, size=6)
    x = _x(2, 4, 9, 4)
    assert_close(mixer(x), mixer.reference(x))


# ---- F12, F13 spectral mixers --------------------------------------------------------------------------------

def test_spectral_filter_equals_circular_convolution():
    from attnkit.ops.mixers._common import circular_conv2d_reference

    x, kernel = _x(2, 6, 5, 3), _x(6, 5, 3, seed=1)
    mask = torch.fft.rfft2(kernel, dim=(0, 1))
    assert_close(spectral_filter(x, mask), circular_conv2d_reference(x, kernel))


def test_aff_with_unit_mask_is_the_identity():
    mixer = _build(M.AdaptiveFrequencyFilter, dim=8, groups=2)
    with torch.no_grad():
        mixer.w2.zero_()  # the mask is then its bias: 1 + 0i
    x = _x(2, 6, 7, 8)
    assert_close(mixer(x), x)
    assert_close(mixer.reference(x), x)


def test_spectformer_all_ones_filter_is_the_identity_and_gate_is_circular_conv():
    from attnkit.ops.mixers._common import circular_conv2d_reference

    mixer = _build(M.SpectralGating, dim=3, size=6)
    x = _x(2, 6, 6, 3)
    with torch.no_grad():
        mixer.weight[..., 0] = 1.0
        mixer.weight[..., 1] = 0.0
    assert_close(mixer(x), x)
    with torch.no_grad():
        kernel = _x(6, 6, 3, seed=2)
        spec = torch.fft.rfft2(kernel, dim=(0, 1))
        mixer.weight.copy_(torch.stack([spec.real, spec.imag], -1))
    assert_close(mixer(x), circular_conv2d_reference(x, kernel))


# ---- F14 PoNet -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 5, 17])
def test_ponet_local_max_equals_max_pool_with_same_padding(n):
    mixer = _build(M.PoNetMixer, dim=8, segment=4, local_window=5)
    x = _x(2, n, 8)
    assert mixer(x).shape == x.shape
    assert_close(mixer(x), mixer.reference(x))


# ---- F15 Hrrformer ---------------------------------------------------------------------------------------------

def test_hrr_unbinding_recovers_the_bound_vector():
    q, v = hrr.project(_x(5, 16)), _x(5, 16, seed=1)
    bound = hrr.bind(q, v)
    assert_close(hrr.bind(hrr.involution(q), bound), v)
    assert_close(bound, hrr.bind_reference(q, v))


def test_hrr_decoding_steps_equal_the_causal_forward():
    mixer = _build(M.HrrformerMixer, dim=16, num_heads=2, causal=True)
    x = _x(2, 11, 16)
    state, ys = None, []
    for t in range(11):
        y, state = mixer.step(x[:, t], state)
        ys.append(y)
    assert_close(torch.stack(ys, 1), mixer(x))
    assert_close(mixer(x), mixer.reference(x))


# ---- F16, F17 continuous kernels -----------------------------------------------------------------------------

@pytest.mark.parametrize("left", [0, 3, 99])
def test_fft_convolution_equals_direct_convolution(left):
    x, k = _x(2, 100, 4), _x(100 if left < 99 else 199, 4, seed=1)
    left = min(left, k.shape[0] - 1)
    expected = conv_reference(x, k, left)
    assert_close(conv_fft(x, k, left), expected)
    assert_close(conv_direct(x, k, left), expected)


@pytest.mark.parametrize("causal", [False, True])
def test_ckconv_fft_equals_direct_and_kernel_is_resolution_consistent(causal):
    mixer = _build(M.CKConv, dim=4, ref_len=64, causal=causal)
    x = _x(2, 70, 4)
    assert_close(mixer(x), mixer.reference(x))
    coarse = mixer.kernel_at(torch.arange(10, dtype=D64))
    fine = mixer.kernel_at(torch.arange(0, 10, 0.5, dtype=D64))
    assert_close(fine[::2], coarse)  # a finer sampling adds taps between, it does not move the old ones


def test_smpconv_point_on_the_grid_with_small_radius_is_a_one_hot_tap():
    mixer = _build(M.SMPConv, dim=1, kernel_size=9, num_points=1)
    grid = mixer.coordinates()
    with torch.no_grad():
        mixer.points.fill_(grid[6].item())
        mixer.radii.fill_(0.5 * (grid[1] - grid[0]).item())
        mixer.weights.fill_(2.0)
    expected = torch.zeros(9, 1, dtype=D64)
    expected[6] = 2.0
    assert_close(mixer.kernel(), expected)
    assert_close(mixer.kernel_reference(), expected)


def test_smpconv_kernel_is_differentiable_in_point_positions_and_long_kernels_use_fft():
    mixer = _build(M.SMPConv, dim=3, kernel_size=81, num_points=4)
    mixer.kernel().square().sum().backward()
    assert mixer.points.grad.abs().sum() > 0 and mixer.radii.grad.abs().sum() > 0
    x = _x(2, 100, 3)
    assert_close(mixer(x), mixer.reference(x))


# ---- F18 Mamba-ND -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 5, 8, 100])
def test_chunked_selective_scan_equals_the_sequential_recurrence(chunk):
    b, n, e, N = 2, 37, 5, 3
    x, dt = _x(b, n, e), _x(b, n, e, seed=1).abs()
    A, B, C = -_x(e, N, seed=2).abs(), _x(b, n, N, seed=3), _x(b, n, N, seed=4)
    expected, _ = scan.selective_scan_reference(x, dt, A, B, C)
    assert_close(scan.selective_scan_chunked(x, dt, A, B, C, chunk=chunk), expected)


@pytest.mark.parametrize("order", M.SCAN_ORDERS)
@pytest.mark.parametrize("shape", [(11,), (4, 5), (2, 3, 4)])
def test_mamba_nd_scan_equals_sequential_recurrence_for_every_order(order, shape):
    mixer = _build(M.MambaND, dim=8, state_size=4, order=order, chunk=3)
    x = _x(2, *shape, 8)
    assert_close(mixer(x), mixer.reference(x))


def test_mamba_nd_reversed_order_is_the_flipped_forward_scan():
    fwd = _build(M.MambaND, dim=8, state_size=4)
    bwd = _build(M.MambaND, dim=8, state_size=4, order="backward")
    bwd.load_state_dict(fwd.state_dict())
    x = _x(2, 13, 8)
    assert_close(bwd(x), fwd(x.flip(1)).flip(1))
    x2 = _x(2, 3, 4, 8)
    tr = _build(M.MambaND, dim=8, state_size=4, order="transposed")
    tr.load_state_dict(fwd.state_dict())
    assert_close(tr(x2), fwd(x2.transpose(1, 2)).transpose(1, 2))


def test_mamba_decoding_steps_equal_the_causal_forward():
    mixer = _build(M.MambaND, dim=8, state_size=4, causal=True)
    x = _x(2, 12, 8)
    state, ys = None, []
    for t in range(12):
        y, state = mixer.step(x[:, t], state)
        ys.append(y)
    assert_close(torch.stack(ys, 1), mixer(x))


# ---- F20 Extractor ------------------------------------------------------------------------------------------------

def test_extractor_fft_path_equals_the_materialised_prefix_sum():
    mixer = _build(M.Extractor, dim=4, max_len=80)
    x = _x(2, 100, 4)  # longer than max_len: lags >= 80 weigh nothing
    assert_close(mixer(x), mixer.reference(x))


def test_half_precision_fft_paths_return_the_input_dtype():
    x = _x(1, 20, 4, dtype=torch.float16)
    k = torch.randn(20, 4, dtype=torch.float16)
    assert conv_fft(x, k).dtype == torch.float16


# ---- `attnkit bench` runs mixers at the width of the attention runs ------------------------------------------

@pytest.mark.parametrize("backward", [False, True])
def test_bench_measures_mixers_beside_sdpa(backward):
    from attnkit.bench import BenchConfig, run_benchmark

    cfg = BenchConfig(mechanisms=["aft_simple", "lka"], seq_lens=[16, 36], heads=2, head_dim=8, repeats=1,
                      cell_budget_s=0.05, time_budget_s=60, flex=False, memory=False, error_rows=4,
                      causal="both", backward=backward)
    doc = run_benchmark(cfg, progress=False)
    cells = {(c["label"], c["seq_len"]): c for c in doc["results"]}
    for label in ("aft_simple", "aft_simple causal", "lka", "sdpa"):
        for n in (16, 36):
            assert cells[(label, n)]["status"] == "ok", cells[(label, n)]["message"]
    assert cells[("lka causal", 16)]["status"] == "unsupported"
    assert cells[("aft_simple causal", 36)]["state_bytes"] == 3 * 16 * 4  # three running [dim] vectors
    assert cells[("aft_simple", 36)]["state_bytes"] is None  # no decoding without the causal form
    assert cells[("aft_simple", 36)]["flops"] > 0 and cells[("aft_simple", 36)]["vs_sdpa"] is not None
    assert cells[("aft_simple", 36)]["error"] is None  # no softmax to compare a mixer with


def test_causal_aft_simple_is_not_disturbed_by_a_huge_later_key():
    """A large key at the end must not underflow (NaN) or change the earlier outputs: the causal form never
    shifts by a maximum that includes later tokens (found by review: a key of 120 gave NaN at positions 0-2)."""
    from attnkit.ops.mixers import aft

    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(3, 2, 40, 6, generator=g).unbind(0)
    base = aft.aft_simple(q, k, v, causal=True)
    k2 = k.clone()
    k2[:, -1] = 120.0
    out = aft.aft_simple(q, k2, v, causal=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :-1], base[:, :-1])
    ref = aft.aft_reference(q.double(), k2.double(), v.double(), causal=True)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-4)  # float32 against float64
