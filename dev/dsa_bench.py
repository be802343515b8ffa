"""
One DSA layer (nanochat/dsa.py, the long-context "flex" path) forward + backward against
one dense causal attention layer (SDPA: flash / cuDNN) at a long context, on one GPU,
compiled, bf16 autocast. Issue 19's item 2 asks for >= 3x at T = 65,536 on one H200.
Prints one JSON line per case. GPU only.

    python dev/dsa_bench.py                          # d20 shapes, T = 65,536, top-k 2048
    python dev/dsa_bench.py --seq_len=16384 --depth=12
    python dev/dsa_bench.py --only=dsa_select --precision=highest   # the selection with IEEE fp32 dots

    python dev/dsa_bench.py --model_tag=d12 --data_dir=DIR --only=trained   # a trained indexer's choices

Cases:
  dense            CausalSelfAttention layer: projections + causal SDPA
  dsa_layer        SparseAttention layer in training (indexer keys and queries, chunked
                   top-k, flex_attention, the KL loss on 256 rows) with its random-init
                   indexer, whose choices are spread: the worst case for block sparsity
  dsa_select       the indexer's chunked scores + top-k + bits alone (no grad), the scores
                   by the Triton kernel (nanochat/dsa_triton.py); dsa_select_torch: in PyTorch;
                   dsa_select_kernels, dsa_select_torch_kernels: their longest GPU kernels
                   (torch.profiler), where the time goes
  kth_topk, kth_kthvalue  one chunk's (1,024 rows) k-th largest score a row by torch.topk (what
                   the selection uses) and by torch.kthvalue (no gather of the k values)
  flex_<pattern>   flex_attention alone (B, H, T, D) with a synthetic selection of top-k keys
                   per query, against sdpa_causal: "local" (the k most recent keys), "spread"
                   (k random visible keys), "blocks" (k / 128 random key blocks per query block)
  trained_*        with --model_tag: the checkpoint's first DSA layer on real text (its input
                   from the model's own forward): trained_choices (where its chosen keys lie:
                   the share among each query's 2048 most recent keys and among the first 128,
                   and the blocks flex computes), trained_select, trained_flex (flex_attention
                   alone on that selection; trained_sdpa_causal: dense at the same shapes),
                   trained_layer (the layer's forward + backward); --fresh_indexers=1: the
                   same with the indexers re-initialized (what the warm-up started from)
"blocks" is the fraction of 128 x 128 blocks computed, relative to causal attention's.
What a trained indexer chooses lies between local and spread: the trained_* cases say where.
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from nanochat.attention import CausalSelfAttention, Context, rotary_tables
import nanochat.dsa as dsa_module
from nanochat.dsa import BLOCK, SparseAttention, block_mask_of, pack_bits
from nanochat.gpt import GPT, LayerSpec

parser = argparse.ArgumentParser(description="Time one DSA layer (fwd+bwd) against dense causal attention")
parser.add_argument("--depth", type=int, default=20, help="model shape: n_embd = 64 * depth, head_dim 128")
parser.add_argument("--seq_len", type=int, default=65536)
parser.add_argument("--top_k", type=int, default=2048)
parser.add_argument("--iters", type=int, default=5)
parser.add_argument("--precision", default="high", choices=["high", "highest"],
                    help="torch.set_float32_matmul_precision: 'high' (TF32, what training sets in common.compute_init) "
                         "or 'highest' (IEEE fp32: the indexer's scores, in cuBLAS or the Triton kernel)")
parser.add_argument("--only", default="", help="comma-separated case-name prefixes to run (default: all)")
parser.add_argument("--model_tag", default="", help="also the trained_* cases: this base checkpoint's first DSA layer "
                    "(its trained indexer) on --seq_len tokens of real text (e.g. --only=trained)")
parser.add_argument("--data_dir", default=None, help="with --model_tag: the text of this directory's validation shard")
parser.add_argument("--fresh_indexers", type=int, default=0, help="1: with --model_tag, the checkpoint's indexers "
                    "re-initialized (as before a warm-up): the same model's choices by untrained indexers, to compare")
args = parser.parse_args()
assert torch.cuda.is_available(), "dsa_bench needs a CUDA GPU"
torch.set_float32_matmul_precision(args.precision)
dsa_module.TRITON_IEEE = True  # dsa_select times the Triton kernel at either precision
ONLY = [c for c in args.only.split(",") if c]


def wanted(case):
    return not ONLY or any(case.startswith(c) for c in ONLY)
T, k = args.seq_len, args.top_k
config = GPT.config_for_depth(args.depth, sequence_len=T, dsa_start_layer=0, dsa_top_k=k)
H, D = config.n_head, config.n_embd // config.n_head
cos, sin = (t.cuda() for t in rotary_tables(T, D))


def timeit(fn):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for _ in range(args.iters):
        fn()
    torch.cuda.synchronize()
    return 1000 * (time.time() - t0) / args.iters, torch.cuda.max_memory_allocated() / 2 ** 30


def report(case, fn, **extra):
    if not wanted(case):
        return
    try:
        ms, gib = timeit(fn)
        print(json.dumps({"case": case, "T": T, "top_k": k, "H": H, "D": D, "ms": round(ms, 2),
                          "peak_gib": round(gib, 2), **extra}), flush=True)
    except Exception as e:  # a case that can't run (memory, compile) says so and the rest go on
        print(json.dumps({"case": case, "error": f"{type(e).__name__}: {str(e)[:300]}"}), flush=True)


def layer_step(layer, x):
    def step():
        ctx = Context(cos, sin, 0, T, {}, dsa_kernel="flex")
        with torch.amp.autocast("cuda", dtype=torch.bfloat16):
            loss = layer(x, ctx).float().square().mean() + sum(ctx.aux_losses)
        loss.backward()
    return step


spec = LayerSpec("dsa", T)
x = torch.randn(1, T, config.n_embd, device="cuda", requires_grad=True)
dense = CausalSelfAttention(config, 0, spec).cuda().train()
dsa = SparseAttention(config, 0, spec).cuda().train()
for m in (dense, dsa):
    m.init_weights()
    torch.nn.init.normal_(m.c_proj.weight, std=0.02)  # c_proj starts at zero: give the backward some work
report("dense", layer_step(torch.compile(dense, dynamic=False), x))
report("dsa_layer", layer_step(torch.compile(dsa, dynamic=False), x))
with torch.no_grad(), torch.amp.autocast("cuda", dtype=torch.bfloat16):
    ctx = Context(cos, sin, 0, T, {})
    iq, iw = dsa.indexer.queries(x, ctx)
    ik = dsa.indexer.keys(x, ctx)
report("dsa_select", lambda: dsa.select_packed(iq, iw, ik))  # scores by nanochat/dsa_triton.py
fused_on = set(dsa_module.TRITON_DEVICES)
dsa_module.TRITON_DEVICES.clear()
report("dsa_select_torch", lambda: dsa.select_packed(iq, iw, ik))  # scores in PyTorch (index_scores)
dsa_module.TRITON_DEVICES.update(fused_on)


def kernels(fn, top=10):
    """The GPU kernels of one call of fn, the `top` longest in total: where its time goes."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:top]
    return [{"kernel": e.key[:90], "calls": e.count, "ms": round(e.device_time_total / 1e3, 2)} for e in rows]


