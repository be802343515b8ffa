"""
Conversion between nanochat checkpoints and the Hugging Face transformers NanoChat format
(model_type "nanochat": NanoChatConfig / NanoChatForCausalLM, transformers >= 4.57, late
2025; read in transformers' models/nanochat/modular_nanochat.py). scripts/export_hf and
scripts/import_hf are the command-line ends; docs/serving.md has the details.

What the transformers class implements, and how our model maps onto it:
- embedding -> parameter-free RMSNorm -> blocks -> RMSNorm -> untied lm_head -> soft-cap
  c * tanh(logits / c) (final_logit_softcapping): ours exactly;
- attention: q/k/v/o projections without biases, GQA (num_key_value_heads), rotary on
  the two halves of each head with the same sign convention as ours (its rotate_half is
  (x2, -x1)), RoPE *then* QK-norm, scale 1/sqrt(head_dim), base rope_theta: ours exactly;
- MLP fc1 -> relu(x)^2 -> fc2 without biases (hidden_act "relu2");
- every norm is RMSNorm without a weight, eps rms_norm_eps. F.rms_norm without eps (ours)
  uses finfo(dtype).eps, so we write float32's eps: the fp32 forward matches to rounding.
It has no sliding windows, no value embeddings, smear, backout or per-layer scalars, no
QK scale, and none of the extensions: export refuses such a model and names each
(`unsupported`), or (--remote_code) writes it with our own modeling file,
nanochat/hf_modeling.py, for all but the extensions. The MTP heads, which the forward
never runs, are dropped.

The tokenizer becomes a tokenizers BPE (byte-level, the same split regex, one merge per
way of splitting each token into two tokens, ordered by the merged token's rank, and
ignore_merges, as tiktoken looks a whole chunk up first) with our special tokens as
added tokens at the same ids; import reads that format back into tiktoken ranks.
"""

import json
import os

import torch

from nanochat.gpt import GPTConfig, padded_vocab
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

MODEL_FILE = "model.safetensors"
RMS_EPS = torch.finfo(torch.float32).eps  # what F.rms_norm(x) uses for fp32 x


# ---- the model -------------------------------------------------------------

def unsupported(config, remote_code=False):
    """What of `config` the transformers NanoChat class cannot express, one line each; with
    remote_code, what our own modeling file (nanochat/hf_modeling.py) cannot: the extensions."""
    c = config
    extensions = [(c.mamba_pattern, f"Mamba-3 layers (mamba_pattern={c.mamba_pattern!r})"),
                  (c.engram_layers, f"Engram memory (engram_layers={c.engram_layers!r})"),
                  (c.mhc, "mHC hyper-connections (mhc=True)"),
                  (c.dsa_start_layer >= 0, f"DeepSeek sparse attention (dsa_start_layer={c.dsa_start_layer})")]
    recipe = [(set(c.window_pattern.upper()) != {"L"}, f"sliding-window attention (window_pattern="
               f"{c.window_pattern!r}; NanoChat attends to the whole context in every layer)"),
              (c.value_embeds, "value embeddings (value_embeds=True)"), (c.smear, "the smear gate (smear=True)"),
              (c.backout, "the backout (backout=True)"), (c.layer_lambdas, "per-layer resid/x0 scalars (layer_lambdas=True)"),
              (c.qk_scale != 1.0, f"a QK scale (qk_scale={c.qk_scale}; NanoChat's attention scale is 1/sqrt(head_dim))")]
    return [line for on, line in extensions + ([] if remote_code else recipe) if on]


def hf_config(config, tokenizer):
    """config.json of the NanoChat model type for our GPTConfig (vocab rows cropped to the tokenizer)."""
    bos, end = tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")
    return {"architectures": ["NanoChatForCausalLM"], "model_type": "nanochat",
            "vocab_size": config.vocab_size, "hidden_size": config.n_embd, "intermediate_size": 4 * config.n_embd,
            "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
            "num_key_value_heads": config.n_kv_head, "max_position_embeddings": config.sequence_len,
            "hidden_act": "relu2", "attention_dropout": 0.0, "attention_bias": False, "rms_norm_eps": RMS_EPS,
            "rope_parameters": {"rope_type": "default", "rope_theta": float(config.rope_base)},
            "final_logit_softcapping": float(config.softcap), "tie_word_embeddings": False, "use_cache": True,
            "initializer_range": 0.02, "bos_token_id": bos, "eos_token_id": end, "pad_token_id": bos}


