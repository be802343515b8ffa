"""nanochat/decode_triton.py against SDPA with decode_masks' boolean mask (Triton's interpreter
on the CPU, conftest sets TRITON_INTERPRET; tests/test_gpu.py runs it compiled)."""

import pytest
import torch
import torch.nn.functional as F

from nanochat.attention import decode_masks

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors: the interpreter runs without a GPU")


def reference(q, k, v, pos, window):
    mask = decode_masks({window}, k.size(2), pos.view(-1, 1) if pos.dim() == 1 else pos.view(1))[window]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


@pytest.mark.parametrize("B,H,Hkv,S,D,pos,window", [
    (3, 4, 2, 200, 16, [0, 57, 199], 10 ** 6),   # per-row positions: the first sees one key; several segments
    (2, 6, 6, 130, 32, 129, 50),                 # one position for all rows, a window, G = 1
    (1, 3, 1, 100, 16, 70, 4),                   # G = 3 (padded to 16 rows), a window of 4
    (2, 2, 2, 300, 16, [299, 150], 64),          # a window that starts mid-segment
    (9, 4, 2, 200, 16, list(range(0, 180, 20)), 100),  # rows enough for one segment (no merge)
])
def test_decode_attention_equals_sdpa_with_the_mask(B, H, Hkv, S, D, pos, window):
    from nanochat.decode_triton import decode_attention, segments
    torch.manual_seed(0)
    q, k, v = torch.randn(B, H, 1, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    pos = torch.tensor(pos)
    assert (segments(B * Hkv, S, q.device) > 1) == (B < 9)  # the merge of several segments, or none
    counts = torch.zeros(B * Hkv, dtype=torch.int32)
    got = decode_attention(q, k, v, pos, window, counts)
    torch.testing.assert_close(got, reference(q, k, v, pos, window), rtol=1e-5, atol=1e-5)
    assert counts.eq(0).all()  # the last program of each (row, head) merged and set its count back
    # keys outside each row's view do not matter: garbage there changes nothing
    p = pos.view(-1, 1, 1) if pos.dim() else pos
    outside = (torch.arange(S).view(1, 1, S) > p) | (p - torch.arange(S).view(1, 1, S) >= window)
    k2 = torch.where(outside.unsqueeze(-1), torch.full_like(k, 1e4), k)
    v2 = torch.where(outside.unsqueeze(-1), torch.full_like(v, float("nan")), v)
    torch.testing.assert_close(decode_attention(q, k2, v2, pos, window), got, rtol=0, atol=0)
    # this step's key and value given (k_new, v_new): the kernel writes them at each row's position
    # (what was there does not matter) and nowhere else, and attends with them
    rows = torch.arange(B)
    p = pos if pos.dim() else pos.expand(B)
    k_new, v_new = k[rows, :, p].unsqueeze(2), v[rows, :, p].unsqueeze(2)
    k3, v3 = k.clone(), v.clone()
    k3[rows, :, p], v3[rows, :, p] = 7.0, float("nan")
    got2 = decode_attention(q, k3, v3, pos, window, counts, k_new, v_new)
    torch.testing.assert_close(got2, got, rtol=0, atol=0)
    assert torch.equal(k3, k) and torch.equal(v3, v) and counts.eq(0).all()


def test_the_custom_ops_pass_opcheck():
    """torch.library.opcheck on both ops (schema and declared mutations, fake tensors, AOT
    dispatch): what torch.compile relies on when it traces the decode step."""
    from nanochat import decode_triton as dt
    torch.manual_seed(0)
    B, H, Hkv, S, D = 2, 4, 2, 100, 16
    q, k, v = torch.randn(B, H, 1, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    pos, counts = torch.tensor([50, 99]), torch.zeros(B * Hkv, dtype=torch.int32)
    torch.library.opcheck(dt._decode_attention, (q, k, v, pos, 100, counts))
    torch.library.opcheck(dt._decode_attention_write, (q, k, v, pos, 100, counts, torch.randn(B, Hkv, 1, D),
                                                        torch.randn(B, Hkv, 1, D)))
    torch.library.opcheck(dt._gemv_op, (torch.randn(1, 64), torch.randn(24, 64), True))


def test_decode_attention_refuses_what_it_cannot_do():
    from nanochat.decode_triton import decode_attention
    with pytest.raises(ValueError, match="one query per row"):
        decode_attention(torch.randn(1, 2, 2, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), torch.tensor(3), 8)
    with pytest.raises(ValueError, match="power-of-two head dim"):
        decode_attention(torch.randn(1, 2, 1, 24), torch.randn(1, 2, 8, 24), torch.randn(1, 2, 8, 24), torch.tensor(3), 8)
    q, k = torch.randn(2, 2, 1, 16), torch.randn(2, 2, 8, 16)
    with pytest.raises(ValueError, match="both k_new and v_new"):
        decode_attention(q, k, k, torch.tensor(3), 8, None, torch.randn(2, 2, 1, 16))
    with pytest.raises(ValueError, match=r"k_new and v_new must be \(2, 2, 1, 16\)"):
        decode_attention(q, k, k, torch.tensor(3), 8, None, torch.randn(2, 1, 1, 16), torch.randn(2, 1, 1, 16))
    with pytest.raises(ValueError, match="counts must be 4 int32 zeros"):
        decode_attention(torch.randn(2, 2, 1, 16), torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16), torch.tensor(3), 8,
                         torch.zeros(3, dtype=torch.int32))


def test_set_decode_kernel_picks_triton_only_where_it_runs(monkeypatch):
    """GPT.set_decode_kernel: "auto" (chat_web's and chat_cli's default) is sdpa on a CPU, with
    a head dim the kernel cannot take, or without the triton package; "triton" there is
    refused, saying why."""
    import importlib.util
    from nanochat.gpt import GPTConfig, build_model
    find_spec = importlib.util.find_spec
    for n_embd, no_triton, why in [(64, False, "CUDA GPUs only"), (64, True, "needs the triton package"),
                                   (96, False, r"power-of-two head dim >= 16 \(this model's: \[24\]\)")]:
        if no_triton:
            monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))
        model = build_model(GPTConfig(sequence_len=32, vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=n_embd), "cpu")
        model.decode_kernel = "triton"
        assert model.set_decode_kernel("auto").decode_kernel == "sdpa"
        with pytest.raises(ValueError, match=why):
            model.set_decode_kernel("triton")
        with pytest.raises(ValueError, match="use auto, sdpa or triton"):
            model.set_decode_kernel("flash")
        assert model.decode_kernel == "sdpa"
        monkeypatch.undo()


