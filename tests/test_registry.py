import pytest

import attnkit


def test_unknown_mechanism_lists_known_names():
    with pytest.raises(ValueError, match="known mechanisms") as info:
        attnkit.get("no-such-mechanism")
    assert "did you mean" not in str(info.value)
    # close matches first; still a KeyError for code written against the earlier behaviour
    with pytest.raises(ValueError, match=r"did you mean 'performer'") as info:
        attnkit.get("performr")
    assert isinstance(info.value, KeyError) and isinstance(info.value, attnkit.errors.UnknownMechanismError)
    assert str(info.value).startswith("no mechanism named 'performr'")  # not quoted as KeyError would
    with pytest.raises(KeyError):
        attnkit.mechanism_info("sliding-window")


def test_records_are_complete():
    for m in attnkit.list_mechanisms():
        assert m.name and m.family and m.paper and m.complexity
        assert isinstance(m.exact, bool) and isinstance(m.causal, bool)


def test_mistyped_keyword_lists_accepted_parameters():
    """A typo names the mechanism, the close match and what it accepts, not an internal ``<lambda>()``."""
    with pytest.raises(TypeError) as info:
        attnkit.get("sliding_window", windw=3)
    text = str(info.value)
    assert "<lambda>" not in text and "'sliding_window'" in text and "did you mean 'window'" in text
    assert "window=256" in text
    with pytest.raises(TypeError, match=r"did you mean 'proj_len'.*required: seq_len, num_heads"):
        attnkit.get("linformer", seq_len=16, num_heads=2, proj_ln=4)
    with pytest.raises(TypeError, match=r"'aft_simple': unknown parameters 'foo'.*required: dim"):
        attnkit.get("aft_simple", dim=8, foo=1)
    with pytest.raises(TypeError, match="did you mean 'num_landmarks'"):
        attnkit.get("nystrom", num_landmark=3)


def test_every_listed_name_works_in_multihead_attention():
    """Every name `attnkit list` offers either runs inside ``nn.MultiheadAttention`` (a mixer in the layer's place,
    x -> x) or is refused with a ValueError that names what to use instead (issue 27: 48 mixers raised a bare
    ``KeyError: 'dim'``)."""
    import inspect

    import torch

    from attnkit.nn import MultiheadAttention

    refused = {}
    for m in attnkit.list_mechanisms():
        try:
            causal_default = inspect.signature(m.factory).parameters["causal"].default is True
        except (KeyError, TypeError, ValueError):
            causal_default = False
        torch.manual_seed(0)
        try:
            layer = MultiheadAttention(32, 4, mechanism=m.name, causal=causal_default, max_seq_len=64,
                                       mechanism_kwargs=dict(m.small_params))
        except ValueError as exc:
            refused[m.name] = str(exc)
            continue
        y = layer(torch.randn(2, 64, 32))
        assert y.shape == (2, 64, 32), m.name
        if m.kind == "mixer":
            assert layer.is_mixer and layer.q_proj is None
    grids = {n for n, m in ((m.name, m) for m in attnkit.list_mechanisms()) if m.kind == "mixer"
             and m.example_inputs is not None
             and m.example_inputs(batch=1, seq_len=4, dtype=torch.float32, seed=0, heads=2, head_dim=4)[0].dim() != 3}
    assert grids and set(refused) == grids, set(refused) ^ grids
    for name in grids:
        assert "attnkit.nn." in refused[name] and "grid" in refused[name], refused[name]


def test_mixer_layer_refuses_attention_only_arguments():
    import torch

    from attnkit.nn import MultiheadAttention

    layer = MultiheadAttention(16, 2, mechanism="aft_simple")
    with pytest.raises(ValueError, match="token mixer"):
        layer(torch.randn(1, 4, 16), context=torch.randn(1, 4, 16))
    with pytest.raises(ValueError, match="token mixer"):
        MultiheadAttention(16, 2, mechanism="aft_simple", rotary=True)
    layer = MultiheadAttention(16, 2, mechanism="dynamic_conv")  # num_heads passed where the mixer takes it
    assert layer.inner.num_heads == 2 if hasattr(layer.inner, "num_heads") else True


def test_head_ablation_refuses_a_mixer_layer():
    import torch

    from attnkit.analysis.heads import ablate_heads
    from attnkit.nn import MultiheadAttention

    model = torch.nn.Sequential(MultiheadAttention(16, 2, mechanism="aft_simple"))
    with pytest.raises(ValueError, match="token mixer 'aft_simple'"):
        with ablate_heads(model, {model[0]: [0]}):
            pass
