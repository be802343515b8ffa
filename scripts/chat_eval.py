"""
Evaluate a chat model (mid, sft or rl checkpoint) on the chat tasks and ChatCORE.

    python -m scripts.chat_eval -i sft                      # all tasks
    python -m scripts.chat_eval -i mid -a ARC-Easy|MMLU -x 500
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -- -i sft

Categorical tasks (ARC-Easy, ARC-Challenge, MMLU) compare the logits of the answer
letters; generative tasks (GSM8K, HumanEval, SpellingBee) sample with the engine (tool
use on) and check the answers, HumanEval's code in the execution sandbox. See
nanochat/chat_eval.py. Results go to the report card ("Chat evaluation <source>").
"""

import argparse
import time

from nanochat.chat_eval import chatcore, run_categorical, run_generative
from nanochat.checkpoint_manager import load_model
from nanochat.common import autocast_for, autodetect_device_type, compute_cleanup, compute_init, print0
from nanochat.engine import Engine
from nanochat.execution import isolation
from nanochat.report import get_report
from tasks.arc import ARC
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.spellingbee import SpellingBee

TASKS = {  # name -> the test split it is scored on (built only when asked for)
    "ARC-Easy": lambda: ARC(subset="ARC-Easy", split="test"),
    "ARC-Challenge": lambda: ARC(subset="ARC-Challenge", split="test"),
    "MMLU": lambda: MMLU(subset="all", split="test"),
    "GSM8K": lambda: GSM8K(subset="main", split="test"),
    "HumanEval": lambda: HumanEval(split="test"),
    "SpellingBee": lambda: SpellingBee(size=256, split="test"),
}

parser = argparse.ArgumentParser(description="Evaluate a chat model on ARC, MMLU, GSM8K, HumanEval, SpellingBee")
parser.add_argument("-i", "--source", required=True, choices=["base", "mid", "sft", "rl"], help="which stage's checkpoint")
parser.add_argument("-a", "--task_name", default="|".join(TASKS), help="tasks separated by | (default: all)")
parser.add_argument("-g", "--model_tag", default=None, help="model tag (default: the largest)")
parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
parser.add_argument("-x", "--max_problems", type=int, default=None, help="at most this many examples per task")
parser.add_argument("-b", "--batch_size", type=int, default=8, help="rows per forward pass for categorical tasks")
parser.add_argument("-n", "--num_samples", type=int, default=1, help="completions per problem (pass@n)")
parser.add_argument("-t", "--temperature", type=float, default=0.0)
parser.add_argument("-k", "--top_k", type=int, default=50)
parser.add_argument("-m", "--max_new_tokens", type=int, default=512)
parser.add_argument("--device_type", default="", help="cuda|xla|mps|cpu (default: autodetect)")
args = parser.parse_args()

if args.num_samples > 1 and args.temperature == 0:
    print("warning: -n > 1 with -t 0 samples the same greedy answer n times, so pass@n equals pass@1; "
          "give a temperature, e.g. -t 1.0")
names = [n for n in args.task_name.split("|") if n]
unknown = [n for n in names if n not in TASKS]
if unknown:
    raise SystemExit(f"unknown task(s) {', '.join(unknown)}; choose from {'|'.join(TASKS)}")
if "HumanEval" in names and isolation() == "none":
    print0("=" * 80 + "\nWARNING: the execution sandbox cannot isolate code on this machine (no user namespaces):\n"
           "HumanEval runs model-written code UNSANDBOXED, as this user. See nanochat/execution.py.\n" + "=" * 80)

device_type = autodetect_device_type(args.device_type)
ddp, rank, local_rank, world_size, device = compute_init(device_type)
autocast = autocast_for(device_type)
try:
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
except FileNotFoundError as e:
    raise SystemExit(f"{e}\nNothing to evaluate for -i {args.source}: train that stage first.") from None
engine = Engine(model, tokenizer)
print0(f"evaluating {args.source}/{meta['model_tag']} step {meta['step']} on {', '.join(names)}")

results = {}
for name in names:
    task = TASKS[name]()
    t0 = time.time()
    with autocast:
        if task.eval_type == "categorical":
            acc = run_categorical(task, tokenizer, model, args.batch_size, args.max_problems, rank, world_size)
        else:
            acc = run_generative(task, tokenizer, engine, args.num_samples, args.max_new_tokens, args.temperature,
                                 args.top_k, args.max_problems, rank, world_size)
    results[name] = acc
    print0(f"{name}: {100 * acc:.2f}% ({time.time() - t0:.0f}s)")

row = dict(results)
if all(n in results for n in TASKS):  # ChatCORE only over the full set, so it stays comparable
    row["ChatCORE"] = chatcore(results)
print0("\n| task | accuracy |\n| --- | --- |")
for name, acc in row.items():
    print0(f"| {name} | {acc:.4f} |")
get_report().log(section=f"Chat evaluation {args.source}",
                 data=[{"source": args.source, "model_tag": meta["model_tag"], "step": meta["step"],
                        "max_problems": args.max_problems, "num_samples": args.num_samples}, row])
compute_cleanup()
