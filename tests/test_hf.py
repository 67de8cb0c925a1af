"""attnkit inside Hugging Face transformers models (``attnkit.integrations.transformers``).

Tiny models built from configs (Llama with grouped-query attention, Mistral with a sliding window, GPT-2, ViT);
nothing is downloaded. The first tests check that attnkit's registered ``"softmax"`` reproduces the models' own
eager / sdpa attention, masks included; the rest check decoding with the model's cache and attnkit's recurrent
state, conversion, and attention transfer.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    ViTConfig,
)

import attnkit  # noqa: E402
from attnkit.errors import NotSupportedError  # noqa: E402
from attnkit.integrations import transformers as akt  # noqa: E402
from attnkit.testing import assert_close  # noqa: E402

VOCAB = 64


def llama_config(layers: int = 2) -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def mistral_config() -> MistralConfig:
    return MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                         max_position_embeddings=128)


def gpt2_config(**kw) -> GPT2Config:
    kw = {"attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0, **kw}
    return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=1,
                      eos_token_id=2, **kw)


def vit_config() -> ViTConfig:
    return ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64, num_labels=5)


def build(cfg, impl: str, auto=AutoModelForCausalLM, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    return auto.from_config(copy.deepcopy(cfg), attn_implementation=impl).to(dtype).eval()


def twins(cfg, ref_impl: str, auto=AutoModelForCausalLM, dtype=torch.float32):
    """The same weights with the model's own attention and with attnkit's ``softmax``."""
    ref = build(cfg, ref_impl, auto, dtype=dtype)
    ours = build(cfg, akt.register("softmax"), auto, seed=1, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def token_ids(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, n), generator=g)  # 0..2 stay free for pad / bos / eos


def left_padding(batch: int, n: int, pads: list[int]) -> torch.Tensor:
    mask = torch.ones(batch, n, dtype=torch.long)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
    return mask


def generate(model, ids, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(ids, do_sample=False, pad_token_id=0, **kw)


# ------------------------------------------------------------------------------------------------------------
# "softmax" reproduces the model's own attention
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ref_impl", ["eager", "sdpa"])
def test_softmax_reproduces_llama_logits_gqa(ref_impl):
    ref, ours = twins(llama_config(), ref_impl)
    ids = token_ids(2, 13)
    with torch.no_grad():
        assert_close(ours(ids).logits, ref(ids).logits, dtype=torch.float32)


def test_softmax_reproduces_llama_in_float64_tightly():
    # against sdpa: eager computes its softmax in float32 even for float64 models
    ref, ours = twins(llama_config(), "sdpa", dtype=torch.float64)
    ids = token_ids(2, 13)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ref_impl", ["eager", "sdpa"])
def test_softmax_reproduces_left_padded_batch(ref_impl):
    ref, ours = twins(llama_config(), ref_impl)
    ids, mask = token_ids(3, 10), left_padding(3, 10, [0, 3, 9])
    with torch.no_grad():
        a, b = ref(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
    valid = mask.bool()
    assert_close(b[valid], a[valid], dtype=torch.float32)
    assert torch.isfinite(b).all()  # attnkit gives fully masked (padding) rows zeros, never NaN


def test_softmax_reproduces_custom_float_and_bool_masks():
    """A 4-D mask the caller builds is used as is: float masks are additive (eager), bool masks select (sdpa)."""
    ref_e, ours = twins(llama_config(), "eager")
    ref_s = build(llama_config(), "sdpa")
    ref_s.load_state_dict(ref_e.state_dict())
    ids = token_ids(2, 9)
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(2, 1, 9, 9, generator=g)
    keep = torch.rand(2, 1, 9, 9, generator=g) < 0.7
    keep |= torch.eye(9, dtype=torch.bool)  # every query keeps a key
    with torch.no_grad():
        assert_close(ours(ids, attention_mask=bias).logits, ref_e(ids, attention_mask=bias).logits,
                     dtype=torch.float32)
        assert_close(ours(ids, attention_mask=keep).logits, ref_s(ids, attention_mask=keep).logits,
                     dtype=torch.float32)


def test_softmax_generate_matches_llama_with_padding():
    ref, ours = twins(llama_config(), "eager")
    ids, mask = token_ids(2, 7), left_padding(2, 7, [0, 3])
    out_ref = generate(ref, ids, attention_mask=mask, max_new_tokens=8, output_scores=True,
                       return_dict_in_generate=True)
    out = generate(ours, ids, attention_mask=mask, max_new_tokens=8, output_scores=True,
                   return_dict_in_generate=True)
    assert torch.equal(out.sequences, out_ref.sequences)
    assert_close(torch.stack(out.scores), torch.stack(out_ref.scores), dtype=torch.float32)


def test_softmax_mistral_sliding_window_prefill_and_generate():
    cfg = mistral_config()
    ref, ours = twins(cfg, "eager")
    ids = token_ids(2, 11)  # longer than the window of 4
    with torch.no_grad():
        assert_close(ours(ids).logits, ref(ids).logits, dtype=torch.float32)
    seq_ref = generate(ref, ids, max_new_tokens=7)
    seq = generate(ours, ids, max_new_tokens=7)
    assert torch.equal(seq, seq_ref)
    # the window matters: full causal attention gives other logits
    full = build(llama_config(), "eager")
    assert full is not None
    with torch.no_grad():
        windowless = copy.deepcopy(ref)
        windowless.config.sliding_window = None
        assert not torch.allclose(windowless(ids).logits, ref(ids).logits, atol=1e-4)


@pytest.mark.parametrize("inverse_layer_scale", [False, True])
def test_softmax_reproduces_gpt2_with_padding_and_generate(inverse_layer_scale):
    cfg = gpt2_config(scale_attn_by_inverse_layer_idx=inverse_layer_scale)
    ref, ours = twins(cfg, "sdpa")
    ids, mask = token_ids(2, 10), left_padding(2, 10, [0, 4])
    with torch.no_grad():
        assert_close(ours(ids).logits, ref(ids).logits, dtype=torch.float32)
        a, b = ref(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
    assert_close(b[mask.bool()], a[mask.bool()], dtype=torch.float32)
    assert torch.equal(generate(ours, ids, attention_mask=mask, max_new_tokens=6),
                       generate(ref, ids, attention_mask=mask, max_new_tokens=6))


def test_softmax_reproduces_vit_and_switching_an_existing_model():
    ref, ours = twins(vit_config(), "eager", auto=AutoModelForImageClassification)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(x).logits
        assert_close(ours(x).logits, expected, dtype=torch.float32)
        ref.set_attn_implementation(akt.register("softmax"))  # switch the eager model itself
        assert ref.config._attn_implementation == "attnkit_softmax"
        assert_close(ref(x).logits, expected, dtype=torch.float32)
        ref.set_attn_implementation(akt.register("performer", num_features=64))  # bidirectional mechanism
        approx = ref(x).logits
    assert torch.isfinite(approx).all() and not torch.allclose(approx, expected, atol=1e-6)


def test_scaling_is_folded_into_queries_for_other_mechanisms():
    """GPT-2 with scale_attn_by_inverse_layer_idx scales scores by 1 / (sqrt(d) (layer + 1)); an exact mechanism
    (a causal window wider than the sequence) must see that scale and reproduce softmax."""
    cfg = gpt2_config(scale_attn_by_inverse_layer_idx=True)
    ref = build(cfg, "eager")
    ours = build(cfg, akt.register("sliding_window", window=64))
    ours.load_state_dict(ref.state_dict())
    ids = token_ids(2, 12)
    with torch.no_grad():
        assert_close(ours(ids).logits, ref(ids).logits, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------------------
# Decoding with other mechanisms: the model's cache plus attnkit's recurrent state
# ------------------------------------------------------------------------------------------------------------

def _stepwise_logits(model, seq: torch.Tensor, prompt: int) -> torch.Tensor:
    """Prefill ``prompt`` tokens, then feed the rest one by one with the model's cache."""
    with torch.no_grad():
        out = model(seq[:, :prompt], use_cache=True)
        cache, logits = out.cache, [out.logits[:, -1]]
        for t in range(prompt, seq.shape[1] - 1):
            out = model(seq[:, t:t + 1], cache=cache, use_cache=True)
            cache = out.cache
            logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


