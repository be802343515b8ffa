"""The transformers NanoChat export and import (scripts/export_hf, scripts/import_hf,
nanochat/hf.py), without network: our tiny models exported and loaded by transformers,
a tiny random transformers NanoChat model imported, tokenizer and chat template checked
id for id against ours."""

import dataclasses
import os
import random

import pytest
import torch

import transformers  # in the dev group and the `hf` extra

from nanochat import hf
from nanochat.checkpoint_manager import load_model
from nanochat.gpt import GPTConfig, build_model
from nanochat.tokenizer import get_tokenizer
from scripts.export_hf import export
from scripts.import_hf import import_checkpoint


def tiny(tokenizer, **kw):
    cfg = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=128, vocab_size=tokenizer.get_vocab_size(), sequence_len=64,
               rope_base=100000.0, pad_vocab_to=64)  # GQA, a non-default base and padded rows: all must carry over
    cfg.update(kw)
    torch.manual_seed(0)
    model = build_model(GPTConfig(**cfg), "cpu")
    with torch.no_grad():  # the init zeroes the output projections; make every weight matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def exported(tokenizer, tmp_path_factory):
    model = tiny(tokenizer)
    out = export(model, tokenizer, {"model_tag": "d2", "step": 7}, "sft", str(tmp_path_factory.mktemp("hf") / "x"),
                 dtype="fp32")
    return model, out


