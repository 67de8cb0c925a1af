"""attnkit inside a transformers model: attention transfer quality, and decoding cost. Needs ``attnkit[hf]``.

    python benchmarks/bench_transfer.py            # ~1-2 CPU minutes
    python benchmarks/bench_transfer.py --quick    # seconds; checks the script, not the numbers

A tiny Llama (hidden 64, 2 layers, 4 query heads, 2 key/value heads, byte vocabulary) is pre-trained on the text
that ships with attnkit (its docstrings, ``attnkit.integrations.transformers.sample_text``); the last 32 windows
are held out. Then, from copies of that model:

1. attention transfer (``attention_transfer``): perplexity on the held-out windows with softmax attention, after
   ``attnkit.convert`` (untrained feature maps), after distillation (Hedgehog's cross-entropy loss, or LoLCATs'
   output MSE) and after fine-tuning the converted attention modules; per-layer relative error of the attention
   output against softmax at each stage. Baselines: mechanisms without trainable maps (Performer, elu + 1),
   fine-tuned for the same number of steps without distillation.
2. decoding: CPU seconds per generated token (``time.process_time``, one thread, median of interleaved repeats;
   the prefill is not timed) after prompts of 256 and 4,096 tokens, for sdpa, attnkit's ``softmax`` and the
   converted (Hedgehog) model, whose layers carry an O(1) recurrent state beside the model's key/value cache, or
   keep only that state (``state_cache()``), against the same converted model recomputing the sequence every step
   (``use_cache=False``); and the memory each cache holds at the end.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings

import torch

from attnkit.bench.scripts import machine_header, script_parser, write_json


def main() -> None:
    ap = script_parser(__doc__.splitlines()[0], head_dim=16, repeats=5)
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--distill-steps", type=int, default=200)
    ap.add_argument("--finetune-steps", type=int, default=100)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--prompt", type=int, nargs="+", default=[256, 4096],
                    help="prompt lengths of the decoding measurement")
    ap.set_defaults(threads=1)
    args = ap.parse_args()
    if args.quick:
        args.pretrain_steps, args.distill_steps, args.finetune_steps, args.prompt, args.repeats = 20, 5, 3, [32, 64], 1
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from transformers import AutoModelForCausalLM, LlamaConfig

    from attnkit.integrations import transformers as akt

    machine = machine_header("transformers attention transfer")
    torch.manual_seed(0)
    data = akt.byte_sequences(akt.sample_text(), args.seq_len)
    train, held = data[:-32], data[-32:]
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    base = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    t = time.process_time()
    pre = akt.finetune(base, train, steps=args.pretrain_steps, lr=3e-3, batch_size=16, progress=False)
    print(f"pre-trained {args.pretrain_steps} steps on {train.shape[0]} windows of {args.seq_len} bytes: "
          f"final loss {statistics.mean(pre[-10:]):.3f} ({time.process_time() - t:.1f} CPU s)\n")
    runs = []
    print(f"{'mechanism':<12}{'distill loss':<14}{'ppl softmax':>12}{'converted':>11}{'distilled':>11}"
          f"{'fine-tuned':>12}   error per layer: converted -> distilled -> fine-tuned")
    for mech, loss, params in [("hedgehog", "hedgehog", {}), ("hedgehog", "mse", {}),
                               ("performer", None, {"num_features": 64}), ("linear_elu", None, {})]:
        model = copy.deepcopy(base)
        t = time.process_time()
        if loss is not None:
            rep = akt.attention_transfer(model, train, held, mechanism=mech, loss=loss,
                                         distill_steps=args.distill_steps, distill_lr=1e-2,
                                         finetune_steps=args.finetune_steps, batch_size=16, progress=False,
                                         **params)
        else:  # nothing to distill: convert, then fine-tune the attention modules as the others are
            ppl_soft = akt.perplexity(model, held)
            akt.convert(model, mech, **params)
            rep = akt.TransferReport(mech, ppl_soft, akt.perplexity(model, held), float("nan"))
            rep.error_before = akt.attention_errors(model, held)
            attn = [p for _, m in akt.attention_modules(model) for p in m.parameters()]
            rep.finetune_losses = akt.finetune(model, train, steps=args.finetune_steps, lr=1e-3, batch_size=16,
                                               parameters=attn, seed=1, progress=False)
            rep.perplexity_finetuned = akt.perplexity(model, held)
            rep.error_finetuned = akt.attention_errors(model, held)
        cpu = time.process_time() - t
        errs = "; ".join(
            f"{rep.error_before[k]:.3f} -> {rep.error_after.get(k, float('nan')):.3f} -> "
            f"{rep.error_finetuned.get(k, float('nan')):.3f}" for k in rep.error_before)
        print(f"{mech:<12}{loss or '-':<14}{rep.perplexity_softmax:>12.3f}{rep.perplexity_converted:>11.3f}"
              f"{rep.perplexity_distilled:>11.3f}{rep.perplexity_finetuned:>12.3f}   {errs}")
        record = {k: v for k, v in rep.__dict__.items() if k not in ("distill_losses", "finetune_losses")}
        runs.append({**record, "loss": loss, "params": params, "cpu_s": cpu})

    # -- decoding cost ------------------------------------------------------------------------------------
    steps = 16
    models = {"sdpa": copy.deepcopy(base), "attnkit softmax": copy.deepcopy(base)}
    models["attnkit softmax"].set_attn_implementation(akt.register("softmax"))
    models["hedgehog (state)"] = copy.deepcopy(base)
    akt.convert(models["hedgehog (state)"], "hedgehog")  # with the model's cache plus the layer's state
    for model in models.values():
        model.eval()
    stream = held.reshape(-1).repeat(1 + (max(args.prompt) + steps) // held.numel())

    cache_bytes: dict[str, dict[int, int]] = {}

    def nbytes(cache) -> int:
        if hasattr(cache, "nbytes"):
            return cache.nbytes
        return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))

    def decode(name: str, model, n: int, use_cache: bool | str) -> float:
        """CPU seconds per token of ``steps`` greedy one-token steps after an ``n``-token prefill (not timed);
        without a cache each step recomputes the whole sequence; ``"state"``: attnkit's state_cache()."""
        ids = stream[None, :n]
        if use_cache == "state":
            out = model(ids, cache=akt.state_cache(), use_cache=True)
        else:
            out = model(ids, use_cache=bool(use_cache))
        cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
        t0 = time.process_time()
        for _ in range(steps):
            if use_cache:
                out = model(nxt, cache=cache, use_cache=True)
                cache = out.cache
            else:
                ids = torch.cat([ids, nxt], 1)
                out = model(ids, use_cache=False)
            nxt = out.logits[:, -1:].argmax(-1)
        elapsed = (time.process_time() - t0) / steps
        if use_cache:
            cache_bytes.setdefault(name, {})[n] = nbytes(cache)
        return elapsed

    decoding: dict[str, dict[int, float]] = {}
    print(f"\ndecoding: CPU ms per token ({steps} greedy steps after the prompt), median of {args.repeats} "
          f"interleaved repeats")
    print(f"  {'prompt':<28}" + "".join(f"{n:>10}" for n in args.prompt))
    with torch.no_grad():
        variants = [(name, m, True) for name, m in models.items()]
        variants.append(("hedgehog (state_cache)", models["hedgehog (state)"], "state"))
        variants.append(("hedgehog (use_cache=False)", models["hedgehog (state)"], False))
        times = {(name, n): [] for name, _, _ in variants for n in args.prompt}
        for _ in range(args.repeats):  # interleaved: every variant sees the same machine load
            for n in args.prompt:
                for name, model, use_cache in variants:
                    times[(name, n)].append(decode(name, model, n, use_cache))
        for name, _, _ in variants:
            decoding[name] = {n: statistics.median(times[(name, n)]) for n in args.prompt}
            print(f"  {name:<28}" + "".join(f"{1e3 * decoding[name][n]:>10.2f}" for n in args.prompt))
    print("cache memory at the end, KiB:")
    for name, by_len in cache_bytes.items():
        print(f"  {name:<28}" + "".join(f"{by_len[n] / 1024:>10.1f}" for n in args.prompt))
    write_json(args.json, {"machine": machine, "args": vars(args), "runs": runs, "decoding_cpu_s_per_token": decoding,
                             "cache_bytes": cache_bytes},
               default=str)


if __name__ == "__main__":
    main()
