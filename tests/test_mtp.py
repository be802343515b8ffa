"""DeepSeek-V3 multi-token prediction (nanochat/mtp.py): it learns what only a look one
token further ahead can, lambda 0 leaves the trunk alone, inference ignores it, masked
targets never index the embedding and count zero, and the training stages run with it."""

import json
import os
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

from nanochat.gpt import GPTConfig, build_model
from test_base_train import base_dir, run_train  # noqa: F401 (a fixture)
from test_gpt import assert_causal_bit_exact, init_twice_over_garbage

V = 8


def config(**kw):
    return GPTConfig(**{**dict(sequence_len=30, vocab_size=V, n_layer=2, n_head=2, n_kv_head=1, n_embd=64), **kw})


def perturbed(cfg, seed=0):
    """A model whose zero-initialised output projections are perturbed, so every path carries signal."""
    torch.manual_seed(seed)
    model = build_model(cfg, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def same_trunk(cfg_mtp):
    """A model without MTP and one with it, sharing every trunk weight."""
    plain = perturbed(config(**{k: v for k, v in cfg_mtp.__dict__.items() if not k.startswith("mtp")}))
    model = perturbed(cfg_mtp, seed=1)
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("mtp.") for k in missing)
    return plain, model


def triples(B, n=10, seed=0):
    """Rows of triples (a, b, (a + b) mod V), a and b uniform: the third token follows from
    the two before it, the second from nothing."""
    g = torch.Generator().manual_seed(seed)
    ab = torch.randint(0, V, (B, n, 2), generator=g)
    return torch.cat([ab, ab.sum(-1, keepdim=True) % V], dim=-1).view(B, 3 * n)


def train(model, shift, steps=400):
    """Fresh rows every step (the rule, not the rows, is to be learned); targets `shift` ahead."""
    opts = model.setup_optimizers(unembedding_lr=0.02, embedding_lr=0.2, matrix_lr=0.05)
    for step in range(steps):
        seq = triples(32, n=11, seed=100 + step)  # 33 tokens
        model(seq[:, :-shift].contiguous(), seq[:, shift:].contiguous()).backward()
        for o in opts:
            o.step()
        model.zero_grad(set_to_none=True)


def test_mtp_learns_two_ahead_rule_a_one_step_head_cannot():
    """t[3j+2] = (t[3j] + t[3j+1]) mod V. MTP module 1 at position 3j sees t[3j] (through the
    trunk) and t[3j+1] (its input token), so it can predict t[3j+2]; a head asked for t[i+2]
    from t[<=i] alone (the main head trained on targets shifted by two) cannot: b is random."""
    torch.manual_seed(0)
    model = build_model(config(sequence_len=32, mtp=True, mtp_lambda=1.0), "cpu")
    train(model, shift=1)
    # evaluate on fresh rows, the MTP targets restricted to the rule's tokens: MTP at i predicts
    # targets[:, i+1] = t[i+2], a rule token iff i + 2 = 2 mod 3
    test = triples(64, n=11, seed=1)
    x, y = test[:, :-1], test[:, 1:].clone()
    pos = torch.arange(32)
    y[:, (pos + 1) % 3 != 2] = -1              # keep targets[:, i] = t[i+1] only for rule tokens
    with torch.no_grad():
        _, _, mtp = model(x, y, return_parts=True)
    assert mtp < 0.15, mtp  # 0.05 when written

    # the one-step head: targets t[i+2] from t[<=i], on the same rule tokens
    shifted = build_model(config(sequence_len=32), "cpu")
    train(shifted, shift=2)
    x2, y2 = test[:, :-2], test[:, 2:].clone()
    y2[:, (torch.arange(31) + 2) % 3 != 2] = -1
    with torch.no_grad():
        loss = shifted(x2, y2)
    assert loss > 1.5, loss  # log(8) = 2.08 at best: b is uniform and unseen