@pytest.mark.parametrize("per_row,B,stack,hybrid", [(False, 2, False, False), (True, 2, False, False),
                                                    (False, 1, False, True), (True, 1, True, False)])
def test_decode_steps_with_the_kernel_equal_sdpa(per_row, B, stack, hybrid, monkeypatch):
    """GPT.decode_kernel = "triton": teacher-forced decode steps of a windowed GQA model (the
    quality recipe's value embeddings too) give SDPA's logits, at one shared position and at
    each row's own (continuous batching). At batch 1 the linears run decode_triton.gemv too
    (q, k, v apart or stacked; a Mamba-3 layer's stacked input projections and output)."""
    from nanochat import decode_triton
    from nanochat.gpt import GPTConfig, build_model
    mamba = dict(mamba_pattern="AAM", mamba3_qknorm=True, mamba3_bias=True, mamba3_complex_rope=True,
                 mamba3_trapezoidal=True, mamba3_d_state=16, mamba3_headdim=16) if hybrid else {}
    cfg = GPTConfig(sequence_len=96, vocab_size=300, n_layer=4 if hybrid else 3, n_head=4, n_kv_head=2, n_embd=64,
                    window_pattern="SSL", value_embeds=True, **mamba)  # (AAMA: the last layer stays attention)
    torch.manual_seed(0)
    model = build_model(cfg, "cpu").eval()
    with torch.no_grad():  # (the output projections start at zero: attention must matter here)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if stack:
        model.stack_projections()
    idx = torch.randint(0, 300, (B, 90))
    runs, calls, fused = [], [], []
    real, real_norm = decode_triton.gemv, decode_triton.gemv_norm
    monkeypatch.setattr(decode_triton, "gemv", lambda x, w, *a, **k: calls.append(tuple(w.shape)) or real(x, w, *a, **k))
    monkeypatch.setattr(decode_triton, "gemv_norm",
                        lambda x, w, mix: calls.append(tuple(w.shape)) or fused.append(1) or real_norm(x, w, mix))
    for kernel in ("sdpa", "triton"):
        model.decode_kernel = kernel
        with torch.inference_mode():
            cache = model.init_cache(B, 96)
            model(idx[:, :70], cache=cache)
            steps = []
            for t in range(70, 90):
                pos = torch.tensor([t] * B) if per_row else torch.tensor(t)
                steps.append(model.decode_step(idx[:, t:t + 1], cache, pos))
        runs.append(torch.stack(steps))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-4, atol=1e-4)
    assert runs[0].std() > 0.1  # (a model whose attention says something)
    # at batch 1 every routed linear of every triton step: attention q, k, v (or stacked) and
    # c_proj, Mamba-3's stacked inputs and c_proj, the MLP's two; none at batch 2
    per_layer = {"attn": 1 + (1 if stack else 3), "mamba3": 2}
    want = sum(per_layer["mamba3" if type(blk.mixer).__name__ == "Mamba3" else "attn"] + 2 for blk in model.blocks)
    assert len(calls) == (20 * want if B == 1 else 0), (len(calls), want)
    # batch 1 with stacked projections: each attention block's first gemv takes its norm too (Block.decode_row)
    attn = sum(type(blk.mixer).__name__ == "CausalSelfAttention" for blk in model.blocks)
    assert len(fused) == (20 * attn if B == 1 and stack else 0)


