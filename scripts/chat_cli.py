"""
Chat with a trained model in the terminal.

    python -m scripts.chat_cli                         # the latest sft checkpoint of the largest model
    python -m scripts.chat_cli -i mid -g d20 -s 800    # another stage, model tag or step
    python -m scripts.chat_cli -p "Why is the sky blue?"   # one answer, printed, then exit
    python -m scripts.chat_cli -t 0 -m 256             # greedy, shorter answers

Type a message and the answer streams in as it is generated. Commands: `clear` starts a
new conversation, `quit` or `exit` (or Ctrl-D) leaves. Ctrl-C while the model answers
stops the answer (what was printed stays in the conversation); Ctrl-C at the prompt
leaves. When the conversation outgrows the model's context (its sequence_len, minus
room for the answer), the oldest turns are dropped. Each answer uses a fresh sampling
seed, so asking again gives a different answer (unless -t 0).
"""

import argparse
import random
import signal
import sys

from nanochat.checkpoint_manager import load_model
from nanochat.common import autocast_for, autodetect_device_type, compute_cleanup, compute_dtype, compute_init
from nanochat.engine import Engine
from nanochat.execution import isolation

STAGES = {"base": "scripts.base_train", "mid": "scripts.mid_train", "sft": "scripts.chat_sft",
          "rl": "scripts.chat_rl"}
MIN_ANSWER_TOKENS = 32  # a message must leave at least this much room (or -m if less) for the answer

parser = argparse.ArgumentParser(description="Chat with a trained nanochat model in the terminal")
parser.add_argument("-i", "--source", default="sft", choices=list(STAGES), help="which stage (default: sft)")
parser.add_argument("-g", "--model_tag", default=None, help="model tag, e.g. d20 (default: the largest)")
parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
parser.add_argument("-p", "--prompt", default=None, help="answer this prompt, print the answer and exit")
parser.add_argument("-t", "--temperature", type=float, default=0.6, help="sampling temperature (0 = greedy)")
parser.add_argument("-k", "--top_k", type=int, default=50, help="sample from the k most likely tokens (0 = all)")
parser.add_argument("-m", "--max_tokens", type=int, default=512, help="at most this many tokens per answer")
parser.add_argument("--speculative", type=int, default=1, help="1: greedy answers (-t 0) of a model with one MTP module "
                    "(--mtp) and attention-only layers decode self-speculatively (same tokens, fewer forwards); 0: off")
parser.add_argument("--bf16_linears", type=int, default=1, help="1 (default): Linear weights in bf16 on GPUs "
                    "(GPT.linears_to); 0: fp32, cast by autocast at every step (1.46x slower at batch 1; docs/serving.md)")
parser.add_argument("--stack_qkv", type=int, default=1, help="1 (default): each attention layer's q, k, v projections "
                    "as one matmul when decoding (GPT.stack_projections; fewer kernels a step; docs/engine.md); 0: three")
parser.add_argument("--decode_kernel", default="auto", choices=["auto", "sdpa", "triton"],
                    help="attention of a decode step: flash-decoding over the visible keys (nanochat/decode_triton.py: "
                         "CUDA, power-of-two head dim) or SDPA with a mask; auto (default): triton where it runs")
parser.add_argument("--compile_mode", default=None, help="torch.compile mode of the decode step, e.g. "
                    "max-autotune-no-cudagraphs (1.17x batch-1 decode on an H200, after ~45 s more compile the first time: "
                    "autotuning; docs/engine.md)")
parser.add_argument("--device_type", default="", help="cuda|xla|mps|cpu (default: autodetect)")
args = parser.parse_args()
if args.max_tokens < 1:
    parser.error("--max_tokens must be at least 1")
if args.temperature < 0:
    parser.error("--temperature must be >= 0")

# -----------------------------------------------------------------------------
# Model

device_type = autodetect_device_type(args.device_type)
ddp, rank, local_rank, world_size, device = compute_init(device_type)
autocast = autocast_for(device_type)  # bf16 on CUDA, a no-op on the CPU
try:
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
except FileNotFoundError as e:
    raise SystemExit(f"{e}\nNo {args.source} checkpoint to chat with: train that stage first "
                     f"(python -m {STAGES[args.source]}), or pick another with -i / -g / -s.") from None
except ValueError as e:  # e.g. a tokenizer that does not match the model
    raise SystemExit(str(e)) from None
if args.bf16_linears:  # every forward below runs under autocast, as linears_to needs
    model.linears_to(compute_dtype(device_type))
if args.stack_qkv:
    model.stack_projections()
try:
    model.set_decode_kernel(args.decode_kernel)
except ValueError as e:
    raise SystemExit(f"--{e}") from None
engine = Engine(model, tokenizer, speculative=bool(args.speculative))
if isolation() == "none":  # (chat_web refuses to start here; a terminal session is your own)
    print("WARNING: the execution sandbox cannot isolate code on this machine (no user namespaces): the model's "
          "Python tool calls run UNSANDBOXED, as this user. See nanochat/execution.py.")
