#!/usr/bin/env python
"""Training-throughput peer: HF transformers MixtralForCausalLM + torch AdamW (CPU or GPU).

Our copy of shared/peers/hf_train_bench.py, run by bench/train_throughput.py in the venv that
bench/peers/setup_hf.sh builds (torch 2.13 CPU, transformers 5.23):

  bench/peers/.venv-hf/bin/python bench/peers/hf_train_bench.py [--steps 20 --warmup 5 ...]

Random weights, random token batches (uniform over the vocabulary, a fresh batch every step),
no hub access. Every knob can be given as a flag or as an env var (flag wins), e.g.
HF_HIDDEN=512 HF_LAYERS=2. Router aux loss on (weight 0.01, as gemini_mini's load-balance
weight). Takes about 2 s a step at the nano shape on 2 cores, after ~1 s of set-up.

Added to the shared copy: parameter counts split as gemini_mini counts them (matmul parameters
a token uses, without the input embedding and the RMSNorm scales), the resulting PaLM FLOPs
per token, ``--dtype bfloat16`` (torch.autocast; weights stay float32), ``--device cuda``, and a
``peer_result {json}`` line for the driver. Last line printed: `hf_mixtral tokens_per_s <median>`.
"""
import argparse
import contextlib
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import transformers
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)


def env(name, default, typ=int):
    v = os.environ.get(name)
    return typ(v) if v is not None else default


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=env("HF_HIDDEN", 256))
    p.add_argument("--heads", type=int, default=env("HF_HEADS", 4))
    p.add_argument("--kv-heads", type=int, default=env("HF_KV_HEADS", 1))
    p.add_argument("--head-dim", type=int, default=env("HF_HEAD_DIM", 64))
    p.add_argument("--ffn", type=int, default=env("HF_FFN", 512), help="per-expert intermediate_size")
    p.add_argument("--layers", type=int, default=env("HF_LAYERS", 4))
    p.add_argument("--experts", type=int, default=env("HF_EXPERTS", 8))
    p.add_argument("--topk", type=int, default=env("HF_TOPK", 2))
    p.add_argument("--vocab", type=int, default=env("HF_VOCAB", 8192))
    p.add_argument("--seq", type=int, default=env("HF_SEQ", 512))
    p.add_argument("--batch", type=int, default=env("HF_BATCH", 8))
    p.add_argument("--warmup", type=int, default=env("HF_WARMUP", 5))
    p.add_argument("--steps", type=int, default=env("HF_STEPS", 20))
    p.add_argument("--threads", type=int, default=env("HF_THREADS", 2))
    p.add_argument("--device", default=os.environ.get("HF_DEVICE", "cpu"), choices=["cpu", "cuda"],
                   help="cuda: model and batches on the GPU, each timed step ends in torch.cuda.synchronize")
    p.add_argument("--lr", type=float, default=env("HF_LR", 3e-4, float))
    p.add_argument("--aux-coef", type=float, default=env("HF_AUX_COEF", 0.01, float),
                   help="router_aux_loss_coef (HF Mixtral default is 0.001)")
    p.add_argument("--experts-impl", default=os.environ.get("HF_EXPERTS_IMPL", "grouped_mm"),
                   choices=["grouped_mm", "batched_mm", "eager"],
                   help="HF experts kernel; grouped_mm is the HF default")
    p.add_argument("--attn-impl", default=os.environ.get("HF_ATTN_IMPL", "sdpa"), choices=["sdpa", "eager"])
    p.add_argument("--arch", default=os.environ.get("HF_ARCH", "mixtral"), choices=["mixtral", "olmoe", "qwen2_moe"],
                   help="olmoe: q/k RMSNorm over full projection, norm_topk_prob=False; qwen2_moe: adds a shared "
                        "expert (size --ffn, sigmoid-gated), qkv bias, norm_topk_prob=False")
    p.add_argument("--seed", type=int, default=env("HF_SEED", 0))
    p.add_argument("--dtype", default=os.environ.get("HF_DTYPE", "float32"), choices=["float32", "bfloat16"],
                   help="compute dtype: bfloat16 runs forward under torch.autocast (weights stay float32)")
    return p.parse_args()


def build_config(a):
    common = dict(
        vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads, num_experts_per_tok=a.topk, max_position_embeddings=max(4096, a.seq),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
        output_router_logits=True, router_aux_loss_coef=a.aux_coef, attention_dropout=0.0, use_cache=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
        attn_implementation=a.attn_impl, experts_implementation=a.experts_impl)
    if a.arch == "olmoe":  # head_dim is hidden/heads in OLMoE
        assert a.hidden == a.heads * a.head_dim, "olmoe needs hidden == heads*head_dim"
        return OlmoeConfig(intermediate_size=a.ffn, num_experts=a.experts, rms_norm_eps=1e-5, **common)
    if a.arch == "qwen2_moe":
        assert a.hidden == a.heads * a.head_dim, "qwen2_moe needs hidden == heads*head_dim"
        return Qwen2MoeConfig(intermediate_size=a.ffn, moe_intermediate_size=a.ffn, shared_expert_intermediate_size=a.ffn,
                              num_experts=a.experts, rms_norm_eps=1e-6, use_sliding_window=False, **common)
    return MixtralConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn,
        num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
        head_dim=a.head_dim, num_local_experts=a.experts, num_experts_per_tok=a.topk,
        max_position_embeddings=max(4096, a.seq),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False, sliding_window=None, rms_norm_eps=1e-5,
        output_router_logits=True, router_aux_loss_coef=a.aux_coef, router_jitter_noise=0.0,
        attention_dropout=0.0, use_cache=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        attn_implementation=a.attn_impl, experts_implementation=a.experts_impl,
    )


