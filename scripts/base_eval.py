"""
Evaluate a base model on the CORE metric (DCLM; see nanochat/core_eval.py) and, with
--cpp=1, on C++ code: HumanEval and MBPP in C++ (MultiPL-E, tasks/humaneval_cpp.py),
completion-style (the prompt's signature and comment continued, cut at the stop token),
compiled with g++ and run in the sandbox, scored pass@k over -n samples.

    python -m scripts.base_eval                         # latest base checkpoint, every example
    python -m scripts.base_eval --max_per_task=100      # quicker estimate
    python -m scripts.base_eval --cpp=1 -n 10 -t 0.8    # + C++ pass@1 / pass@10
    python -m scripts.base_eval --core=0 --cpp=1        # C++ only (no eval bundle needed)
    python -m scripts.base_eval --core=0 --fim=DIR      # C++ fill-in-the-middle (tasks/cpp_fim.py)
    torchrun --nproc_per_node=8 -m scripts.base_eval    # examples split over ranks

The eval bundle is downloaded once to $NANOCHAT_BASE_DIR/eval_bundle. Results are
printed, written to $NANOCHAT_BASE_DIR/base_eval/<model_tag>_<step>.csv and, when the
report module exists, logged to the report. Exit code 3: the eval bundle could not be had
(offline, broken mirror), so scripts can tell that from a failure of the evaluation.
"""

import argparse
import contextlib
import csv
import io
import math
import os
import sys

import torch
import torch.distributed as dist

from nanochat.common import (atomic_write, autodetect_device_type, compute_cleanup, compute_dtype,
                             compute_init, get_base_dir, print0)
from nanochat.core_eval import EVAL_BUNDLE_URL, ensure_eval_bundle, evaluate_core
from nanochat.report import get_report

EXIT_NO_BUNDLE = 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a base model on the CORE metric (DCLM eval bundle).")
    p.add_argument("--model_tag", default=None, help="model tag of the checkpoint (default: the checkpoint manager's choice)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--max_per_task", type=int, default=-1, help="examples per task (default -1: all)")
    p.add_argument("--device_type", default=None, choices=["cuda", "xla", "mps", "cpu"],
                   help="device (default: autodetect)")
    p.add_argument("--bundle_url", default=os.environ.get("NANOCHAT_EVAL_BUNDLE_URL", EVAL_BUNDLE_URL),
                   help="where eval_bundle.zip is served (env NANOCHAT_EVAL_BUNDLE_URL); a local path works too")
    p.add_argument("--core", type=int, default=1, help="1: the CORE metric (needs the eval bundle)")
    p.add_argument("--cpp", type=int, default=0, help="1: C++ pass@k on HumanEval-cpp and MBPP-cpp (needs g++)")
    p.add_argument("-n", "--num_samples", type=int, default=1, help="C++: completions per problem (pass@n)")
    p.add_argument("-t", "--temperature", type=float, default=0.0, help="C++: sampling temperature")
    p.add_argument("-k", "--top_k", type=int, default=50, help="C++: top-k sampling")
    p.add_argument("-m", "--max_new_tokens", type=int, default=384, help="C++: tokens per completion")
    p.add_argument("-x", "--max_problems", type=int, default=None, help="C++: at most this many problems per task")
    p.add_argument("--workers", type=int, default=None, help="C++: parallel compiles/runs (default: every core)")
    p.add_argument("--fim", default=None, help="C++ fill-in-the-middle on the documents of this directory (cpp_data "
                   "shards: the last one; or C++ sources): exact match and g++ -fsyntax-only of the filled file")
    p.add_argument("--fim_docs", type=int, default=100, help="FIM: at most this many documents")
    p.add_argument("--fim_max_tokens", type=int, default=256, help="FIM: tokens per middle")
    p.add_argument("--fim_syntax", type=int, default=1, help="FIM: 1 = only documents that pass g++ -fsyntax-only "
                   "alone, and the filled file's syntax scored too; 0 = every document, exact match only, no g++ "
                   "(for files that do not compile on their own, e.g. library headers)")
    p.add_argument("--bundle_dir", default=None, help="where the bundle is unpacked (default: $NANOCHAT_BASE_DIR/eval_bundle)")
    return p.parse_args(argv)


