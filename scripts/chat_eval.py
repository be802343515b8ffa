"""
Evaluate a chat model (mid, sft or rl checkpoint) on the chat tasks and ChatCORE.

    python -m scripts.chat_eval -i sft                      # all tasks
    python -m scripts.chat_eval -i mid -a ARC-Easy|MMLU -x 500
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -- -i sft

Categorical tasks (ARC-Easy, ARC-Challenge, MMLU) compare the logits of the answer
letters; generative tasks (GSM8K, HumanEval, SpellingBee, and the C++ tasks HumanEval-cpp
and MBPP-cpp) sample with the engine (tool use on) and check the answers, HumanEval's
code in the execution sandbox, the C++ compiled with g++ and run in it (in parallel over
--workers cores). With -n samples per problem (and -t > 0), pass@1, pass@10, pass@100
(those <= n) and pass@n are reported with the unbiased estimator. See
nanochat/chat_eval.py. Results go to the report card ("Chat evaluation <source>"):
ChatCORE over the six original tasks, "C++ pass@1" (the mean over the C++ tasks) beside it.

    python -m scripts.chat_eval -i sft -a "HumanEval-cpp|MBPP-cpp" -n 10 -t 0.8
"""

import argparse
import time

from nanochat.chat_eval import chatcore, run_categorical, run_generative
from nanochat.checkpoint_manager import load_model
from nanochat.common import autocast_for, autodetect_device_type, compute_cleanup, compute_init, print0
from nanochat.engine import Engine
from nanochat.cpp_exec import find_compiler
from nanochat.execution import isolation
from nanochat.report import get_report
from tasks.arc import ARC
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.humaneval_cpp import HumanEvalCpp, MBPPCpp
from tasks.mmlu import MMLU
from tasks.spellingbee import SpellingBee

TASKS = {  # name -> the test split it is scored on (built only when asked for)
    "ARC-Easy": lambda: ARC(subset="ARC-Easy", split="test"),
    "ARC-Challenge": lambda: ARC(subset="ARC-Challenge", split="test"),
    "MMLU": lambda: MMLU(subset="all", split="test"),
    "GSM8K": lambda: GSM8K(subset="main", split="test"),
    "HumanEval": lambda: HumanEval(split="test"),
    "SpellingBee": lambda: SpellingBee(size=256, split="test"),
    "HumanEval-cpp": lambda: HumanEvalCpp(split="test", workers=args.workers),
    "MBPP-cpp": lambda: MBPPCpp(split="test", workers=args.workers),
}
CHATCORE_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"]
CPP_TASKS = ["HumanEval-cpp", "MBPP-cpp"]
CODE_TASKS = ["HumanEval", *CPP_TASKS]  # tasks that run model-written code

parser = argparse.ArgumentParser(description="Evaluate a chat model on ARC, MMLU, GSM8K, HumanEval, SpellingBee, "
                                             "HumanEval-cpp, MBPP-cpp")
parser.add_argument("-i", "--source", required=True, choices=["base", "mid", "sft", "rl"], help="which stage's checkpoint")
parser.add_argument("-a", "--task_name", default=None, help="tasks separated by | (default: all; the C++ ones only with g++)")
parser.add_argument("-g", "--model_tag", default=None, help="model tag (default: the largest)")
parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
parser.add_argument("-x", "--max_problems", type=int, default=None, help="at most this many examples per task")
parser.add_argument("-b", "--batch_size", type=int, default=8, help="rows per forward pass for categorical tasks")
parser.add_argument("-n", "--num_samples", type=int, default=1, help="completions per problem (pass@n)")
parser.add_argument("-t", "--temperature", type=float, default=0.0)
parser.add_argument("-k", "--top_k", type=int, default=50)
parser.add_argument("-m", "--max_new_tokens", type=int, default=512)
parser.add_argument("--workers", type=int, default=None, help="parallel C++ compiles/runs (default: every core)")
parser.add_argument("--device_type", default="", help="cuda|xla|mps|cpu (default: autodetect)")
args = parser.parse_args()

if args.num_samples > 1 and args.temperature == 0:
    print("warning: -n > 1 with -t 0 samples the same greedy answer n times, so pass@n equals pass@1; "
          "give a temperature, e.g. -t 1.0")
if args.task_name is None:  # everything this machine can run
    names = list(TASKS)
    try:
        find_compiler()
    except RuntimeError as e:
        print(f"warning: skipping {', '.join(CPP_TASKS)}: {e}")
        names = [n for n in names if n not in CPP_TASKS]
else:
    names = [n for n in args.task_name.split("|") if n]
unknown = [n for n in names if n not in TASKS]
if unknown:
    raise SystemExit(f"unknown task(s) {', '.join(unknown)}; choose from {'|'.join(TASKS)}")
if any(n in CODE_TASKS for n in names) and isolation() == "none":
    print0("=" * 80 + "\nWARNING: the execution sandbox cannot isolate code on this machine (no user namespaces):\n"
           "HumanEval and the C++ tasks run model-written code UNSANDBOXED, as this user. "
           "See nanochat/execution.py.\n" + "=" * 80)

device_type = autodetect_device_type(args.device_type)
ddp, rank, local_rank, world_size, device = compute_init(device_type)
autocast = autocast_for(device_type)
try:
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
except FileNotFoundError as e:
    raise SystemExit(f"{e}\nNothing to evaluate for -i {args.source}: train that stage first.") from None
engine = Engine(model, tokenizer)
print0(f"evaluating {args.source}/{meta['model_tag']} step {meta['step']} on {', '.join(names)}")

results, pass_k, statuses = {}, {}, {}
for name in names:
    task = TASKS[name]()
    t0 = time.time()
    with autocast:
        if task.eval_type == "categorical":
            acc = run_categorical(task, tokenizer, model, args.batch_size, args.max_problems, rank, world_size)
        else:
            scores = run_generative(task, tokenizer, engine, args.num_samples, args.max_new_tokens,
                                    args.temperature, args.top_k, args.max_problems, rank, world_size)
            acc = scores.pop("accuracy")
            for st, share in scores.pop("statuses", {}).items():  # C++: how the samples ended
                statuses[f"{name} samples {st}"] = share
            if args.num_samples > 1:
                pass_k.update({f"{name} {k}": v for k, v in scores.items()})
    results[name] = acc
    print0(f"{name}: {100 * acc:.2f}% ({time.time() - t0:.0f}s)")

row = dict(results)
if all(n in results for n in CHATCORE_TASKS):  # ChatCORE only over the full set, so it stays comparable
    row["ChatCORE"] = chatcore({n: results[n] for n in CHATCORE_TASKS})
if all(n in results for n in CPP_TASKS):  # the C++ summary: mean pass@1 (pass@n with -n > 1 is in pass_k)
    row["C++ pass@1"] = sum(pass_k.get(f"{n} pass@1", results[n]) for n in CPP_TASKS) / len(CPP_TASKS)
row.update(pass_k)
row.update(statuses)
print0("\n| task | accuracy |\n| --- | --- |")
for name, acc in row.items():
    print0(f"| {name} | {acc:.4f} |")
get_report().log(section=f"Chat evaluation {args.source}",
                 data=[{"source": args.source, "model_tag": meta["model_tag"], "step": meta["step"],
                        "max_problems": args.max_problems, "num_samples": args.num_samples}, row])
compute_cleanup()