@pytest.mark.parametrize("mechanism,params", [
    ("hedgehog", {}), ("lightning", {}), ("performer", {"num_features": 16}), ("sliding_window", {"window": 3}),
])
def test_generate_with_cache_equals_full_recompute(mechanism, params):
    model = build(llama_config(), "sdpa")
    attnkit.convert(model, mechanism, **params)
    ids = token_ids(2, 6)
    seq = generate(model, ids, max_new_tokens=7)
    assert torch.equal(seq, generate(model, ids, max_new_tokens=7, use_cache=False))
    with torch.no_grad():
        full = model(seq, use_cache=False).logits
    assert_close(_stepwise_logits(model, seq, 6), full[:, 5:-1], dtype=torch.float32)
    if mechanism in ("hedgehog", "lightning", "performer"):  # linear: the layer carried its O(1) state
        state = model.model.layers[0].self_attn.attnkit_attention._state
        assert state is not None and state.offset == seq.shape[1] - 1
        assert state.S.shape[1] == 4  # query heads; the keys were grouped (2 kv heads)


def test_linear_state_is_rebuilt_from_the_cache_when_lost():
    model = build(llama_config(), "sdpa")
    attnkit.convert(model, "linear_elu")
    seq = token_ids(2, 9)
    with torch.no_grad():
        full = model(seq, use_cache=False).logits
        out = model(seq[:, :5], use_cache=True)
        for layer in akt.converted_layers(model):
            layer.reset_state()
        with pytest.warns(UserWarning, match="rebuilding the recurrent state"):
            step = model(seq[:, 5:6], cache=out.cache, use_cache=True).logits[:, -1]
    assert_close(step, full[:, 5], dtype=torch.float32)


