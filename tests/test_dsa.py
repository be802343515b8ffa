"""DeepSeek sparse attention (nanochat/dsa.py): the selection, its causality, the detached
indexer and its KL loss, the stages, and decoding with the index cache."""

import dataclasses

import pytest
import torch

from nanochat.gpt import GPTConfig, build_model
from tests.test_gpt import assert_causal_bit_exact, init_twice_over_garbage

V = 97


def config(top_k=6, T=32, **kw):
    return GPTConfig(sequence_len=T, vocab_size=V, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, dsa_start_layer=1,
                     dsa_top_k=top_k, dsa_heads=2, dsa_dim=16, **kw)


def model_of(cfg, seed=0):
    torch.manual_seed(seed)
    m = build_model(cfg, "cpu")
    with torch.no_grad():  # c_proj starts at zero: make every layer matter
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def chosen_sets(m, idx, layer=1):
    """The key sets that layer `layer` chose for idx (B, T, S bool), from a training-mode forward."""
    mixer = m.blocks[layer].mixer
    seen = {}
    orig = mixer.indexer_loss
    mixer.indexer_loss = lambda q, k, scores, allowed: (seen.setdefault("chosen", allowed), orig(q, k, scores, allowed))[1]
    m(idx, idx)
    mixer.indexer_loss = orig
    return seen["chosen"]


def test_plan_and_groups():
    m = model_of(config())
    assert [s.mixer for s in m.plan] == ["attn", "dsa", "dsa"]
    tags = m.opt_tags()
    assert tags["blocks.1.mixer.indexer.wq.weight"] == "adamw_dsa" and tags["blocks.1.mixer.c_q.weight"] == "muon"
    adamw, _ = m.setup_optimizers()
    dsa = [g for g in adamw.param_groups if g["tag"] == "adamw_dsa"]
    assert len(dsa) == 1 and len(dsa[0]["params"]) == 6 and dsa[0]["lr"] == 1e-3
    built, states = init_twice_over_garbage(config())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    with pytest.raises(ValueError, match="dsa_start_layer 5"):
        build_model(dataclasses.replace(config(), dsa_start_layer=5), "cpu")


def test_top_k_at_least_the_context_is_dense_attention_exactly():
    dense = model_of(dataclasses.replace(config(), dsa_start_layer=-1))
    sparse = model_of(config(top_k=32))
    sparse.load_state_dict(dense.state_dict(), strict=False)  # the indexers are extra
    idx = torch.randint(0, V, (2, 32))
    for mode in ("eval", "train"):
        getattr(dense, mode)(), getattr(sparse, mode)()
        assert torch.equal(dense(idx), sparse(idx))


def test_selected_sets_are_causal_and_of_size_min_k_t_plus_1():
    m = model_of(config(top_k=6))
    chosen = chosen_sets(m, torch.randint(0, V, (2, 32)))
    assert chosen.shape == (2, 32, 32)
    assert not torch.triu(chosen, diagonal=1).any()  # never a future key
    counts = chosen.sum(-1)
    assert torch.equal(counts, torch.arange(32).clamp(max=5).add(1).expand(2, 32))
    # and the sparse output differs from dense attention (the selection acts)
    dense = model_of(dataclasses.replace(config(), dsa_start_layer=-1))
    dense.load_state_dict(m.state_dict(), strict=False)
    idx = torch.randint(0, V, (2, 32))
    assert not torch.allclose(m(idx), dense(idx))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_causality_bit_exact(mode):
    m = model_of(config(top_k=4))
    getattr(m, mode)()
    assert_causal_bit_exact(lambda idx: m(idx), V, T=32, cuts=(1, 6, 20))


def test_indexer_is_detached_from_the_model_and_the_model_from_its_loss():
    m = model_of(config(top_k=4)).train()
    idx = torch.randint(0, V, (2, 32))
    indexer = {n for n, _ in m.named_parameters() if ".indexer." in n}
    # the LM loss alone (logits without targets add no indexer loss): nothing reaches an indexer
    torch.nn.functional.cross_entropy(m(idx).flatten(0, 1), idx.flatten()).backward()
    assert all(p.grad is None or not p.grad.any() for n, p in m.named_parameters() if n in indexer)
    assert all(p.grad is not None and p.grad.any() for n, p in m.named_parameters() if n not in indexer)
    # L^I alone (the warm-up's loss): it reaches the indexers and nothing else
    m.zero_grad(set_to_none=True)
    m.dsa_stage = "warmup"
    m(idx, idx).backward()
    assert all(p.grad is not None and p.grad.any() for n, p in m.named_parameters() if n in indexer)
    assert all(p.grad is None for n, p in m.named_parameters() if n not in indexer)
    assert m.indexer_loss > 0


def test_warmup_kl_falls_and_only_the_indexers_move():
    m = model_of(config(top_k=4, T=64))
    m.dsa_stage = "warmup"
    idx = torch.randint(0, V, (4, 64))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    adamw, muon = m.setup_optimizers(dsa_lr=1e-2)
    losses = []
    for _ in range(30):
        loss = m(idx, idx)
        losses.append(loss.item())
        loss.backward()
        adamw.step(), muon.step()
        m.zero_grad(set_to_none=True)
    assert losses[-1] < 0.7 * losses[0], losses
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n]) != (".indexer." in n), n


def test_decode_with_the_cache_equals_the_full_forward():
    m = model_of(config(top_k=5, T=48)).eval()
    idx = torch.randint(0, V, (2, 40))
    with torch.no_grad():
        full = m(idx)
        cache = m.init_cache(2, 48)
        parts = [m(idx[:, :13], cache=cache), m(idx[:, 13:30], cache=cache)]
        parts += [m(idx[:, t:t + 1], cache=cache) for t in range(30, 40)]
        assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
        # the static decode step (the engine's CUDA-graph path): fixed shapes over the whole cache
        cache = m.init_cache(2, 48)
        m(idx[:, :30], cache=cache)
        for t in range(30, 40):
            logits = m.decode_step(idx[:, t:t + 1], cache, torch.tensor(t))
            assert torch.allclose(logits, full[:, t], atol=1e-5), t


def test_base_train_flag_checks():
    import argparse

    from nanochat.flags import add_model_args, config_from_args
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    cfg = config_from_args(parser.parse_args(["--depth=4", "--dsa", "--dsa_start_layer=2", "--dsa_top_k=64"]), 100)
    assert (cfg.dsa_start_layer, cfg.dsa_top_k, cfg.dsa_heads, cfg.dsa_dim) == (2, 64, 4, 64)
    assert config_from_args(parser.parse_args(["--depth=4", "--dsa_start_layer=2"]), 100).dsa_start_layer == -1
    with pytest.raises(SystemExit, match="--dsa_top_k=0"):
        config_from_args(parser.parse_args(["--depth=4", "--dsa", "--dsa_top_k=0"]), 100)
    with pytest.raises(SystemExit, match="dsa_start_layer 7"):
        config_from_args(parser.parse_args(["--depth=4", "--dsa"]), 100)
