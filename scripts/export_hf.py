"""
Export a checkpoint to the Hugging Face transformers NanoChat format: a directory that
AutoModelForCausalLM and AutoTokenizer load without trust_remote_code (and vLLM serves).

    python -m scripts.export_hf --source sft --out my-nanochat            # bf16
    python -m scripts.export_hf --source base --model_tag d12 --out d12 --dtype fp32 --check

Writes config.json, model.safetensors, tokenizer.json, tokenizer_config.json (with the
chat template), generation_config.json and a README.md model card (with the report
card's summary table when $NANOCHAT_BASE_DIR/report/report.md exists), all into a temp
directory renamed to --out at the end. A model with something the NanoChat class cannot
express (sliding windows, value embeddings, smear, backout, per-layer scalars, QK scale,
Mamba-3, Engram, mHC, DSA) is refused with the list (nanochat/hf.py says why each), or
with --remote_code written with our own modeling file (nanochat/hf_modeling.py; every
one of those but the four extensions, which stay refused). MTP heads are dropped (the
forward never runs them). --check loads the export with
transformers and prints the max |logit difference| to our forward on a few prompts.
Format details and the differences from our chat rendering: docs/serving.md.
"""

import argparse
import json
import os
import shutil
import time

import torch

from nanochat.checkpoint_manager import load_model
from nanochat.common import get_base_dir
from nanochat.gpt import GPT
from nanochat import hf

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
CHECK_PROMPTS = ["The capital of France is", "int main() {\n    std::vector<int> v{1, 2, 3};\n",
                 "Über naïve café 東京 🙂 — 12345 + 678 = ?"]


def report_summary():
    """The '## Summary' table of the report card, or None."""
    path = os.path.join(get_base_dir(), "report", "report.md")
    if not os.path.exists(path):
        return None
    text = open(path, encoding="utf-8").read()
    start = text.find("## Summary")
    return text[start:].strip() if start >= 0 else None


def model_card(config, meta, source, dtype, remote_code=False):
    summary = report_summary()
    how = ("its own modeling file (modeling_nanochat_recipe.py: value embeddings, smear, backout, per-layer "
           "scalars, QK scale, sliding windows); load it with trust_remote_code=True" if remote_code else
           "the transformers NanoChat format")
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [nanochat]", "---", "",
             f"# nanochat {meta.get('model_tag', '')} ({source})", "",
             f"A {config.n_layer}-layer nanochat model ({source} stage, step {meta.get('step')}), exported with "
             f"`python -m scripts.export_hf` with {how}.", "",
             f"- width {config.n_embd}, {config.n_head} heads ({config.n_kv_head} key/value), context "
             f"{config.sequence_len}, vocabulary {config.vocab_size}, rotary base {config.rope_base:g}, "
             f"logit soft-cap {config.softcap:g}, weights in {dtype}", "",
             "```python", "from transformers import pipeline",
             "chat = pipeline('text-generation', model='PATH_OR_REPO'" +
             (", trust_remote_code=True)" if remote_code else ")"),
             "print(chat([{'role': 'user', 'content': 'Why is the sky blue?'}], max_new_tokens=128))", "```", "",
             "The chat template renders conversations as nanochat's `render_conversation`; assistant content may be "
             "a list of parts of type text, python (a tool call) and python_output (the tool's answer).", ""]
    lines += ["## Report card", "", summary, ""] if summary else []
    return "\n".join(lines)


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def export(model, tokenizer, meta, source, out, dtype="bf16", overwrite=False, remote_code=False):
    """Write the export directory; returns its path. ValueError if the model can't be expressed.
    remote_code: our own modeling file beside the weights (trust_remote_code), for the recipe."""
    from safetensors.torch import save_file
    config = model.config
    why = hf.unsupported(config, remote_code)
    if why and remote_code:
        raise ValueError("nanochat's exports cannot express this model's\n  - " + "\n  - ".join(why) +
                         "\n(transformers has no implementation of these extensions)")
    if why:
        raise ValueError("the transformers NanoChat model cannot express this model's\n  - " + "\n  - ".join(why) +
                         "\nPass --remote_code to export it with its own modeling file (loaded with "
                         "trust_remote_code=True; vLLM and plain pipelines cannot use it), or export a model trained "
                         "without them (scripts.base_train --window_pattern=L --value_embeds=0 --smear=0 --backout=0 "
                         "--layer_lambdas=0 --qk_scale=1.0).")
    out = os.path.abspath(out)
    if os.path.exists(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite or pick another --out")
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        if remote_code:
            tensors = hf.to_remote_state(model.state_dict(), DTYPES[dtype])
            cfg = hf.remote_config(config, tokenizer)
            shutil.copy(os.path.join(os.path.dirname(hf.__file__), "hf_modeling.py"),
                        os.path.join(tmp, hf.REMOTE_MODEL_FILE))
        else:
            tensors, cfg = hf.to_hf_state(model.state_dict(), config, DTYPES[dtype]), hf.hf_config(config, tokenizer)
        save_file(tensors, os.path.join(tmp, hf.MODEL_FILE), metadata={"format": "pt"})
        write_json(os.path.join(tmp, "config.json"), dict(cfg, dtype={"bf16": "bfloat16", "fp32": "float32"}[dtype]))
        hf_tokenizer = hf.tokenizer_json(tokenizer)
        hf.check_tokenizer_json(hf_tokenizer, tokenizer)
        hf_tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        write_json(os.path.join(tmp, "tokenizer_config.json"), hf.tokenizer_config(tokenizer))
        write_json(os.path.join(tmp, "special_tokens_map.json"),
                   {"bos_token": "<|bos|>", "eos_token": "<|assistant_end|>", "pad_token": "<|bos|>"})
        write_json(os.path.join(tmp, "generation_config.json"),
                   dict(hf.generation_config(tokenizer), **({"use_cache": False} if remote_code else {})))
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(config, meta, source, dtype, remote_code))
        if os.path.exists(out):  # --overwrite: the old directory goes only once the new one is complete
            old = f"{out}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@torch.no_grad()