def test_the_kernel_is_one_op_to_torch_compile():
    """The decode step compiles with the kernel as one opaque op: no graph break (which would
    split the compiled step into more kernels), the eager step's logits."""
    from torch._dynamo.utils import counters
    from nanochat.gpt import GPTConfig, build_model
    cfg = GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    torch.manual_seed(0)
    model = build_model(cfg, "cpu").eval()
    model.decode_kernel = "triton"
    idx = torch.randint(0, 300, (1, 41))
    with torch.inference_mode():
        cache = model.init_cache(1, 64)
        model(idx[:, :40], cache=cache)
        want = model.decode_step(idx[:, 40:], cache, torch.tensor(40))
        torch._dynamo.reset()
        counters.clear()
        got = torch.compile(model.decode_step, backend="aot_eager", dynamic=False)(idx[:, 40:], cache, torch.tensor(40))
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("N,K,dtype,bk", [(7, 40, torch.float32, None), (33, 1100, torch.float32, None),
                                          (33, 1100, torch.float32, 1024), (64, 96, torch.bfloat16, None)])
def test_gemv_equals_the_matmul(N, K, dtype, bk, monkeypatch):
    """decode_triton.gemv: one row times (N, K), N odd or not a multiple of the programs' rows,
    K in one tile of columns (the default's) or past one (1,100 > 1,024: two, the second partly
    masked); x cast to w's dtype; a strided weight; relu2 (the MLP's relu(·)²); bad shapes refused."""
    from nanochat import decode_triton
    from nanochat.decode_triton import gemv
    if bk:
        monkeypatch.setattr(decode_triton, "GEMV_BK", bk)
    torch.manual_seed(N)
    x, w = torch.randn(1, 1, K), torch.randn(N, K).to(dtype)
    got = gemv(x, w)
    assert got.shape == (1, 1, N) and got.dtype == dtype
    want = (x.to(dtype).double() @ w.double().T).to(dtype)
    torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-4)
    wide = torch.randn(N, 2 * K)  # a column-strided view (copied) and a row-strided one (read in place)
    torch.testing.assert_close(gemv(x[0, 0], wide[:, ::2]), x[0, 0] @ wide[:, ::2].T, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gemv(x[0, 0], wide[:, K:]), x[0, 0] @ wide[:, K:].T, rtol=1e-5, atol=1e-4)
    assert (want < 0).any()
    torch.testing.assert_close(gemv(x, w, relu2=True).float(), want.float().relu().square(),
                               rtol=1e-5 if dtype == torch.float32 else 2e-2, atol=1e-3)
    with pytest.raises(ValueError, match="one row"):
        gemv(torch.randn(2, K), w)