def param_counts(model, cfg):
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    embed = model.model.embed_tokens.weight.numel()
    active = total - expert + expert * cfg.num_experts_per_tok // cfg.num_experts
    return total, active, embed, expert


def norm_params(model):
    """RMSNorm scales (elementwise, no matmul): left out of the matmul count."""
    return sum(p.numel() for n, p in model.named_parameters() if p.ndim == 1 and "norm" in n)


def main():
    a = parse()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    cfg = build_config(a)
    cls = {"mixtral": MixtralForCausalLM, "olmoe": OlmoeForCausalLM, "qwen2_moe": Qwen2MoeForCausalLM}[a.arch]
    model = cls(cfg).to(torch.float32).to(a.device)
    model.train()
    assert model.config.rope_parameters["rope_theta"] == 10000.0
    total, active, embed, expert = param_counts(model, cfg)
    print(f"torch {torch.__version__} transformers {transformers.__version__} threads {torch.get_num_threads()} "
          f"device {a.device}" + (f" ({torch.cuda.get_device_name()})" if a.device == "cuda" else ""))
    print(f"attn_impl {model.config._attn_implementation} experts_impl {model.config._experts_implementation}")
    print(f"arch {a.arch} config hidden={a.hidden} heads={a.heads} kv_heads={a.kv_heads} head_dim={a.head_dim} ffn={a.ffn} "
          f"layers={a.layers} experts={a.experts} topk={a.topk} vocab={a.vocab} seq={a.seq} batch={a.batch}")
    print(f"params total {total} active_per_token {active} "
          f"(embedding {embed}; expert {expert}; non-embedding total {total - embed} active {active - embed})")
    # Matmul FLOPs/token ~ 6*(active non-embedding params) + attention 6*2*seq*heads*head_dim*layers (causal not halved)
    flops_tok = 6 * (active - embed) + 12 * a.layers * a.seq * a.heads * a.head_dim
    print(f"aux loss included: yes (output_router_logits=True, router_aux_loss_coef={cfg.router_aux_loss_coef}); "
          f"approx train FLOPs/token {flops_tok/1e6:.2f} MFLOP")
    # The PaLM count as gemini_mini's metrics.train_flops_per_token makes it: matmul parameters only
    # (the input embedding is a lookup, RMSNorm scales are elementwise).
    norms = norm_params(model)
    matmul_active = active - embed - norms
    palm_flops_tok = 6 * matmul_active + 12 * a.layers * a.heads * a.head_dim * a.seq
    print(f"matmul params per token {matmul_active} (active {active} - input embedding {embed} - norm scales {norms}); "
          f"PaLM train FLOPs/token {palm_flops_tok}")
    print(f"dtype {a.dtype}" + (f" (torch.autocast bfloat16 on {a.device}, float32 weights)"
                                if a.dtype == "bfloat16" else ""))
    autocast = (lambda: torch.autocast(a.device, dtype=torch.bfloat16)) if a.dtype == "bfloat16" \
        else contextlib.nullcontext

    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(a.seed + 1)
    tokens = a.batch * a.seq
    times = []
    for step in range(a.warmup + a.steps):
        ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g).to(a.device)
        if a.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast():
            out = model(input_ids=ids, labels=ids, output_router_logits=True)
        out.loss.backward()  # loss = CE(shifted) + router_aux_loss_coef * aux_loss
        opt.step()
        if a.device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        tag = "warmup" if step < a.warmup else "timed"
        print(f"step {step:3d} {tag} loss {out.loss.item():.4f} aux {out.aux_loss.item():.4f} "
              f"time {dt*1e3:.1f} ms tok/s {tokens/dt:.1f}", flush=True)
        if step >= a.warmup:
            times.append(dt)
    med = statistics.median(times)
    print(f"median step {med*1e3:.1f} ms  min {min(times)*1e3:.1f} ms  "
          f"approx {flops_tok*tokens/med/1e9:.1f} GFLOP/s")
    print("peer_result " + json.dumps({
        "system": f"transformers {transformers.__version__} {cls.__name__} (torch {torch.__version__})",
        "tokens_per_s": tokens / med, "mean_tokens_per_s": tokens * len(times) / sum(times),
        "median_step_s": med, "min_step_s": min(times), "steps": len(times), "warmup": a.warmup,
        "dtype": a.dtype, "device": a.device, "threads": torch.get_num_threads(), "experts_impl": model.config._experts_implementation,
        "attn_impl": model.config._attn_implementation, "aux_loss_coef": cfg.router_aux_loss_coef,
        "params_total": total, "params_active_per_token": active, "params_embedding": embed,
        "params_norm": norms, "matmul_params_per_token": matmul_active,
        "palm_train_flops_per_token": palm_flops_tok, "hf_approx_train_flops_per_token": flops_tok}))
    print(f"hf_{a.arch} tokens_per_s {tokens/med:.1f}")


if __name__ == "__main__":
    main()