def format_table(out):
    lines = [f"{'Task':<35} {'Accuracy':>9} {'Centered':>9}", "-" * 55]
    for label, acc in out["results"].items():
        lines.append(f"{label:<35} {acc:>9.4f} {out['centered_results'][label]:>9.4f}")
    lines.append("-" * 55)
    lines.append(f"{'CORE':<35} {'':>9} {out['core_metric']:>9.4f}")
    return "\n".join(lines)


def results_csv(out):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["task", "accuracy", "centered"])
    for label, acc in out["results"].items():
        w.writerow([label, f"{acc:.6f}", f"{out['centered_results'][label]:.6f}"])
    w.writerow(["CORE", "", f"{out['core_metric']:.6f}"])
    return buf.getvalue()


def main(argv=None):
    args = parse_args(argv)
    if not args.core and not args.cpp and not args.fim:
        raise SystemExit("nothing to evaluate: --core=0, --cpp=0 and no --fim")
    if args.cpp or (args.fim and args.fim_syntax):
        from nanochat.cpp_exec import find_compiler
        if find_compiler() is None:
            raise SystemExit("--cpp=1 and --fim need g++ (apt-get install g++; --fim_syntax=0 scores exact match without it)")
    device_type = autodetect_device_type(args.device_type)
    ddp, rank, _, world_size, device = compute_init(device_type)
    try:
        from nanochat.checkpoint_manager import load_model
        model, tokenizer, meta = load_model("base", device, phase="eval", model_tag=args.model_tag, step=args.step)
        meta = meta or {}
        model_tag = args.model_tag or meta.get("model_tag") or "base"
        step = args.step if args.step is not None else meta.get("step", "last")
        dtype = compute_dtype(device_type)
        autocast = (torch.amp.autocast(device_type=device_type, dtype=dtype)
                    if device_type == "cuda" and dtype != torch.float32 else contextlib.nullcontext())
        out = {}
        if args.core:
            out = core(args, model, tokenizer, device, autocast, rank, ddp, model_tag, step)
        if args.cpp:
            out["cpp"] = cpp(args, model, tokenizer, autocast, rank, world_size, model_tag, step)
        if args.fim and rank == 0:
            out["fim"] = fim(args, model, tokenizer, autocast, model_tag, step)
        return out
    finally:
        compute_cleanup()


def core(args, model, tokenizer, device, autocast, rank, ddp, model_tag, step):
    bundle_dir = os.path.abspath(args.bundle_dir or os.path.join(get_base_dir(), "eval_bundle"))
    if rank == 0:
        try:
            ensure_eval_bundle(args.bundle_url, bundle_dir)
        except (RuntimeError, ValueError) as e:  # offline, or a broken bundle: say so in one line
            print(f"error: {e}\nPut an unpacked eval bundle at {bundle_dir} (or pass --bundle_dir), "
                  "or point --bundle_url / NANOCHAT_EVAL_BUNDLE_URL at a mirror of eval_bundle.zip", file=sys.stderr)
            raise SystemExit(EXIT_NO_BUNDLE)
    if ddp:
        dist.barrier()  # the other ranks wait for rank 0's download
    with autocast:
        out = evaluate_core(model, tokenizer, device, bundle_dir, max_per_task=args.max_per_task)
    print0(f"\nCORE evaluation of {model_tag} step {step}"
           + (f" ({args.max_per_task} examples per task)" if args.max_per_task >= 0 else ""))
    print0(format_table(out))
    if rank == 0:
        csv_path = os.path.join(get_base_dir(), "base_eval", f"{model_tag}_{step}.csv")
        text = results_csv(out)
        atomic_write(csv_path, lambda f: f.write(text), mode="w")
        print0(f"wrote {csv_path}")
        get_report().log(section="Base model evaluation", data=[
            {"Model": f"{model_tag} (step {step})", "Max examples per task": args.max_per_task,
             "CORE metric": out["core_metric"]},
            {f"{label} (centered)": c for label, c in out["centered_results"].items()},
        ])
    return out