engine.compile_mode = args.compile_mode
context = model.config.sequence_len
max_tokens = args.max_tokens
if max_tokens > context // 2:
    # otherwise every answer's room would push the whole history out of the context
    max_tokens = context // 2
    print(f"(-m {args.max_tokens} is too much for this model's context of {context} tokens; "
          f"answers are limited to {max_tokens})", file=sys.stderr)
top_k = args.top_k if args.top_k > 0 else None
special = tokenizer.encode_special
PART_MARKS = {special("<|python_start|>"): "python", special("<|python_end|>"): "text",
              special("<|output_start|>"): "python_output", special("<|output_end|>"): "text"}

# -----------------------------------------------------------------------------
# One answer


def prompt_ids(messages):
    """The tokens the model continues: the messages, then <|assistant_start|>."""
    return tokenizer.render_for_completion({"messages": messages + [{"role": "assistant", "content": ""}]})


def fit_context(conversation):
    """Prompt ids for the conversation (whose last message is the user's new one) and
    how many tokens the answer may take; drops the oldest turns when the prompt plus
    max_tokens would not fit the context. Returns (None, error message) if the new
    message is too long by itself."""
    messages = conversation["messages"]
    min_answer = min(max_tokens, MIN_ANSWER_TOKENS)
    alone = prompt_ids(messages[-1:])
    if len(alone) + min_answer > context:
        n = len(tokenizer.encode(messages[-1]["content"]))
        limit = context - (len(alone) - n) - min_answer
        return None, (f"your message is {n} tokens; this model's context is {context} "
                      f"(a message can be at most {limit} tokens, to leave room for the answer)")
    ids, dropped = prompt_ids(messages), 0
    while len(ids) + max_tokens > context and len(messages) > 1:
        messages = messages[2:]  # the oldest user message and its answer
        ids, dropped = prompt_ids(messages), dropped + 1
    if dropped:
        conversation["messages"] = messages
        print(f"(dropped the {dropped} oldest turn{'s' if dropped > 1 else ''} to fit the context)", file=sys.stderr)
    return ids, min(max_tokens, context - len(ids))


def stream_answer(ids, room):
    """Generate an answer to the prompt ids, printing it as it comes. Ctrl-C stops it.
    Returns (answer token ids without the stop token, whether it was interrupted)."""
    answer, interrupted = [], False
    decode = tokenizer.stream_decoder()  # holds a character split across tokens
    stream = engine.generate(ids, num_samples=1, max_tokens=room, temperature=args.temperature, top_k=top_k,
                             seed=random.randrange(2**31))
    try:
        with autocast:
            for column, _ in stream:
                token = column[0]
                if token in engine.stop_tokens:
                    break
                answer.append(token)
                print(decode(token), end="", flush=True)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        stream.close()
    print(decode(None), end="", flush=True)
    return answer, interrupted


def assistant_content(answer):
    """The answer as a message content: plain text, or text / python / python_output parts."""
    parts, kind, chunk = [], "text", []
    for token in answer + [None]:
        if token is None or token in PART_MARKS:
            if chunk:
                parts.append({"type": kind, "text": tokenizer.decode(chunk)})
            kind, chunk = PART_MARKS.get(token, kind), []
        else:
            chunk.append(token)
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts

# -----------------------------------------------------------------------------
# One-shot: -p "..."

if args.prompt is not None:
    if not args.prompt.strip():
        print("the prompt is empty", file=sys.stderr)
        sys.exit(2)
    ids, room = fit_context({"messages": [{"role": "user", "content": args.prompt}]})
    if ids is None:
        print(room, file=sys.stderr)
        sys.exit(2)
    _, interrupted = stream_answer(ids, room)
    print()
    compute_cleanup()
    sys.exit(130 if interrupted else 0)

# -----------------------------------------------------------------------------
# Interactive

if sys.stdin.isatty():
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
print(f"nanochat {args.source}/{meta['model_tag']} step {meta['step']} on {device_type}. "
      "Commands: 'clear' (new conversation), 'quit' or 'exit'. Ctrl-C stops an answer.")
conversation = {"messages": []}
# Ctrl-C must stop an answer even when we were started with SIGINT ignored (a background
# job of a non-interactive shell, nohup, some test runners): Python then keeps ignoring it
signal.signal(signal.SIGINT, signal.default_int_handler)
try:
    while True:
        try:
            text = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if not text:
            continue
        if text.lower() in ("quit", "exit"):
            break
        if text.lower() == "clear":
            conversation = {"messages": []}
            print("(new conversation)")
            continue
        conversation["messages"].append({"role": "user", "content": text})
        ids, room = fit_context(conversation)
        if ids is None:
            conversation["messages"].pop()
            print(room)
            continue
        print("\nAssistant: ", end="", flush=True)
        answer, interrupted = stream_answer(ids, room)
        print(" [stopped]" if interrupted else "")
        conversation["messages"].append({"role": "assistant", "content": assistant_content(answer)})
except KeyboardInterrupt:  # Ctrl-C between an answer and the next prompt
    print()
compute_cleanup()