@pytest.mark.parametrize("K,dtype,bk", [(40, torch.float32, None), (1100, torch.float32, 1024),
                                        (96, torch.bfloat16, None)])
def test_gemv_prologue_and_epilogue_equal_the_block_s_pytorch(K, dtype, bk, monkeypatch):
    """What a block does around its linears inside gemv (Block.decode_row): the norm before
    the product (every tile of a K past one: 1,100 in tiles of 1,024), relu² and the
    residual add after it; gemv_norm with the per-layer lambdas x' = r x + a x0 first,
    returning the product, norm(x') and x', each rounded once from fp32 (as inductor's
    kernels do); without lambdas x' = x."""
    from nanochat import decode_triton
    from nanochat.attention import norm
    from nanochat.decode_triton import gemv, gemv_norm
    if bk:
        monkeypatch.setattr(decode_triton, "GEMV_BK", bk)
    torch.manual_seed(K)
    x, x0, w = torch.randn(1, 1, K).to(dtype) * 3, torch.randn(1, 1, K).to(dtype), torch.randn(33, K).to(dtype)
    res = torch.randn(1, 1, 33).to(dtype)
    r, a = torch.tensor(1.15), torch.tensor(0.2)  # fp32 lambdas, rounded to the row's dtype as the step does

    def close(got, want):  # bf16: the norm's sum in another order may round an element the other way
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-4)
        else:
            assert ((got.double() - want.double()).norm() / want.double().norm()).item() < 2e-2
    close(gemv(x, w, relu2=True, norm=True, residual=res), res.double() + F.relu(norm(x).double() @ w.double().T).square())
    close(gemv(x, w, residual=res), res.double() + x.double() @ w.double().T)
    xm = r.to(dtype) * x + a.to(dtype) * x0
    y, xn, got_xm = gemv_norm(x, w, (r, a, x0))
    close(got_xm, xm)
    close(xn, norm(xm))
    close(y, norm(xm).double() @ w.double().T)
    y, xn, same = gemv_norm(x, w)
    assert torch.equal(same, x)
    close(y, norm(x).double() @ w.double().T)
    with pytest.raises(ValueError, match="residual"):
        gemv(x, w, residual=torch.randn(1, 1, 32))


def test_gemv_passes_opcheck_and_runs_only_where_asked():
    """nanochat::gemv as torch.library.opcheck checks it (the fake's shape and dtype); and
    attention.linear sends only a one-row, no-autograd product of a Triton decode step to it."""
    from types import SimpleNamespace
    from nanochat import decode_triton
    from nanochat.attention import linear
    x, w = torch.randn(1, 24), torch.randn(10, 24)
    torch.library.opcheck(decode_triton._gemv_op, (x, w))
    torch.library.opcheck(decode_triton._gemv_op, (x, w, True))
    torch.library.opcheck(decode_triton._gemv_op, (x, w, True, True, torch.randn(1, 10)))
    torch.library.opcheck(decode_triton._gemv_norm_op, (x, w, torch.randn(1, 24), torch.tensor(1.1), torch.tensor(0.3)))
    torch.library.opcheck(decode_triton._gemv_norm_op, (x, w))
    calls = []
    real = decode_triton.gemv
    decode_triton.gemv = lambda x, w, relu2: calls.append(1) or real(x, w, relu2)
    try:
        lin = torch.nn.Linear(24, 10, bias=False)
        step, other = SimpleNamespace(decode_kernel="triton"), SimpleNamespace(decode_kernel="sdpa")
        with torch.no_grad():
            for x_, ctx in [(torch.randn(2, 24), step), (x, other), (x, None)]:
                linear(x_, lin, ctx)
            assert calls == []
            torch.testing.assert_close(linear(x, lin, step), lin(x))
            assert calls == [1]
            torch.testing.assert_close(linear(x, lin, step, relu2=True), lin(x).relu().square())
            torch.testing.assert_close(linear(x, lin, other, relu2=True), lin(x).relu().square())
            assert calls == [1, 1]
            with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 weights, bf16 compute: F.linear
                linear(x, lin, step)
            assert calls == [1, 1]
            lin16 = torch.nn.Linear(24, 10, bias=False).to(torch.bfloat16)  # chat's serving: bf16 weights, autocast
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got, want = linear(x, lin16, step), lin16(x)
            assert calls == [1, 1, 1] and got.dtype == want.dtype == torch.bfloat16
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        linear(x, lin, step)  # autograd on
        assert calls == [1, 1, 1]
    finally:
        decode_triton.gemv = real