def _key_map(n_layer):
    """(our key, transformers key) for every exported tensor."""
    pairs = [("wte.weight", "model.embed_tokens.weight"), ("lm_head.weight", "lm_head.weight")]
    for i in range(n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        pairs += [(ours + f"mixer.c_{a}.weight", theirs + f"self_attn.{b}_proj.weight")
                  for a, b in (("q", "q"), ("k", "k"), ("v", "v"), ("proj", "o"))]
        pairs += [(ours + "mlp.c_fc.weight", theirs + "mlp.fc1.weight"),
                  (ours + "mlp.c_proj.weight", theirs + "mlp.fc2.weight")]
    return pairs


def to_hf_state(state, config, dtype):
    """Our state dict -> transformers tensors (contiguous, `dtype`); the padded vocab rows
    are cropped (our forward crops their logits anyway), the MTP heads dropped."""
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    pairs = _key_map(config.n_layer)
    left = sorted(set(state) - {a for a, _ in pairs} - {k for k in state if k.startswith("mtp.")})
    if left:
        raise ValueError(f"tensors the NanoChat format has no place for: {left}")
    out = {}
    for ours, theirs in pairs:
        t = state[ours]
        if ours in ("wte.weight", "lm_head.weight"):
            t = t[:config.vocab_size]
        out[theirs] = t.detach().to("cpu", dtype).contiguous()
    return out


REMOTE_MODEL_FILE = "modeling_nanochat_recipe.py"


def remote_config(config, tokenizer):
    """config.json for the trust_remote_code export (nanochat/hf_modeling.py): our GPTConfig
    plus the per-layer plan, under model_type nanochat_recipe."""
    from nanochat.gpt import layer_plan
    plan = layer_plan(config)
    nanochat = dict(config.to_dict(), mtp=False,  # the MTP heads are not exported
                    windows=[s.window for s in plan], rows=padded_vocab(config),
                    value_embed_layers=[i for i, s in enumerate(plan) if "value_embed" in s.extras])
    module = REMOTE_MODEL_FILE.removesuffix(".py")
    bos, end = tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")
    return {"architectures": ["NanoChatRecipeForCausalLM"], "model_type": "nanochat_recipe",
            "auto_map": {"AutoConfig": f"{module}.NanoChatRecipeConfig",
                         "AutoModelForCausalLM": f"{module}.NanoChatRecipeForCausalLM"},
            "nanochat": nanochat, "vocab_size": config.vocab_size, "max_position_embeddings": config.sequence_len,
            "bos_token_id": bos, "eos_token_id": end, "pad_token_id": bos, "use_cache": False}


def to_remote_state(state, dtype):
    """Our state dict as the remote-code model names it (the same names), MTP heads dropped."""
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items() if not k.startswith("mtp.")}