def test_lambda_zero_leaves_the_trunk_gradients_unchanged():
    plain, model = same_trunk(config(mtp=True, mtp_lambda=0.0, mtp_depth=2))
    idx = torch.randint(0, V, (3, 30))
    y = idx.roll(-1, 1)
    y[:, -1] = -1
    plain(idx, y).backward()
    loss, main, mtp = model(idx, y, return_parts=True)
    loss.backward()
    assert mtp > 0 and torch.equal(loss.detach(), main)
    grads = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        if name.startswith("mtp."):
            assert p.grad is None or not p.grad.any(), name
        else:
            assert torch.equal(p.grad, grads[name].grad), name


def test_main_logits_losses_and_decoding_unaffected_by_the_module():
    plain, model = same_trunk(config(mtp=True, mtp_depth=2))
    plain.eval(), model.eval()
    idx = torch.randint(0, V, (2, 30))
    y = idx.roll(-1, 1)
    y[:, -1] = -1
    with torch.no_grad():
        assert torch.equal(plain(idx), model(idx))
        assert torch.equal(plain(idx, y, loss_reduction="none"), model(idx, y, loss_reduction="none"))
        assert model(idx, y) > plain(idx, y)  # the mean loss does add the MTP term
        decoded = []
        for m in (plain, model):
            cache = m.init_cache(2, 30)
            m(idx[:, :10], cache=cache)
            decoded.append(torch.stack([m.decode_step(idx[:, t:t + 1], cache, torch.tensor(t)) for t in range(10, 30)]))
    assert torch.equal(decoded[0], decoded[1])


def test_mtp_modules_are_causal():
    """Module k's hidden state at position i sees tokens up to i + k only (its input token
    t_{i+k}): changing the tokens from t on leaves positions before t - k bit-identical."""
    model = perturbed(config(mtp=True, mtp_depth=2)).eval()
    seen = {}
    for k, block in enumerate(model.mtp.blocks, start=1):
        block.register_forward_hook(lambda mod, inp, out, k=k: seen.__setitem__(k, out))

    def module_states(k):
        def fn(idx):
            model(idx[:, :-1], idx[:, 1:])
            return F.pad(seen[k], (0, 0, k, 0))  # shift by k: position i + k holds module k's state at i
        return fn
    for k in (1, 2):
        assert_causal_bit_exact(module_states(k), V, T=30, cuts=(3, 9, 20))


def test_masked_targets_never_reach_wte_and_count_zero():
    model = perturbed(config(mtp=True, mtp_depth=2))
    seen = []
    model.wte.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    idx = torch.randint(0, V, (2, 30))
    y = idx.roll(-1, 1)
    y[:, 0] = y[:, -1] = y[:, 5:9] = -1             # masked at the start, the end and in between
    y[1] = -1                                       # row 1: nothing to learn
    loss, _, mtp = model(idx, y, return_parts=True)
    loss.backward()
    # wte embeds the inputs, shifted for module k (t_{i+k}), never the targets with their -1s
    assert len(seen) == 3 and all(torch.equal(e, idx[:, k:]) for k, e in enumerate(seen))
    # row 1 counts zero: the mean MTP loss is row 0's alone
    _, _, mtp0 = model(idx[:1], y[:1], return_parts=True)
    assert torch.allclose(mtp, mtp0, atol=1e-6), (mtp, mtp0)
    # nothing valid at all: the MTP loss is 0 (not NaN) and its weights get zero gradients
    model.zero_grad(set_to_none=True)
    none = torch.full_like(y, -1)
    loss, main, mtp = model(idx, none, loss_reduction="sum", return_parts=True)
    assert loss == 0 and mtp == 0
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.mtp.parameters())


