#!/usr/bin/env python
"""Decode-throughput peer (CPU or GPU): HF MixtralForCausalLM.generate (greedy, KV cache).

Our copy of shared/peers/hf_decode_bench.py, run by bench/decode.py in the venv that
bench/peers/setup_hf.sh builds:

  bench/peers/.venv-hf/bin/python bench/peers/hf_decode_bench.py [--new 256 --batches 1,8]

512-token random prompt, 256 new tokens, batch 1 and batch 8 (by default). Generation never
stops early: eos_token_id=None and min_new_tokens = max_new_tokens (asserted after each call).
Random weights, no hub access. Flags or env vars (HF_*) as in hf_train_bench.py. About 2-3 s
per batch-1 generation and 6-8 s per batch-8 one at the default shape on 2 cores.
Added to the shared copy: parameter counts, the prefill timed best of --repeats (as generate),
``--device cuda``, and a ``peer_result {json}`` line for the driver.
Last line printed: `hf_mixtral_decode new_tokens_per_s b1=<..> b8=<..>`.
"new tokens/s" = batch*new_tokens / wall time of model.generate (prefill included);
the decode-only rate (prefill time subtracted) is printed too.
"""
import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import transformers
from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM


def env(name, default, typ=int):
    v = os.environ.get(name)
    return typ(v) if v is not None else default


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=env("HF_HIDDEN", 256))
    p.add_argument("--heads", type=int, default=env("HF_HEADS", 4))
    p.add_argument("--kv-heads", type=int, default=env("HF_KV_HEADS", 1))
    p.add_argument("--head-dim", type=int, default=env("HF_HEAD_DIM", 64))
    p.add_argument("--ffn", type=int, default=env("HF_FFN", 512))
    p.add_argument("--layers", type=int, default=env("HF_LAYERS", 4))
    p.add_argument("--experts", type=int, default=env("HF_EXPERTS", 8))
    p.add_argument("--topk", type=int, default=env("HF_TOPK", 2))
    p.add_argument("--vocab", type=int, default=env("HF_VOCAB", 8192))
    p.add_argument("--prompt", type=int, default=env("HF_PROMPT", 512))
    p.add_argument("--new", type=int, default=env("HF_NEW", 256))
    p.add_argument("--batches", default=os.environ.get("HF_BATCHES", "1,8"))
    p.add_argument("--threads", type=int, default=env("HF_THREADS", 2))
    p.add_argument("--device", default=os.environ.get("HF_DEVICE", "cpu"), choices=["cpu", "cuda"],
                   help="cuda: model and prompts on the GPU, each timed call ends in torch.cuda.synchronize")
    p.add_argument("--repeats", type=int, default=env("HF_REPEATS", 1))
    p.add_argument("--cache", default=os.environ.get("HF_CACHE", "dynamic"), choices=["dynamic", "static"])
    p.add_argument("--experts-impl", default=os.environ.get("HF_EXPERTS_IMPL", "grouped_mm"),
                   choices=["grouped_mm", "batched_mm", "eager"])
    p.add_argument("--attn-impl", default=os.environ.get("HF_ATTN_IMPL", "sdpa"), choices=["sdpa", "eager"])
    p.add_argument("--seed", type=int, default=env("HF_SEED", 0))
    return p.parse_args()


def main():
    a = parse()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    cfg = MixtralConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn,
        num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
        head_dim=a.head_dim, num_local_experts=a.experts, num_experts_per_tok=a.topk,
        max_position_embeddings=max(4096, a.prompt + a.new),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False, sliding_window=None, rms_norm_eps=1e-5,
        use_cache=True, bos_token_id=None, eos_token_id=None, pad_token_id=0,
        attn_implementation=a.attn_impl, experts_implementation=a.experts_impl,
    )
    model = MixtralForCausalLM(cfg).to(torch.float32).to(a.device).eval()
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    active = total - expert + expert * a.topk // a.experts
    print(f"params total {total} active_per_token {active} (embedding {model.model.embed_tokens.weight.numel()}; "
          f"expert {expert})")
    print(f"torch {torch.__version__} transformers {transformers.__version__} threads {torch.get_num_threads()} "
          f"attn {model.config._attn_implementation} experts {model.config._experts_implementation} cache {a.cache} "
          f"device {a.device}")
    gen_cfg = GenerationConfig(
        max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False, num_beams=1, use_cache=True,
        eos_token_id=None, pad_token_id=0, bos_token_id=None,
        cache_implementation=None if a.cache == "dynamic" else "static",
    )
    g = torch.Generator().manual_seed(a.seed + 1)
    results = {}
    with torch.inference_mode():
        # warm-up (small) so one-time init is not timed
        w = torch.randint(0, a.vocab, (1, 16), generator=g).to(a.device)
        model.generate(w, attention_mask=torch.ones_like(w),
                       generation_config=GenerationConfig(**{**gen_cfg.to_dict(), "max_new_tokens": 4,
                                                             "min_new_tokens": 4}))
        for b in [int(x) for x in a.batches.split(",")]:
            ids = torch.randint(0, a.vocab, (b, a.prompt), generator=g).to(a.device)
            mask = torch.ones_like(ids)
            # prefill-only timing (one forward over the prompt, logits of last position only),
            # best of `repeats` like generate below
            t_prefill = None
            for _ in range(a.repeats):
                sync()
                t0 = time.perf_counter()
                model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
                sync()
                dt = time.perf_counter() - t0
                t_prefill = dt if t_prefill is None else min(t_prefill, dt)
            best = None
            for _ in range(a.repeats):
                sync()
                t0 = time.perf_counter()
                out = model.generate(ids, attention_mask=mask, generation_config=gen_cfg)
                sync()
                dt = time.perf_counter() - t0
                best = dt if best is None else min(best, dt)
            n_new = out.shape[1] - a.prompt
            assert n_new == a.new, n_new
            tps = b * n_new / best
            dec_tps = b * n_new / max(best - t_prefill, 1e-9)
            results[b] = {"new_tokens_per_s": tps, "decode_only_tokens_per_s": dec_tps, "generate_s": best,
                          "prefill_s": t_prefill, "new_tokens": n_new, "prompt": a.prompt}
            print(f"batch {b}: generate {best:.2f} s (prefill ~{t_prefill:.2f} s) new tokens/s {tps:.1f} "
                  f"decode-only tokens/s {dec_tps:.1f} ms/step {1e3*(best - t_prefill)/n_new:.1f}", flush=True)
    print("peer_result " + json.dumps({
        "system": f"transformers {transformers.__version__} MixtralForCausalLM.generate (torch {torch.__version__})",
        "threads": torch.get_num_threads(), "device": a.device, "cache": a.cache, "experts_impl": model.config._experts_implementation,
        "attn_impl": model.config._attn_implementation, "repeats": a.repeats,
        "params_total": total, "params_active_per_token": active,
        "batches": {str(b): r for b, r in results.items()}}))
    print("hf_mixtral_decode new_tokens_per_s " + " ".join(f"b{b}={v['new_tokens_per_s']:.1f}"
                                                          for b, v in results.items()))


if __name__ == "__main__":
    main()