if wanted("dsa_select_kernels"):
    print(json.dumps({"case": "dsa_select_kernels", "T": T, "top_k": k,
                      "kernels": kernels(lambda: dsa.select_packed(iq, iw, ik))}), flush=True)
if wanted("dsa_select_torch_kernels"):
    dsa_module.TRITON_DEVICES.clear()
    print(json.dumps({"case": "dsa_select_torch_kernels", "T": T, "top_k": k,
                      "kernels": kernels(lambda: dsa.select_packed(iq, iw, ik))}), flush=True)
    dsa_module.TRITON_DEVICES.update(fused_on)

if wanted("kth"):  # one chunk's k-th largest score a row: torch.topk's (what the selection uses) vs torch.kthvalue's
    rows = 1024  # (dsa.CHUNK's rows at 64K with 4 indexer heads); the last rows of a causal T
    kpos = torch.arange(T, device="cuda")
    scores = torch.rand(1, rows, T, device="cuda").masked_fill(kpos > kpos[-rows:, None], float("-inf"))
    by_topk = lambda: scores.topk(k, dim=-1, sorted=False).values.amin(-1)
    by_kthvalue = lambda: scores.kthvalue(T - k + 1, dim=-1).values  # (the -inf are the smallest)
    assert torch.equal(by_topk(), by_kthvalue())
    report("kth_topk", by_topk, rows=rows)
    report("kth_kthvalue", by_kthvalue, rows=rows)
    del scores