def test_loss_against_the_equations():
    """Depth 2, by hand: module k at position i reads t_{i+k} and h^{k-1}_i, predicts t_{i+k+1};
    each L^k is normalised by its own valid targets; masked main targets do not hide MTP
    targets (the input token is read from idx)."""
    from nanochat.attention import Context, norm
    model = perturbed(config(mtp=True, mtp_depth=2, mtp_lambda=0.5))
    T = 30
    idx = torch.randint(0, V, (2, T))
    y = idx.roll(-1, 1)
    y[:, -1] = -1
    y[0, 3:7] = -1
    h = model._trunk(model._embed(idx, None), model._context(idx, 0), None)
    main = F.cross_entropy(model._logits(h).view(-1, V), y.view(-1), ignore_index=-1)
    ls = []
    for k in (1, 2):
        n = T - k
        e = norm(model.wte(idx[:, k:]))
        h = model.mtp.proj[k - 1](torch.cat([norm(h[:, :n]), e], -1))
        h = model.mtp.blocks[k - 1](h, Context(model.cos[:, :n], model.sin[:, :n], 0, n, {}))
        tgt = y[:, k:]
        valid = tgt >= 0
        assert valid.sum() == 2 * n - 2 - 4  # only each row's end and the masked four
        ls.append(F.cross_entropy(model._logits(norm(h))[valid], tgt[valid]))
    expect = main + 0.5 * (ls[0] + ls[1]) / 2
    assert torch.allclose(model(idx, y), expect, atol=1e-5)


def test_every_parameter_initialised_and_in_one_optimizer_group():
    cfg = GPTConfig(sequence_len=16, vocab_size=50, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, mtp=True, mtp_depth=2)
    model, states = init_twice_over_garbage(cfg)
    assert any(k.startswith("mtp.proj.1") for k in states[0])
    assert all(torch.isfinite(t).all() for t in model.parameters())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    tags = model.opt_tags()
    assert tags["mtp.proj.0.weight"] == "muon" and tags["mtp.blocks.1.mixer.c_q.weight"] == "muon"
    adamw, muon = model.setup_optimizers()
    seen = [id(p) for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())


def test_flops_count_the_modules_and_the_extra_lm_head_passes():
    plain, model = same_trunk(config(mtp=True, mtp_depth=2))
    C, T = 64, 30
    # c_q, c_proj C x C; c_k, c_v C x 32 (1 kv head of 32); MLP 8 C^2 -> 6 * 8 C^2 below
    per_module = 6 * 2 * C * C + 6 * (2 * C * C + 2 * C * 32) + 6 * 8 * C * C + 12 * 2 * 32 * T + 6 * V * C
    assert model.estimate_flops() == plain.estimate_flops() + 2 * per_module


def test_mtp_depth_must_be_positive():
    with pytest.raises(ValueError, match="mtp_depth=0"):
        build_model(config(mtp=True, mtp_depth=0), "cpu")


def test_sft_style_sum_loss_with_padding_trains_the_module():
    """chat_sft's call: summed loss over padded rows (-1 after the end, -1 on prompt tokens)
    divided by the trained-token count; MTP's weights get gradients, no index error."""
    model = perturbed(config(mtp=True))
    idx = torch.randint(0, V, (2, 30))
    y = idx.roll(-1, 1)
    y[:, :8] = -1          # the prompt
    y[0, 20:] = -1         # row 0 is padding from 20 on
    loss = model(idx, y, loss_reduction="sum") / (y >= 0).sum()
    main = model(idx, y, loss_reduction="none").sum() / (y >= 0).sum()
    assert loss > main
    loss.backward()
    assert model.mtp.proj[0].weight.grad.abs().sum() > 0