@pytest.fixture
def fresh_base(tmp_path, monkeypatch):
    """An empty NANOCHAT_BASE_DIR for imports; get_tokenizer's cache cleared on both ends
    (load_model reads the tokenizer of the current base directory through it)."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    get_tokenizer.cache_clear()
    yield
    get_tokenizer.cache_clear()


def test_export_loads_and_logits_match(exported, tokenizer):
    model, out = exported
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "generation_config.json", "model.safetensors",
                                       "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(theirs).__name__ == "NanoChatForCausalLM"
    ids = torch.randint(0, tokenizer.get_vocab_size(), (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model(ids), theirs(input_ids=ids).logits
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < 1e-4, (a - b).abs().max().item()
    assert a.std().item() > 0.1  # the logits are not trivially equal (all near 0)
    # transformers' own KV-cache decoding continues the way our model's forward scores it
    prompt = torch.tensor([tokenizer.encode("int main() {", prepend="<|bos|>")])
    gen = theirs.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        ours = model(gen[:, :-1])[0, prompt.size(1) - 1:].argmax(-1)
    assert gen[0, prompt.size(1):].tolist() == ours.tolist()


def test_export_bf16_and_the_card(tokenizer, tmp_path, fresh_base):
    model = tiny(tokenizer)
    os.makedirs(tmp_path / "base" / "report")
    (tmp_path / "base" / "report" / "report.md").write_text("# report\n\n## Chat SFT\n\nx\n\n## Summary\n\n"
                                                             "| Metric | BASE | SFT |\n|---|---|---|\n| CORE | 0.2100 | - |\n")
    out = export(model, tokenizer, {"model_tag": "d2", "step": 3}, "base", str(tmp_path / "b"))
    from safetensors.torch import load_file
    w = load_file(os.path.join(out, "model.safetensors"))
    assert {t.dtype for t in w.values()} == {torch.bfloat16}
    assert w["model.embed_tokens.weight"].shape == (tokenizer.get_vocab_size(), 128)  # padding cropped
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([tokenizer.encode("hello there", prepend="<|bos|>")])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a = model(ids)
    b = theirs(input_ids=ids).logits.float()
    assert (a - b).abs().max().item() < 0.25  # bf16 weights and activations on both sides
    card = open(os.path.join(out, "README.md")).read()
    assert "library_name: transformers" in card and "step 3" in card
    assert "## Summary\n\n| Metric | BASE | SFT |\n|---|---|---|\n| CORE | 0.2100 | - |" in card
    assert "## Chat SFT" not in card  # the summary only
    with pytest.raises(FileExistsError):
        export(model, tokenizer, {}, "base", out)
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # the failed export left no temp dir


def strings(corpus_dir, n=3000):
    """Test strings: corpus slices (C++ and Python), unicode, whitespace runs, digits, special tokens."""
    from nanochat.dataset import parquets_iter_batched
    rng = random.Random(0)
    docs = [d for batch in parquets_iter_batched("val", corpus_dir) for d in batch][:200]
    pieces = ["    ", "\t", "\n\n", "\r\n", " ", "'s", "'LL", "::", "->", "1234567", "3.14159", "Ünïcödé", "東京タワー",
              "🙂👍🏽", "ﷺ", "\u200b", "naïve", "<|bos|>", "<|user_start|>", "<|assistant_end|>", "<|fim_middle|>",
              "<|bos", "|>", "<|", "std::vector<int>", "#include <map>", "x=y+z;", "  \n  ", "ǅ", "Σσς", "ﬁ"]
    out = []
    for i in range(n):
        if i % 3 == 0 and docs:
            d = docs[rng.randrange(len(docs))]
            s = rng.randrange(max(1, len(d) - 200))
            out.append(d[s:s + rng.randrange(1, 200)])
        else:
            out.append("".join(rng.choice(pieces + [chr(rng.randrange(32, 0x2FFF))]) for _ in range(rng.randrange(1, 12))))
    return out


def test_tokenizer_json_matches_ours(exported, tokenizer, corpus_dir):
    from tokenizers import Tokenizer as HFTokenizer
    _, out = exported
    theirs = HFTokenizer.from_file(os.path.join(out, "tokenizer.json"))
    texts = strings(corpus_dir)
    ours = [tokenizer.enc.encode(s, allowed_special="all") for s in texts]
    got = [e.ids for e in theirs.encode_batch(texts, add_special_tokens=False)]
    bad = [(t, a, b) for t, a, b in zip(texts, ours, got) if a != b]
    assert not bad, bad[:3]
    assert sum(len(a) for a in ours) > 20000
    assert all(theirs.decode(a, skip_special_tokens=False) == t for t, a in zip(texts[:300], ours[:300]))
    fast = transformers.AutoTokenizer.from_pretrained(out)
    assert fast("int x;")["input_ids"] == tokenizer.encode("int x;", prepend="<|bos|>")  # <|bos|> first by default
    assert fast.convert_tokens_to_ids("<|assistant_end|>") == tokenizer.encode_special("<|assistant_end|>")


CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 東京 🙂?"},
     {"role": "assistant", "content": "  spaced\n\tout  "}],
    [{"role": "user", "content": "Compute 12*34 in C++."},
     {"role": "assistant", "content": [{"type": "text", "text": "Let me run it."},
                                       {"type": "python", "text": "print(12*34)"},
                                       {"type": "python_output", "text": "408\n"},
                                       {"type": "text", "text": " It is 408."}]}],
]


def test_chat_template_matches_render_conversation(exported, tokenizer):
    _, out = exported
    fast = transformers.AutoTokenizer.from_pretrained(out)
    for msgs in CONVERSATIONS:
        ids, _ = tokenizer.render_conversation({"messages": msgs})
        assert list(fast.apply_chat_template(msgs, tokenize=True, return_dict=False)) == ids
        prompt = tokenizer.render_for_completion({"messages": msgs})
        assert list(fast.apply_chat_template(msgs[:-1], tokenize=True, add_generation_prompt=True,
                                             return_dict=False)) == prompt
    with pytest.raises(Exception, match="alternate"):
        fast.apply_chat_template([{"role": "assistant", "content": "x"}], tokenize=False)


def test_import_export_import_is_identity(exported, tokenizer, tmp_path, fresh_base):
    from safetensors.torch import load_file
    model, out = exported
    import_checkpoint(out, "d2", source="sft")
    loaded, tok2, meta = load_model("sft", "cpu", model_tag="d2")
    assert tok2.hash == tokenizer.hash
    V = tokenizer.get_vocab_size()
    assert torch.equal(loaded.wte.weight, model.wte.weight[:V])
    assert torch.equal(loaded.blocks[1].mixer.c_k.weight, model.blocks[1].mixer.c_k.weight)
    ids = torch.tensor([tokenizer.encode("abc def", prepend="<|bos|>")])
    with torch.no_grad():
        assert torch.allclose(loaded(ids), model(ids), atol=1e-5)
    again = export(loaded, tok2, meta, "sft", str(tmp_path / "again"), dtype="fp32")
    a, b = load_file(os.path.join(out, "model.safetensors")), load_file(os.path.join(again, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    import_checkpoint(again, "d2b", source="base")
    twice, _, _ = load_model("base", "cpu", model_tag="d2b")
    s1, s2 = loaded.state_dict(), twice.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_import_a_transformers_model(tokenizer, tmp_path, fresh_base):
    """A random NanoChatForCausalLM made by transformers itself, with more vocab rows than
    tokens and the reference nanochat's 9 special tokens, imports and computes the same."""
    from nanochat.tokenizer import Tokenizer
    ref = Tokenizer.from_ranks(tokenizer.enc._mergeable_ranks, tokenizer.enc._pat_str, tokenizer.special_tokens[:9])
    V = ref.get_vocab_size()
    cfg = transformers.NanoChatConfig(vocab_size=V + 7, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                      rms_norm_eps=hf.RMS_EPS)
    torch.manual_seed(0)
    theirs = transformers.NanoChatForCausalLM(cfg).eval()
    src = tmp_path / "src"
    theirs.save_pretrained(src)
    hf.tokenizer_json(ref).save(str(src / "tokenizer.json"))
    import_checkpoint(str(src), "ref", source="sft")
    ours, tok, _ = load_model("sft", "cpu", model_tag="ref")
    assert tok.get_vocab_size() == V and tok.special_tokens == ref.special_tokens
    ids = torch.randint(0, V, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = ours(ids), theirs(input_ids=ids).logits[..., :V]
    assert (a - b).abs().max().item() < 1e-4
    # a different tokenizer already in the base directory is not silently replaced
    from scripts.import_hf import install_tokenizer
    with pytest.raises(SystemExit, match="another tokenizer"):
        install_tokenizer(tokenizer)


def test_refusals(tokenizer, tmp_path):
    model = tiny(tokenizer, value_embeds=True, smear=True, window_pattern="SL", qk_scale=1.2, engram_layers="0")
    with pytest.raises(ValueError) as e:
        export(model, tokenizer, {}, "base", str(tmp_path / "r"))
    for what in ("sliding-window", "value embeddings", "smear", "QK scale", "Engram"):
        assert what in str(e.value)
    assert not os.path.exists(tmp_path / "r")
    good = GPTConfig().to_dict()
    assert hf.unsupported(GPTConfig(**good)) == []
    cfg = hf.hf_config(GPTConfig(vocab_size=tokenizer.get_vocab_size()), tokenizer)
    with pytest.raises(ValueError, match="hidden_act='gelu'.*attention biases"):
        hf.config_from_hf(dict(cfg, hidden_act="gelu", attention_bias=True), tokenizer.get_vocab_size())
    with pytest.raises(ValueError, match="model_type"):
        hf.config_from_hf(dict(cfg, model_type="llama"), tokenizer.get_vocab_size())


def test_command_lines(tokenizer, tmp_path, fresh_base, capsys):
    """export_hf and import_hf as a user runs them: a chat checkpoint out with --check, back in."""
    import scripts.export_hf
    import scripts.import_hf
    from chat_model_fixture import make_chat_checkpoint
    make_chat_checkpoint(tmp_path / "base", tokenizer)
    out = scripts.export_hf.main(["--source", "sft", "--out", str(tmp_path / "out"), "--dtype", "fp32", "--check"])
    printed = capsys.readouterr().out
    diff = float(printed.split("fp32: ")[1].split()[0])
    assert diff < 1e-4
    with pytest.raises(SystemExit, match="exists and is not empty"):
        scripts.export_hf.main(["--source", "sft", "--out", out])
    scripts.import_hf.main(["--repo_or_dir", out, "--model_tag", "back", "--source", "mid"])
    model, _, meta = load_model("mid", "cpu", model_tag="back")
    assert meta["imported_from"] == out and model.config.n_layer == 2
    with pytest.raises(SystemExit, match="neither a directory nor a hub id"):
        scripts.import_hf.main(["--repo_or_dir", str(tmp_path / "nothing"), "--model_tag", "x"])


def test_import_refuses_other_tokenizers(exported, tmp_path):
    """tokenizer.json files that our tiktoken runtime would split differently are refused."""
    import json
    _, out = exported
    d = json.load(open(os.path.join(out, "tokenizer.json")))
    assert hf.tokenizer_from_json(os.path.join(out, "tokenizer.json")).get_vocab_size() == len(d["model"]["vocab"]) + 12

    def refused(change, match):
        e = json.loads(json.dumps(d))
        change(e)
        path = tmp_path / "tokenizer.json"
        path.write_text(json.dumps(e))
        with pytest.raises(ValueError, match=match):
            hf.tokenizer_from_json(str(path))
    refused(lambda e: e["model"]["merges"].reverse(), "out of id order")
    refused(lambda e: e["added_tokens"][0].update(content="<|endoftext|>"), "special tokens")
    refused(lambda e: e.update(added_tokens=e["added_tokens"][:5]), "special tokens")
    refused(lambda e: e.update(pre_tokenizer={"type": "Metaspace"}), "byte-level BPE")


def test_remote_code_export_of_the_recipe(tokenizer, tmp_path, fresh_base):
    """Today's default model (value embeddings, smear, backout, per-layer scalars, QK scale,
    rope 1e5, padded vocab) plus sliding windows: exported with our modeling file, loaded
    with trust_remote_code, same logits; and imported back to the same weights."""
    model = tiny(tokenizer, n_layer=4, value_embeds=True, smear=True, backout=True, layer_lambdas=True, qk_scale=1.2,
                 window_pattern="SL", short_window_div=4, mtp=True)  # MTP heads: dropped
    out = export(model, tokenizer, {"model_tag": "d4", "step": 1}, "base", str(tmp_path / "r"), dtype="fp32",
                 remote_code=True)
    assert "modeling_nanochat_recipe.py" in os.listdir(out)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=True).eval()
    ids = torch.randint(0, tokenizer.get_vocab_size(), (2, 60), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = model(ids), theirs(input_ids=ids).logits
        assert torch.equal(theirs(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, b)
        padded = torch.ones_like(ids)
        padded[0, :5] = 0  # a left-padded row: it attended to its pads, silently (now refused)
        with pytest.raises(ValueError, match="no padding"):
            theirs(input_ids=ids, attention_mask=padded)
    assert (a - b).abs().max().item() < 1e-4, (a - b).abs().max().item()
    prompt = torch.tensor([tokenizer.encode("int main", prepend="<|bos|>")])
    gen = theirs.generate(prompt, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        assert gen[0, prompt.size(1):].tolist() == model(gen[:, :-1])[0, prompt.size(1) - 1:].argmax(-1).tolist()
    import_checkpoint(out, "d4", source="base")
    back, _, _ = load_model("base", "cpu", model_tag="d4")
    s1, s2 = model.state_dict(), back.state_dict()
    assert back.config == dataclasses.replace(model.config, mtp=False)
    assert s2.keys() == {k for k in s1 if not k.startswith("mtp.")} and all(torch.equal(s1[k], s2[k]) for k in s2)
    with pytest.raises(ValueError, match="Mamba-3"):  # the extensions stay refused
        export(tiny(tokenizer, mamba_pattern="AM"), tokenizer, {}, "base", str(tmp_path / "m"), remote_code=True)
