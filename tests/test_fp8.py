"""FP8 training matmuls (nanochat/fp8.py), checked on the CPU (torch._scaled_mm runs there
too): quantization error within the formats' precision, the three matmuls against an
fp32 reference, convert() leaving parameters and eval untouched, and a model that learns."""

import pytest
import torch
import torch.nn as nn

from nanochat import fp8
from nanochat.gpt import GPT, GPTConfig, build_model


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_to_fp8_roundtrip_within_format_precision():
    torch.manual_seed(0)
    t = torch.randn(256, 64) * 3.0
    for dtype, mantissa_bits in ((fp8.E4M3, 3), (fp8.E5M2, 2)):
        t8, inv = fp8.to_fp8(t, dtype)
        assert t8.dtype == dtype
        back = t8.float() * inv
        # normal numbers round to nearest: relative error <= 2^-(m+1); the largest maps to fmax
        big = t.abs() > t.abs().max() / 64
        assert ((back - t).abs()[big] / t.abs()[big]).max() <= 2.0 ** -(mantissa_bits + 1) + 1e-6
        assert torch.isclose(back.abs().max(), t.abs().max(), rtol=2.0 ** -(mantissa_bits + 1))
    # an all-zero tensor must not divide by zero
    z8, inv = fp8.to_fp8(torch.zeros(16, 16), fp8.E4M3)
    assert torch.isfinite(inv) and (z8.float() == 0).all()


def test_fp8_linear_matches_fp32_forward_and_both_gradients():
    torch.manual_seed(0)
    layer = fp8.FP8Linear(128, 96, bias=False)
    ref = nn.Linear(128, 96, bias=False)
    ref.weight.data.copy_(layer.weight.data)
    x = torch.randn(4, 16, 128)
    x1, x2 = x.clone().to(torch.bfloat16).requires_grad_(), x.clone().requires_grad_()
    y = layer(x1)
    y_ref = ref(x2)
    assert y.dtype == torch.bfloat16 and y.shape == (4, 16, 96)
    g = torch.randn_like(y_ref)
    y.backward(g.to(torch.bfloat16))
    y_ref.backward(g)
    assert layer.weight.grad.dtype == torch.float32  # straight into the master weights' dtype
    # E4M3 x E4M3 forward: a few percent; E5M2 gradients: a bit more
    assert rel_err(y, y_ref) < 0.05
    assert rel_err(x1.grad, x2.grad) < 0.08
    assert rel_err(layer.weight.grad, ref.weight.grad) < 0.08
    # and it really is quantized: not the bf16 result
    assert rel_err(y, y_ref) > 1e-3


def test_fp8_linear_falls_back_where_scaled_mm_cannot_run():
    torch.manual_seed(0)
    layer = fp8.FP8Linear(64, 32, bias=False)
    x = torch.randn(3, 5, 64)  # 15 rows: not a multiple of 16
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight))
    layer.eval()
    x = torch.randn(2, 16, 64)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight))


def tiny_model():
    cfg = GPTConfig(sequence_len=32, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    torch.manual_seed(0)
    return build_model(cfg, "cpu")


def test_convert_keeps_parameters_and_eval_results():
    model, plain = tiny_model(), tiny_model()
    keys = list(model.state_dict())
    n = fp8.convert(model)
    assert n == 2 * 6  # q, k, v, attention out, MLP in, MLP out per block
    assert list(model.state_dict()) == keys
    assert type(model.lm_head) is nn.Linear  # the lm_head stays bf16
    assert all(isinstance(m, fp8.FP8Linear) for b in model.blocks for m in b.modules() if isinstance(m, nn.Linear))
    idx = torch.randint(0, 97, (2, 32))
    model.eval(), plain.eval()
    torch.testing.assert_close(model(idx), plain(idx))  # eval is the plain model, bit for bit
    # a plain model loads the converted model's checkpoint
    plain.load_state_dict(model.state_dict())


def test_tiny_model_learns_with_fp8_like_with_bf16():
    idx = torch.randint(0, 97, (4, 33), generator=torch.Generator().manual_seed(1))
    final = {}
    for use_fp8 in (False, True):
        model = tiny_model()
        with torch.no_grad():  # zero-initialized output projections give the FP8 path nothing to scale
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        if use_fp8:
            fp8.convert(model)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(60):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(idx[:, :-1], idx[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        final[use_fp8] = loss.item()
    assert final[False] < 1.0, final  # it memorizes the batch (from ln 97 = 4.6)
    assert final[True] < 1.0, final
    assert abs(final[True] - final[False]) < 0.5, final


def test_whole_model_gradients_stay_close_to_bf16():
    # one batch through a 4-layer model: the loss agrees closely; every weight's gradient
    # carries E5M2 rounding compounded through the layers (10-18% here), not more
    models = []
    for use_fp8 in (False, True):
        cfg = GPTConfig(sequence_len=256, vocab_size=512, n_layer=4, n_head=4, n_kv_head=2, n_embd=256)
        torch.manual_seed(0)
        model = build_model(cfg, "cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        if use_fp8:
            fp8.convert(model)
        models.append(model)
    idx = torch.randint(0, 512, (4, 257), generator=torch.Generator().manual_seed(1))
    losses = []
    for model in models:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-2 * losses[0], losses
    for (n, p_ref), p_f8 in zip(models[0].named_parameters(), models[1].parameters()):
        assert 1e-3 < rel_err(p_f8.grad, p_ref.grad) < 0.25, n


def test_convert_refuses_devices_without_fp8_matmuls():
    cfg = GPTConfig(sequence_len=32, vocab_size=97, n_layer=1, n_head=4, n_kv_head=2, n_embd=64)
    with torch.device("meta"):
        model = GPT(cfg)
    with pytest.raises(ValueError, match="not on meta. Train without --fp8"):
        fp8.convert(model)