def cpp(args, model, tokenizer, autocast, rank, world_size, model_tag, step):
    """{task: {"pass@k": ...}} for the C++ tasks, completion-style (nanochat/chat_eval.run_generative)."""
    from nanochat.chat_eval import run_generative
    from nanochat.engine import Engine
    from tasks.humaneval_cpp import HumanEvalCpp, MBPPCpp
    engine = Engine(model, tokenizer, use_tools=False)
    results = {}
    for name, task in (("HumanEval-cpp", HumanEvalCpp(workers=args.workers)), ("MBPP-cpp", MBPPCpp(workers=args.workers))):
        with autocast:
            results[name] = run_generative(task, tokenizer, engine, num_samples=args.num_samples,
                                           max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                           top_k=args.top_k, max_problems=args.max_problems, rank=rank,
                                           world_size=world_size, completion=True)
        print0(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in results[name].items() if k.startswith("pass@"))
               + "; samples: " + ", ".join(f"{st} {v:.1%}" for st, v in results[name]["statuses"].items()))
    if rank == 0:
        get_report().log(section="Base model C++ evaluation", data=[
            {"Model": f"{model_tag} (step {step})", "Samples per problem": args.num_samples,
             "Temperature": args.temperature},
            {f"{name} {k}": v for name, r in results.items() for k, v in r.items() if k.startswith("pass@")},
            {f"{name} samples {st}": v for name, r in results.items() for st, v in r["statuses"].items()},
        ])
    return results


def fim(args, model, tokenizer, autocast, model_tag, step):
    """{kind: {"exact", "syntax", "n"}} of C++ fill-in-the-middle (tasks/cpp_fim.py), greedy, on rank 0."""
    from nanochat.engine import Engine
    from nanochat.fim import fim_prompt
    from tasks import cpp_fim
    try:
        texts = cpp_fim.load_documents(args.fim, args.fim_docs)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--fim={args.fim}: {e}")
    if args.fim_syntax:
        texts = cpp_fim.usable(texts, workers=args.workers)
    examples = cpp_fim.make_examples(texts)
    if not examples:
        why = "passes g++ -fsyntax-only on its own (--fim_syntax=0 skips that check)" if args.fim_syntax else \
              "has a line or a function body to cut out"
        raise SystemExit(f"--fim={args.fim}: no document {why}, so none gives an example")
    engine = Engine(model, tokenizer, use_tools=False)
    room = model.config.sequence_len - args.fim_max_tokens  # prompts longer than the trained context are cropped
    if room < 64:
        raise SystemExit(f"--fim_max_tokens={args.fim_max_tokens} leaves {room} tokens of the model's context "
                         f"({model.config.sequence_len}) for the prompt; lower it")
    completions, bits = [], []
    for e in examples:
        prompt = fim_prompt(tokenizer, e["prefix"], e["suffix"], max_len=room)
        with autocast:
            rows, _ = engine.generate_batch(prompt, num_samples=1, max_tokens=args.fim_max_tokens, temperature=0.0)
        completions.append(tokenizer.decode(rows[0]))
        bits.append(middle_bits(model, tokenizer, prompt, e["middle"], args.fim_max_tokens, autocast))
    out = cpp_fim.score(examples, completions, workers=args.workers, syntax=bool(args.fim_syntax))
    for kind, r in out.items():
        b = [bits[i] for i, e in enumerate(examples) if kind in ("all", e["kind"])]
        r["bpb"] = sum(x for x, _ in b) / max(sum(n for _, n in b), 1)
        syntax = f", syntax {r['syntax']:.4f}" if args.fim_syntax else ""
        print0(f"FIM {kind}: exact {r['exact']:.4f}{syntax}, middle bpb {r['bpb']:.4f} ({r['n']} examples)")
    get_report().log(section="Base model C++ FIM", data=[
        {"Model": f"{model_tag} (step {step})", "Documents": len(texts)},
        {f"FIM {kind} {m}": r[m] for kind, r in out.items() for m in ("exact", "syntax", "bpb", "n") if r[m] is not None},
    ])
    return out


@torch.no_grad()
def middle_bits(model, tokenizer, prompt, middle, max_tokens, autocast):
    """(bits, bytes) of the true middle after its FIM prompt, teacher-forced: a finer measure
    of infilling than exact match, which small models rarely reach. At most max_tokens of
    the middle's tokens (and only their bytes) are scored; the <|bos|> that ends a middle
    is not (it has no bytes)."""
    mid = tokenizer.encode(middle)
    nbytes = len(middle.encode("utf-8")) if len(mid) <= max_tokens else None
    mid = mid[:max_tokens]
    if not mid:
        return 0.0, 0
    ids = torch.tensor([prompt + mid], device=model.wte.weight.device)
    targets = ids[:, 1:].clone()
    targets[:, :len(prompt) - 1] = -1  # only the middle's tokens count
    with autocast:
        nats = model(ids[:, :-1], targets, loss_reduction="none").float().sum().item()
    return nats / math.log(2), nbytes or len(tokenizer.decode(mid).encode("utf-8"))


if __name__ == "__main__":
    main()