def config_from_hf(cfg, vocab_size):
    """GPTConfig for a transformers NanoChat config.json dict; ValueError naming what our
    model cannot be (so the imported model computes what transformers computes).
    vocab_size: the tokenizer's; the model's extra rows (if any) become padding."""
    if cfg.get("model_type") == "nanochat_recipe":  # our own remote-code export: our config as it was
        c = {k: v for k, v in cfg["nanochat"].items() if k not in ("windows", "rows", "value_embed_layers")}
        if c["vocab_size"] != vocab_size:
            raise ValueError(f"vocab_size={c['vocab_size']} but the tokenizer has {vocab_size}")
        return GPTConfig.from_dict(c)
    if cfg.get("model_type") != "nanochat":
        raise ValueError(f"model_type is {cfg.get('model_type')!r}, not 'nanochat': only the transformers NanoChat "
                         "format (and export_hf --remote_code's nanochat_recipe) can be imported")
    why = []
    C, H = cfg["hidden_size"], cfg["num_attention_heads"]
    KV = cfg.get("num_key_value_heads") or H
    rope = cfg.get("rope_parameters") or {"rope_type": "default", "rope_theta": cfg.get("rope_theta", 10000.0)}
    checks = [(cfg.get("hidden_act", "relu2") == "relu2", f"hidden_act={cfg.get('hidden_act')!r} (ours: relu2)"),
              (cfg.get("intermediate_size") == 4 * C, f"intermediate_size={cfg.get('intermediate_size')} "
               f"(ours: 4 * hidden_size = {4 * C})"),
              (not cfg.get("attention_bias", False), "attention biases"),
              (not cfg.get("tie_word_embeddings", False), "tied embeddings"),
              (cfg.get("final_logit_softcapping") is not None, "no logit soft-capping"),
              (rope.get("rope_type", "default") == "default", f"rope_type={rope.get('rope_type')!r} (ours: default)"),
              (cfg.get("head_dim") in (None, C // H), f"head_dim={cfg.get('head_dim')} != hidden_size / heads"),
              (cfg["vocab_size"] >= vocab_size, f"vocab_size={cfg['vocab_size']} is smaller than the tokenizer's "
               f"{vocab_size}")]
    why = [w for ok, w in checks if not ok]
    if why:
        raise ValueError("this NanoChat model has what nanochat's GPT cannot express: " + "; ".join(why))
    return GPTConfig(sequence_len=cfg.get("max_position_embeddings", 2048), vocab_size=vocab_size,
                     n_layer=cfg["num_hidden_layers"], n_head=H, n_kv_head=KV, n_embd=C, window_pattern="L",
                     softcap=float(cfg["final_logit_softcapping"]), rope_base=float(rope.get("rope_theta", 10000.0)),
                     qk_scale=1.0, pad_vocab_to=cfg["vocab_size"] if cfg["vocab_size"] != vocab_size else 1)


def from_hf_state(tensors, config, remote=False):
    """transformers tensors -> our state dict (fp32 for training; checkpoints keep fp32).
    remote: a nanochat_recipe export, whose tensors have our names already."""
    if remote:
        return {k: v.to(torch.float32).contiguous() for k, v in tensors.items()}
    pairs = _key_map(config.n_layer)
    missing = [b for _, b in pairs if b not in tensors]
    extra = sorted(set(tensors) - {b for _, b in pairs})
    if missing or extra:
        raise ValueError(f"not a NanoChat checkpoint of this config: missing {missing[:5]}, unexpected {extra[:5]}")
    rows = padded_vocab(config)
    out = {}
    for ours, theirs in pairs:
        t = tensors[theirs].to(torch.float32)
        if ours in ("wte.weight", "lm_head.weight") and t.size(0) != rows:
            raise ValueError(f"{theirs} has {t.size(0)} rows, the config says {rows}")
        out[ours] = t.contiguous()
    return out


# ---- the tokenizer ---------------------------------------------------------

def _bytes_to_unicode():
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


BYTE_CHARS = _bytes_to_unicode()
CHAR_BYTES = {c: b for b, c in BYTE_CHARS.items()}


def tokenizer_json(tokenizer):
    """A tokenizers.Tokenizer that gives the ids our tokenizer gives (special tokens
    included, as tiktoken encodes with allowed_special="all"); <|bos|> is prepended by
    default (add_special_tokens=True), as documents start with it in training."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer
    ranks = tokenizer.enc._mergeable_ranks
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("the tokenizer's ranks are not 0..n-1: not a tokenizer nanochat trained")
    word = lambda b: "".join(BYTE_CHARS[x] for x in b)
    vocab = {word(b): r for b, r in ranks.items()}
    merges = []  # every split of every token into two tokens, by the merged token's rank
    for b, r in ranks.items():
        for i in range(1, len(b)):
            if b[:i] in ranks and b[i:] in ranks:
                merges.append((r, ranks[b[:i]], (word(b[:i]), word(b[i:]))))
    merges = [m for *_, m in sorted(merges)]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.enc._pat_str), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = sorted(tokenizer.enc._special_tokens.items(), key=lambda kv: kv[1])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s, _ in specials])
    for s, i in specials:
        if tok.token_to_id(s) != i:
            raise ValueError(f"special token {s} got id {tok.token_to_id(s)} instead of {i}")
    bos = tokenizer.get_bos_token_id()
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                                       special_tokens=[("<|bos|>", bos)])
    return tok


SAMPLE_TEXTS = ["Hello world! It's 2026.", "    for (int i = 0; i < n; ++i) {\n        sum += a[i];\n    }\n",
                "naïve café 東京 🙂\t\r\n  x", "<|bos|><|user_start|>hi<|user_end|><|assistant_start|>", "1234567 + 89"]


def check_tokenizer_json(hf_tokenizer, tokenizer, texts=SAMPLE_TEXTS):
    """ValueError unless the tokenizers.Tokenizer gives our ids (specials allowed) on `texts`."""
    for s in texts:
        a = tokenizer.enc.encode(s, allowed_special="all")
        b = hf_tokenizer.encode(s, add_special_tokens=False).ids
        if a != b:
            raise ValueError(f"the two tokenizers split {s!r} differently: ours {a}, tokenizer.json's {b}")


def tokenizer_from_json(path):
    """Our Tokenizer from a tokenizer.json that tokenizer_json (or an equivalent tiktoken
    conversion, as the published nanochat models have) wrote; ValueError for another kind."""
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    model, pre = d.get("model") or {}, d.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", [pre])
    splits = [p for p in pres if p.get("type") == "Split"]
    if model.get("type") != "BPE" or not any(p.get("type") == "ByteLevel" for p in pres) or len(splits) != 1:
        raise ValueError(f"{path}: not a byte-level BPE with one Split pre-tokenizer (a tiktoken-style tokenizer); "
                         "nanochat cannot run it")
    pattern = splits[0]["pattern"].get("Regex")
    if pattern is None:
        raise ValueError(f"{path}: the Split pre-tokenizer has no regex pattern")
    added = sorted((t["id"], t["content"]) for t in d.get("added_tokens", []))
    # some converters also list the special tokens in the BPE vocabulary: they are not byte sequences
    specials = set(added)
    vocab = {w: i for w, i in model["vocab"].items() if (i, w) not in specials}
    try:
        ranks = {bytes(CHAR_BYTES[c] for c in w): i for w, i in vocab.items()}
    except KeyError as e:
        raise ValueError(f"{path}: vocabulary entry with {e} is not in the byte-level alphabet") from None
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)):
        raise ValueError(f"{path}: the BPE ids are not 0..{n - 1}")
    # tiktoken merges by the merged token's rank (= id): the merges must be in that order
    merges = model.get("merges", [])
    last = -1
    for m in merges:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        r = vocab.get(a + b)
        if r is None or r < last:
            raise ValueError(f"{path}: merge {a!r} + {b!r} is out of id order; this BPE is not a tiktoken one and "
                             "nanochat's tokenizer would split text differently")
        last = r
    names = [s for _, s in added]
    if [i for i, _ in added] != list(range(n, n + len(added))) or names != SPECIAL_TOKENS[:len(names)] \
            or len(names) < 9:
        raise ValueError(f"{path}: special tokens {names} at ids {[i for i, _ in added]}; nanochat needs "
                         f"{SPECIAL_TOKENS} (or their first 9, the reference nanochat's) right after the BPE ids")
    return Tokenizer.from_ranks(ranks, pattern, special_tokens=names)


# ---- the chat format -------------------------------------------------------

# Renders a conversation as Tokenizer.render_conversation does: <|bos|>, a leading system
# message merged into the first user message, strict user/assistant alternation, assistant
# content as a string or a list of {"type": "text"|"python"|"python_output", "text": ...}.
CHAT_TEMPLATE = (
    "{%- set msgs = messages -%}"
    "{%- if msgs and msgs[0]['role'] == 'system' -%}"
    "{%- if msgs | length < 2 or msgs[1]['role'] != 'user' -%}"
    "{{ raise_exception('a system message must be followed by a user message') }}{%- endif -%}"
    "{%- set msgs = [{'role': 'user', 'content': msgs[0]['content'] + '\\n\\n' + msgs[1]['content']}] + msgs[2:] -%}"
    "{%- endif -%}"
    "<|bos|>"
    "{%- for m in msgs -%}"
    "{%- set want = 'user' if loop.index0 % 2 == 0 else 'assistant' -%}"
    "{%- if m['role'] != want -%}"
    "{{ raise_exception('message ' ~ loop.index0 ~ ' has role ' ~ m['role'] ~ ', expected ' ~ want ~ "
    "': turns must alternate user/assistant') }}{%- endif -%}"
    "{%- if want == 'user' -%}"
    "{%- if m['content'] is not string -%}{{ raise_exception('user messages must have string content') }}"
    "{%- endif -%}"
    "<|user_start|>{{ m['content'] }}<|user_end|>"
    "{%- else -%}"
    "<|assistant_start|>"
    "{%- if m['content'] is string -%}{{ m['content'] }}"
    "{%- else -%}{%- for p in m['content'] -%}"
    "{%- if p['type'] == 'text' -%}{{ p['text'] }}"
    "{%- elif p['type'] == 'python' -%}<|python_start|>{{ p['text'] }}<|python_end|>"
    "{%- elif p['type'] == 'python_output' -%}<|output_start|>{{ p['text'] }}<|output_end|>"
    "{%- else -%}{{ raise_exception('unknown content part type ' ~ p['type']) }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "<|assistant_end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}"
)


def tokenizer_config(tokenizer):
    end = "<|assistant_end|>"
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": end,
            "pad_token": "<|bos|>", "add_bos_token": True, "clean_up_tokenization_spaces": False,
            "model_max_length": 10 ** 9, "chat_template": CHAT_TEMPLATE,
            "additional_special_tokens": [s for s in tokenizer.enc._special_tokens if s not in ("<|bos|>", end)]}


def generation_config(tokenizer):
    """Sampling as chat_cli does (temperature 0.6, top-k 50); a reply stops at
    <|assistant_end|> or <|bos|> (the engine's stop tokens)."""
    bos, end = tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")
    return {"bos_token_id": bos, "eos_token_id": [end, bos], "pad_token_id": bos, "do_sample": True,
            "temperature": 0.6, "top_k": 50}


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_safetensors(directory):
    """All tensors of a directory's model.safetensors (or its shards, model.safetensors.index.json)."""
    from safetensors.torch import load_file
    index = os.path.join(directory, MODEL_FILE + ".index.json")
    if os.path.exists(index):
        files = sorted(set(read_json(index)["weight_map"].values()))
    else:
        files = [MODEL_FILE]
    tensors = {}
    for name in files:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing: not a complete transformers checkpoint")
        tensors.update(load_file(path))
    return tensors