def test_base_train_with_mtp_logs_its_loss_and_the_checkpoint_rebuilds(base_dir, corpus_dir):  # noqa: F811
    flags = ("--mtp", "--mtp_lambda=0.3", "--mtp_depth=2")
    out = run_train(base_dir, corpus_dir, *flags, "--save_every=3", "--model_tag=mtp")
    mtp = re.findall(r"mtp_loss: ([\d.]+)", out)
    assert len(mtp) == 6 and float(mtp[-1]) < float(mtp[0]), out
    # a run resumed at step 3 continues exactly, the modules' loss included
    ckpt = base_dir / "base_checkpoints" / "mtp"
    shutil.copytree(ckpt, base_dir / "base_checkpoints" / "mtp_resumed")
    for f in ("meta_000006.json", "model_000006.pt", "state_000006_rank0.pt"):
        os.remove(base_dir / "base_checkpoints" / "mtp_resumed" / f)
    resumed = run_train(base_dir, corpus_dir, *flags, "--resume_from_step=3", "--model_tag=mtp_resumed")
    assert re.findall(r"mtp_loss: ([\d.]+)", resumed) == mtp[3:], resumed
    meta = json.loads((base_dir / "base_checkpoints" / "mtp" / "meta_000006.json").read_text())
    assert meta["model_config"]["mtp"] and meta["model_config"]["mtp_depth"] == 2
    from nanochat.checkpoint_manager import build_from_checkpoint
    model, _ = build_from_checkpoint(str(base_dir / "base_checkpoints" / "mtp"), 6, torch.device("cpu"), "eval")
    assert len(model.mtp.blocks) == 2
    state = torch.load(base_dir / "base_checkpoints" / "mtp" / "model_000006.pt", map_location="cpu")
    for k, v in model.state_dict().items():
        if k.startswith("mtp."):
            assert torch.equal(v, state[k].to(v.dtype)), k  # the trained module, not a fresh one


def test_mid_train_and_chat_sft_train_the_module_from_the_checkpoint(tmp_path, tokenizer, corpus_dir):
    """The later stages rebuild the model from the checkpoint's config (mtp=True) and keep
    training the module: its weights move in each stage, on SFT's masked, padded targets too."""
    from tasks.fixtures import write_task_fixtures
    from test_chat_chain import run
    shutil.copytree(tokenizer.directory, tmp_path / "tokenizer")
    data = write_task_fixtures(str(tmp_path / "task_data"))
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path), NANOCHAT_TASK_DATA=data, OMP_NUM_THREADS="1",
               NANOCHAT_WORDS_FILE=os.path.join(data, "words.txt"), HF_HUB_OFFLINE="1")
    run(env, "scripts.base_train", "--depth=2", "--max_seq_len=128", "--device_batch_size=2", "--total_batch_size=256",
        "--num_iterations=2", "--eval_every=-1", "--eval_tokens=256", "--core_metric_every=-1", "--sample_every=-1",
        f"--data_dir={corpus_dir}", "--mtp")
    mid = run(env, "scripts.mid_train", "--device_batch_size=2", "--total_batch_size=512", "--num_iterations=2",
              "--eval_every=-1", "--eval_tokens=512", "--simple_spelling=20", "--spelling_bee=20").stdout
    sft = run(env, "scripts.chat_sft", "--device_batch_size=2", "--target_examples_per_step=4", "--num_iterations=2",
              "--eval_every=-1", "--eval_steps=1", "--eval_metrics_every=-1", "--smoltalk_examples=8",
              "--simple_spelling=4", "--spelling_bee=4").stdout
    for out in (mid, sft):
        mtp = [float(v) for v in re.findall(r"step \d+/00002 \| loss: [\d.]+ \| mtp_loss: ([\d.]+)", out)]
        assert len(mtp) == 2 and all(0 < v < 20 for v in mtp), out
    states = [torch.load(tmp_path / d / "d2" / f"model_00000{s}.pt", map_location="cpu")
              for d, s in (("base_checkpoints", 2), ("mid_checkpoints", 2), ("chatsft_checkpoints", 2))]
    for before, after in zip(states, states[1:]):
        assert not torch.equal(before["mtp.proj.0.weight"], after["mtp.proj.0.weight"])
        assert not torch.equal(before["mtp.blocks.0.mlp.c_fc.weight"], after["mtp.blocks.0.mlp.c_fc.weight"])