def test_gpt2_converted_generate():
    model = build(gpt2_config(), "sdpa")
    attnkit.convert(model, "hedgehog", layers=[-1])
    ids = token_ids(2, 6)
    assert torch.equal(generate(model, ids, max_new_tokens=6), generate(model, ids, max_new_tokens=6,
                                                                          use_cache=False))


# ------------------------------------------------------------------------------------------------------------
# convert, errors, attention transfer
# ------------------------------------------------------------------------------------------------------------

def test_convert_keeps_weights_and_only_chosen_layers():
    model = build(llama_config(layers=3), "sdpa")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attnkit.convert(model, "hedgehog", layers=[1])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    added = sorted(set(after) - set(before))
    assert added and all(k.startswith("model.layers.1.self_attn.attnkit_attention.") for k in added)
    assert model.config._attn_implementation == "attnkit"
    labels = [m.label for m in akt.converted_layers(model)]
    assert labels == ["model.layers.1.self_attn"]
    # "softmax" on every layer restores the model exactly
    ref = build(llama_config(layers=3), "eager")
    ref.load_state_dict(before)
    attnkit.convert(model, "softmax")
    ids = token_ids(2, 8)
    with torch.no_grad():
        assert_close(model(ids).logits, ref(ids).logits, dtype=torch.float32)