# flex_attention alone on synthetic selections
q, kk, v = (torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
report("sdpa_causal", lambda: F.scaled_dot_product_attention(q, kk, v, is_causal=True).sum().backward())
flex = torch.compile(flex_attention, dynamic=False)
pos = torch.arange(T, device="cuda")


def pattern_bits(name, rows=1024):
    """(1, T, T/32) bits of a synthetic selection, built `rows` query rows at a time."""
    g = torch.Generator(device="cuda").manual_seed(0)
    blocks = torch.rand(T // BLOCK, T // BLOCK, device="cuda", generator=g)  # per query block: key block order
    bits = torch.empty(1, T, T // 32, dtype=torch.int32, device="cuda")
    for a in range(0, T, rows):
        t = pos[a:a + rows, None]
        visible = pos[None] <= t
        if name == "local":
            chosen = visible & (t - pos[None] < k)
        else:
            if name == "spread":
                score = torch.rand(len(t), T, device="cuda", generator=g)
            else:  # the same random key blocks for every query of a block, the diagonal block first
                score = blocks[t[:, 0] // BLOCK].repeat_interleave(BLOCK, dim=1) + (pos[None] // BLOCK == t // BLOCK)
            score = score.masked_fill(~visible, -1)
            chosen = visible & (score >= score.topk(min(k, T), dim=-1).values[:, -1:])
        bits[0, a:a + rows] = pack_bits(chosen)
    return bits


causal_blocks = (T // BLOCK) * (T // BLOCK + 1) / 2
for name in ("local", "spread", "blocks"):
    if not wanted(f"flex_{name}"):
        continue
    bits = pattern_bits(name)
    bm = block_mask_of(bits, T)
    used = (bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum()).item() / causal_blocks
    report(f"flex_{name}", lambda bm=bm: flex(q, kk, v, block_mask=bm).sum().backward(), blocks=round(used, 3))
    del bits, bm


if args.model_tag:  # a trained indexer's choices on real text
    from nanochat.checkpoint_manager import load_model
    from nanochat.dataset import list_parquet_files, parquets_iter_batched, split_files
    model, tokenizer, _ = load_model("base", torch.device("cuda"), model_tag=args.model_tag)
    if args.fresh_indexers:
        torch.manual_seed(0)
        for b in model.blocks:
            if isinstance(b.mixer, SparseAttention):
                b.mixer.indexer.init_weights()
    layer = next(i for i, b in enumerate(model.blocks) if isinstance(b.mixer, SparseAttention))
    split_files(list_parquet_files(args.data_dir), "val")  # a clear error without shards
    ids = []
    for batch in parquets_iter_batched("val", args.data_dir):
        for doc in batch:
            ids += tokenizer.encode(doc, prepend="<|bos|>")
        if len(ids) >= T:
            break
    if len(ids) < T:
        raise SystemExit(f"--data_dir {args.data_dir}: its validation shard has {len(ids)} tokens, fewer than {T}")
    seen = {}
    mixer = model.blocks[layer].mixer
    hook = mixer.register_forward_pre_hook(lambda m, a: seen.setdefault("x", (a[0].detach(), a[1])))
    with torch.no_grad(), torch.amp.autocast("cuda", dtype=torch.bfloat16):
        model.eval()(torch.tensor([ids[:T]], device="cuda"))
    hook.remove()
    xt, mctx = seen["x"]
    with torch.no_grad(), torch.amp.autocast("cuda", dtype=torch.bfloat16):
        ctx = Context(mctx.cos, mctx.sin, 0, T, {}, idx=mctx.idx)
        tq, tw = mixer.indexer.queries(xt, ctx)
        tk = mixer.indexer.keys(xt, ctx)
    bits = mixer.select_packed(tq, tw, tk)
    t = torch.arange(max(0, T - 4096), T, 64, device="cuda")[:, None]  # 64 query rows near the end
    chosen_rows = dsa_module.unpack_bits(bits[0, t[:, 0]], T)
    kpos = torch.arange(T, device="cuda")[None]
    k_ = mixer.top_k
    bm = block_mask_of(bits, T)
    used = (bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum()).item() / causal_blocks
    if wanted("trained_choices"):
        print(json.dumps({"case": "trained_choices", "model_tag": args.model_tag, "fresh_indexers": bool(args.fresh_indexers),
                          "layer": layer, "T": T, "top_k": k_,
                          "recent_share": round((chosen_rows & (t - kpos < k_)).sum().item() / chosen_rows.sum().item(), 3),
                          "first_128_share": round((chosen_rows & (kpos < 128)).sum().item() / chosen_rows.sum().item(), 3),
                          "blocks": round(used, 3)}), flush=True)
    Hm, Dm = model.config.n_head, model.config.n_embd // model.config.n_head  # the checkpoint's shapes
    report("trained_select", lambda: mixer.select_packed(tq, tw, tk), H=Hm, D=Dm)
    q2, k2, v2 = (torch.randn(1, Hm, T, Dm, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    report("trained_flex", lambda: flex(q2, k2, v2, block_mask=bm).sum().backward(), blocks=round(used, 3), H=Hm, D=Dm)
    report("trained_sdpa_causal", lambda: F.scaled_dot_product_attention(q2, k2, v2, is_causal=True).sum().backward(),
           H=Hm, D=Dm)
    compiled_layer = torch.compile(mixer.train(), dynamic=False)
    xg = xt.clone().requires_grad_()

    def trained_step():
        c = Context(mctx.cos, mctx.sin, 0, T, {}, idx=mctx.idx, dsa_kernel="flex")
        with torch.amp.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled_layer(xg, c).float().square().mean() + sum(c.aux_losses)
        loss.backward()
    report("trained_layer", trained_step, H=Hm, D=Dm)