def check(out, tokenizer, device, prompts=CHECK_PROMPTS):
    """Max |logit difference| between transformers' NanoChatForCausalLM on the export and our
    GPT on the same (exported) weights, over `prompts`: {"fp32": d} and on CUDA also
    {"bf16": d} (transformers in bf16 vs ours under bf16 autocast)."""
    from transformers import AutoModelForCausalLM
    cfg = hf.read_json(os.path.join(out, "config.json"))
    config, remote = hf.config_from_hf(cfg, tokenizer.get_vocab_size()), "auto_map" in cfg
    ours = GPT(config).to(device)
    ours.init_weights()  # the rotary buffers; the weights come next
    ours.load_state_dict(hf.from_hf_state(hf.load_safetensors(out), config, remote))
    ours.eval()
    result = {}
    for name, dtype in [("fp32", torch.float32)] + ([("bf16", torch.bfloat16)] if device.type == "cuda" else []):
        theirs = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, trust_remote_code=remote).to(device).eval()
        diff = 0.0
        for p in prompts:
            ids = torch.tensor([tokenizer.encode(p, prepend="<|bos|>")], device=device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                a = ours(ids)
            b = theirs(input_ids=ids).logits.float()
            diff = max(diff, (a - b).abs().max().item())
        result[name] = diff
        del theirs
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description="Export a checkpoint to the transformers NanoChat format")
    parser.add_argument("--source", required=True, choices=["base", "mid", "sft", "rl"], help="which stage")
    parser.add_argument("--model_tag", default=None, help="model tag (default: the largest)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("--out", required=True, help="directory to write (created atomically)")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="weights' dtype in model.safetensors")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--remote_code", action="store_true", help="for models NanoChat cannot express (the quality "
                        "recipe, sliding windows): ship our own modeling file; loads with trust_remote_code=True")
    parser.add_argument("--check", action="store_true", help="load the export with transformers and print the max "
                        "|logit difference| to our forward (fp32; on CUDA also bf16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for --check")
    args = parser.parse_args(argv)
    t0 = time.time()
    try:
        model, tokenizer, meta = load_model(args.source, "cpu", model_tag=args.model_tag, step=args.step)
    except FileNotFoundError as e:
        raise SystemExit(str(e))
    try:
        out = export(model, tokenizer, meta, args.source, args.out, args.dtype, args.overwrite, args.remote_code)
    except (ValueError, FileExistsError) as e:
        raise SystemExit(f"export_hf: {e}")
    if model.config.mtp:
        print("note: the MTP heads are not exported (transformers' NanoChat has none; the forward is unchanged)")
    print(f"exported {args.source} {meta['model_tag']} step {meta['step']} to {out} in {time.time() - t0:.1f}s")
    if args.check:
        for name, d in check(out, tokenizer, torch.device(args.device)).items():
            print(f"check: max |logit diff| ours vs transformers, {name}: {d:.3e}")
    return out


if __name__ == "__main__":
    main()