def test_bad_input_names_the_fix():
    model = build(llama_config(), "sdpa")
    with pytest.raises(ValueError, match="layers"):
        attnkit.convert(model, "hedgehog", layers=[5])
    with pytest.raises(KeyError, match="no mechanism named"):
        akt.register("no_such_mechanism")
    with pytest.raises(ValueError, match="softmax' takes no parameters"):
        akt.register("softmax", window=3)
    with pytest.raises(ValueError, match="attention modules|no attention module"):
        attnkit.convert(torch.nn.Linear(2, 2), "hedgehog")
    attnkit.convert(model, "hedgehog")
    ids, mask = token_ids(2, 8), left_padding(2, 8, [0, 2])
    with torch.no_grad(), pytest.raises(NotSupportedError, match="padding"):
        model(ids, attention_mask=mask)
    drop = build(gpt2_config(attn_pdrop=0.1), "sdpa").train()
    attnkit.convert(drop, "softmax")
    with pytest.raises(NotSupportedError, match="dropout"):
        drop(ids)
    with pytest.raises(TypeError, match="token ids"):
        akt.perplexity(model, torch.randn(2, 8))


def test_text_ships_with_the_package():
    text = akt.sample_text()
    assert len(text) > 20_000 and text == akt.sample_text()
    seqs = akt.byte_sequences(text, 32)
    assert seqs.dtype == torch.long and seqs.shape[1] == 32 and int(seqs.max()) < 256
    assert bytes(seqs[0].tolist()).decode("utf-8", "ignore") in text
    with pytest.raises(ValueError, match="seq_len"):
        akt.byte_sequences(text, 1)


def _pretrained_tiny_llama(steps: int = 60):
    """A tiny Llama trained briefly on the package's own text, so that its attention is not uniform."""
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = build(cfg, "sdpa")
    data = akt.byte_sequences(akt.sample_text(), 32)
    akt.finetune(model, data[:-16], steps=steps, lr=3e-3, batch_size=16, progress=False)
    return model, data[:-16], data[-16:]


@pytest.mark.parametrize("loss", ["hedgehog", "mse"])
def test_distillation_reduces_attention_error(loss):
    model, train, held_out = _pretrained_tiny_llama()
    attnkit.convert(model, "hedgehog")
    before = akt.attention_errors(model, held_out)
    losses = akt.distill(model, train, steps=25, lr=3e-2, loss=loss, progress=False)
    after = akt.attention_errors(model, held_out)
    assert set(before) == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    assert sum(losses[-5:]) < sum(losses[:5])
    assert all(after[k] < 0.85 * before[k] for k in before), (before, after)
    # only the feature maps trained: the model's own weights are untouched and trainable again afterwards
    assert all(p.requires_grad for p in model.parameters())


def test_attention_transfer_reports_before_and_after():
    model, train, held_out = _pretrained_tiny_llama(steps=40)
    report = akt.attention_transfer(model, train, held_out, mechanism="hedgehog", layers=[0], distill_steps=10,
                                    finetune_steps=5, progress=False)
    assert list(report.error_before) == ["model.layers.0.self_attn"]
    for value in (report.perplexity_softmax, report.perplexity_converted, report.perplexity_distilled,
                  report.perplexity_finetuned):
        assert 1.0 < value < 256.0
    assert report.error_after["model.layers.0.self_attn"] < report.error_before["model.layers.0.self_attn"]
    assert "perplexity" in report.table() and "model.layers.0.self_attn" in report.table()


def test_mechanism_parameters_from_the_model_config():
    name = akt.register("sliding_window", window=64)
    narrow = llama_config()
    narrow.attnkit_params = {"window": 2}  # the config overrides register()'s parameters
    model, wide = build(narrow, name), build(llama_config(), name)
    wide.load_state_dict(model.state_dict(), strict=False)
    ids = token_ids(2, 10)
    with torch.no_grad():
        a, b = model(ids).logits, wide(ids).logits
    assert model.model.layers[0].self_attn.attnkit_attention.params == {"window": 2}
    assert wide.model.layers[0].self_attn.attnkit_attention.params == {"window": 64}
    assert_close(a[:, :3], b[:, :3], dtype=torch.float32)  # the first tokens see the same keys
    assert not torch.allclose(a[:, 5:], b[:, 5:], atol=1e-4)