@pytest.mark.parametrize("stack,cache_len,extra", [(False, 48, None), (True, 48, None), (False, 512, None),
                                                   (False, 600, None), (True, 48, "mhc"), (True, 48, "engram")])
def test_a_decode_step_through_the_triton_kernels_equals_the_sdpa_one(stack, cache_len, extra):
    """GPT.decode_step with decode_kernel "triton" (set directly: set_decode_kernel refuses it on
    a CPU), under the interpreter: the attention kernel writes each layer's k and v into the
    cache itself and the one-row linears run decode_triton.gemv; the same logits and the same
    cache as the SDPA step, over a few steps of the quality recipe (value embeddings, windows)
    from a prefilled cache, batch 1 (gemv) and batch 2 with per-row positions (batching). A
    512-position cache: 8 segments of one tile each, merged, with the write; a 600-position
    one: programs of several tiles, where the step writes the cache first and the kernel reads
    it (writes_new). mHC with one stream: a batch-1 row still, whose blocks take the plain
    forward with the layer lambdas applied first (they were skipped once); Engram on layer
    0: that block's attention unfused, its MLP fused (Block.decode_row)."""
    from nanochat.decode_triton import segments, writes_new
    from nanochat.gpt import GPTConfig, build_model
    assert writes_new(2, cache_len, torch.device("cpu")) == (cache_len < 600)
    assert (segments(2, cache_len, torch.device("cpu")) > 1) == (cache_len > 48)
    cfg = GPTConfig(sequence_len=48, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL",
                    value_embeds=True, smear=True, backout=True, layer_lambdas=True, qk_scale=1.2, pad_vocab_to=64,
                    short_window_div=4, window_tile=8, mhc=extra == "mhc", mhc_streams=1,
                    engram_layers="0" if extra == "engram" else "", engram_dim=32, engram_table=64)
    torch.manual_seed(0)
    model = build_model(cfg, "cpu").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if stack:
        model.stack_projections()
    prompt = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(1))
    for B, per_row in ((1, False), (2, True)):
        caches, outs = {}, {}
        for kernel in ("sdpa", "triton"):
            model.decode_kernel = "sdpa"
            cache = model.init_cache(B, cache_len)
            with torch.no_grad():
                model(prompt.expand(B, -1), cache=cache)
                model.decode_kernel = kernel
                ids, logits = torch.full((B, 1), 5), []
                for step in range(3):
                    pos = torch.full((B,), 20 + step) if per_row else torch.tensor(20 + step)
                    logits.append(model.decode_step(ids, cache, pos))
                    ids = logits[-1].argmax(-1, keepdim=True)
            caches[kernel], outs[kernel] = cache, torch.stack(logits)
        torch.testing.assert_close(outs["triton"], outs["sdpa"], rtol=1e-4, atol=1e-4)
        for a, b in zip(caches["triton"].layers, caches["sdpa"].layers):
            torch.testing.assert_close(a.k[:, :, :23], b.k[:, :, :23], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a.v[:, :, :23], b.v[:, :, :23], rtol=1e-5, atol=1e-5)