def test_decoding_edge_cases_sliding_cache_beams_static_cache():
    ids = token_ids(2, 9)
    # Mistral's cache keeps only the window; the converted layers' state still continues the whole sequence
    mistral = build(mistral_config(), "sdpa")
    attnkit.convert(mistral, "hedgehog")
    assert torch.equal(generate(mistral, ids, max_new_tokens=6), generate(mistral, ids, max_new_tokens=6,
                                                                          use_cache=False))
    # beam search reorders the cache: the state is rebuilt from it (with a warning), results unchanged
    llama = build(llama_config(), "sdpa")
    attnkit.convert(llama, "hedgehog")
    beams = generate(llama, ids, max_new_tokens=5, num_beams=3)
    assert torch.equal(beams, generate(llama, ids, max_new_tokens=5, num_beams=3, use_cache=False))
    with pytest.raises(NotSupportedError, match="static-cache"):
        generate(llama, ids, max_new_tokens=4, cache_implementation="static")
    # softmax runs the static cache's masks exactly
    ref, ours = twins(llama_config(), "eager")
    assert torch.equal(generate(ours, ids, max_new_tokens=5, cache_implementation="static"),
                       generate(ref, ids, max_new_tokens=5, cache_implementation="static"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_softmax_half_precision(dtype):
    ref, ours = twins(llama_config(), "sdpa", dtype=dtype)
    ids = token_ids(2, 11)
    with torch.no_grad():
        assert_close(ours(ids).logits, ref(ids).logits, dtype=dtype, scale=4.0)


def test_vit_attention_transfer_bidirectional():
    model = build(vit_config(), "eager", auto=AutoModelForImageClassification)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(48, 3, 4, 4, generator=g).repeat_interleave(4, -1).repeat_interleave(4, -2) * 2
    attnkit.convert(model, "hedgehog")
    assert all(not layer.mechanism_module(False).causal for layer in akt.converted_layers(model))
    before = akt.attention_errors(model, images[:16])
    akt.distill(model, images[16:], steps=20, lr=3e-2, progress=False)
    after = akt.attention_errors(model, images[:16])
    assert len(before) == 2 and all(after[k] < 0.7 * before[k] for k in before), (before, after)


@pytest.mark.parametrize("padded", [False, True])
def test_softmax_gradients_match_eager(padded):
    ref, ours = twins(llama_config(), "eager")
    ids = token_ids(2, 9)
    mask = left_padding(2, 9, [0, 3]) if padded else None
    for model in (ref, ours):
        logits = model(ids, attention_mask=mask).logits
        keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        logits[keep].square().mean().backward()
    for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
        assert_close(q.grad, p.grad, dtype=torch.float32, scale=4.0, msg=name)


def test_convert_rejects_non_models():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        attnkit.convert(None, "hedgehog")


def test_state_cache_decodes_in_constant_memory():
    model = build(llama_config(), "sdpa")
    attnkit.convert(model, "hedgehog")
    ids = token_ids(2, 7)
    sizes = []
    for new in (3, 12):
        cache = akt.state_cache()
        seq = generate(model, ids, max_new_tokens=new, cache=cache)
        assert torch.equal(seq, generate(model, ids, max_new_tokens=new))  # the model's default cache
        assert [layer.seen for layer in cache.layers] == [7 + new - 1] * 2
        sizes.append(cache.nbytes)
    # S [2, 4 heads, 16 features, 8] and z [2, 4, 16] per layer, float32, whatever the length
    assert sizes == [2 * (2 * 4 * 16 * 8 + 2 * 4 * 16) * 4] * 2
    beams = generate(model, ids, max_new_tokens=5, num_beams=3, cache=akt.state_cache())
    assert torch.equal(beams, generate(model, ids, max_new_tokens=5, num_beams=3))
    partial = build(llama_config(), "sdpa")
    attnkit.convert(partial, "hedgehog", layers=[0])  # layer 1 stays softmax: it needs keys and values
    with pytest.raises(NotSupportedError, match="state_cache"):
        generate(partial, ids, max_new_tokens=3, cache=akt.state_cache())


def test_mechanisms_without_step_decoding_say_so():
    model = build(llama_config(), "sdpa")
    attnkit.convert(model, "routing", num_clusters=2)
    ids = token_ids(2, 8)
    assert generate(model, ids, max_new_tokens=3, use_cache=False).shape == (2, 11)
    with pytest.raises(NotSupportedError, match="use_cache=False"):
        generate(model, ids, max_new_tokens=3)
    vit = build(vit_config(), "eager", auto=AutoModelForImageClassification)
    attnkit.convert(vit, "linformer", proj_len=8)  # seq_len from the image: 16 patches and the class token
    assert vit.vit.layers[0].attention.attnkit_attention.seq_len == 17
    with torch.no_grad():
        assert torch.isfinite(vit(torch.randn(2, 3, 16, 16)).logits).all()


# ------------------------------------------------------------------------------------------------------------
# Issue 28: stale or mismatched masks, gpsa over a cache, advice a transformers user can act on
# ------------------------------------------------------------------------------------------------------------

def test_mask_edited_in_place_is_analysed_again():
    """The analysis of a mask is memoised per tensor for the layers of one call; an in-place edit between calls
    must not reuse it (it was keyed by identity: the output was off by ~2)."""
    ref, ours = twins(llama_config(), "eager")
    ids = token_ids(2, 9)
    mask = torch.ones(2, 1, 9, 9, dtype=torch.bool)  # full (bidirectional) first
    with torch.no_grad():
        assert_close(ours(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask.float().log()).logits,
                     dtype=torch.float32)
        mask.tril_()  # the same tensor, now causal
        want = ref(ids, attention_mask=torch.zeros(9, 9).masked_fill(~mask[0, 0], float("-inf"))[None, None]
                   .expand(2, 1, 9, 9)).logits
        assert_close(ours(ids, attention_mask=mask).logits, want, dtype=torch.float32)
        mask[1, :, :, :3] = False  # and a padding mask for the second sequence
        mask[1, :, :3, :3] |= torch.eye(3, dtype=torch.bool)  # every query keeps a key
        float_mask = torch.zeros(2, 1, 9, 9).masked_fill(~mask, float("-inf"))
        assert_close(ours(ids, attention_mask=mask).logits, ref(ids, attention_mask=float_mask).logits,
                     dtype=torch.float32)
    with torch.inference_mode():  # inference tensors have no version counter: analysed at every call
        frozen = mask.clone()
        first = ours(ids, attention_mask=frozen).logits
        frozen.fill_(True)
        assert_close(ours(ids, attention_mask=frozen).logits, ref(ids, attention_mask=torch.zeros(2, 1, 9, 9)).logits,
                     dtype=torch.float32)
    assert_close(first, ref(ids, attention_mask=float_mask).logits, dtype=torch.float32)


def test_mask_of_another_batch_is_refused():
    model = build(llama_config(), akt.register("softmax"))
    ids = token_ids(2, 6)
    for bad in (torch.ones(3, 1, 6, 6, dtype=torch.bool), torch.ones(2, 1, 6, 7, dtype=torch.bool),
                torch.zeros(2, 3, 6, 6)):
        with torch.no_grad(), pytest.raises(ValueError, match=r"attention_mask has shape .*expected \[2 or 1"):
            model(ids, attention_mask=bad)


def test_gpsa_decodes_over_the_cache_as_the_full_pass():
    """ConViT's grid followed the current length (a near-square grid of n tokens), so the cached keys had been
    computed on another grid than the full pass's (logits off by ~0.1-0.2); in a transformers model the causal
    grid is fixed by the model's maximum length."""
    model = build(llama_config(), "sdpa")
    attnkit.convert(model, "gpsa")
    ids = token_ids(2, 6)
    seq = generate(model, ids, max_new_tokens=8)
    assert torch.equal(seq, generate(model, ids, max_new_tokens=8, use_cache=False))
    with torch.no_grad():
        full = model(seq, use_cache=False).logits
        prefix = model(seq[:, :9], use_cache=False).logits
    assert_close(_stepwise_logits(model, seq, 6), full[:, 5:-1], dtype=torch.float32)
    assert_close(prefix, full[:, :9], dtype=torch.float32)  # causal: a token's output ignores later tokens
    inner = model.model.layers[0].self_attn.attnkit_attention.mechanism_module(True)
    assert inner.cols == 16  # 128 positions on an 8 x 16 grid


@pytest.mark.parametrize("mechanism,params", [
    ("gla", {}), ("cottention", {}), ("halo", {"block": 2, "halo": 1}), ("kernel_rpe_fft", {}),
    ("sigmoid_attention", {}), ("axial", {}),
])
def test_mechanisms_without_cached_decoding_give_transformers_advice(mechanism, params):
    model = build(llama_config(), "sdpa")
    attnkit.convert(model, mechanism, **params)
    ids = token_ids(2, 6)
    with pytest.raises(NotSupportedError, match="use_cache=False") as err:
        generate(model, ids, max_new_tokens=2)
    assert "state_cache()" in str(err.value)
    assert "state=" not in str(err.value).replace("state_cache", "")  # no advice out of a transformers user's reach
    assert generate(model, ids, max_new_tokens=2, use_cache=False).shape == (2, 8)


def test_dropout_error_says_what_works_on_a_built_model():
    ids = token_ids(2, 6)
    drop = build(gpt2_config(attn_pdrop=0.1), "sdpa").train()
    attnkit.convert(drop, "softmax")
    with pytest.raises(NotSupportedError, match=r"model.eval\(\)") as err:
        drop(ids)
    assert "m.attn_dropout.p = 0.0" in str(err.value)
    drop.config.attn_pdrop = 0.0  # what the old message advised: no effect on a built model
    with pytest.raises(NotSupportedError, match="dropout"):
        drop(ids)
    for m in drop.modules():  # what the message says works
        if type(m).__name__ == "GPT2Attention":
            m.attn_dropout.p = 0.0
    assert torch.isfinite(drop(ids).logits).all()
    llama = build(LlamaConfig(**{**llama_config().to_dict(), "attention_dropout": 0.1}), "sdpa").train()
    attnkit.convert(llama, "softmax")
    with pytest.raises(NotSupportedError, match=r"m.attention_dropout = 0.0"):
        llama(ids)


def test_exact_modules_take_grouped_keys():
    """selective_attention (an exact-family module) refused the model's 2 key heads for 4 query heads."""
    model = build(llama_config(), "sdpa")
    attnkit.convert(model, "selective_attention")
    ids = token_ids(2, 7)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    assert torch.isfinite(full).all()
    assert_close(_stepwise_logits(model, ids, 4), full[:, 3:-1], dtype=torch.float32)


def test_dropout_refusal_gives_a_fix_that_works_on_a_built_model():
    """GPT-2's refusal advised a config change, which does nothing on a built model; the advice it gives now
    (the layers' own dropout attribute) does make the model run."""
    drop = build(gpt2_config(attn_pdrop=0.1), "sdpa").train()
    attnkit.convert(drop, "softmax")
    ids = token_ids(2, 8)
    with pytest.raises(NotSupportedError, match=r"m\.attn_dropout\.p = 0\.0.*GPT2Attention") as info:
        drop(ids)
    assert "model.eval()" in str(info.value)
    for m in drop.modules():
        if type(m).__name__ == "GPT2Attention":
            m.attn_dropout.p = 0.0
    assert drop(ids).logits.shape[:2] == (2, 8)  # still training mode, now without attention dropout
