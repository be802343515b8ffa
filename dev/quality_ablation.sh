#!/usr/bin/env bash
# Ablation of the quality recipe (issue 25): d12, window L, seq 2048, 524,288 tok/step,
# ${STEPS:-100} steps, one run per named flag set, then one table line per run.
#
#   DATA=/path/to/shards bash dev/quality_ablation.sh default new new-minus-ve new-minus-smear
#   bash dev/quality_ablation.sh list                  # the set names
#   DRY=1 ... bash dev/quality_ablation.sh new         # print the commands only
#   TINY=1 DATA=... bash dev/quality_ablation.sh default new   # CPU smoke test, tiny sizes
#
# Needs a tokenizer in $NANOCHAT_BASE_DIR/tokenizer (no internet needed). Env: STEPS, OUT
# (logs, default /tmp), NPROC (GPUs, default 1), EXTRA (flags appended to every run), TAG (a
# prefix for the runs' names, logs and checkpoints, so runs with different EXTRA can share OUT),
# DEPTH, SEQ, DBS (device batch), TBS (total batch), EVAL_TOKENS, PYTHON (default python).
#
# Sets: "default" = today's defaults (no flags); "legacy" = the January 2026 model and
# optimizer; "new" = every change of the recipe; "new-model" / "new-opt" = only the model /
# only the optimizer half (the other half at its January value); "new-minus-X" = new with X
# back at its January value, "new-minus-X-Y" without X and Y; "only-X" = legacy plus X alone,
# "only-X-Y" plus X and Y. Today's defaults = new-minus-window-sched-ratio-lrs-adam-muoneq. Every
# set but "default" spells out every flag, so its meaning does not move when the defaults do.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The new recipe, one entry per change: name -> "new flags|old flags" (the one place
# that lists them; docs/model.md has the same table with where each comes from).
declare -A RECIPE=(
  # model (GPTConfig fields, saved in checkpoints)
  [ve]="--value_embeds=1|--value_embeds=0"
  [smear]="--smear=1|--smear=0"
  [backout]="--backout=1|--backout=0"
  [lambdas]="--layer_lambdas=1|--layer_lambdas=0"
  [qk]="--qk_scale=1.2|--qk_scale=1.0"
  [rope]="--rope_base=100000|--rope_base=10000"
  [pad]="--pad_vocab_to=64|--pad_vocab_to=1"
  [window]="--short_window_div=4 --window_tile=128|--short_window_div=2 --window_tile=1"
  [init]="--ref_init=1|--ref_init=0"
  # optimizer and schedule (base_train flags)
  [lrs]="--embedding_lr=0.3 --unembedding_lr=0.008|--embedding_lr=0.2 --unembedding_lr=0.004"
  [adam]="--adam_per_group=1|--adam_per_group=0"
  [wd]="--weight_decay=0.28 --cautious_wd=1 --weight_decay_scaling=1 --weight_decay_schedule=cosine|--weight_decay=0 --cautious_wd=0 --weight_decay_scaling=0 --weight_decay_schedule=constant"
  [mom]="--muon_momentum_schedule=ref|--muon_momentum_schedule=legacy"
  [sched]="--warmup_steps=40 --warmdown_ratio=0.65 --final_lr_frac=0.05|--warmup_steps=-1 --warmdown_ratio=0.2 --final_lr_frac=0.0"
  [ratio]="--target_param_data_ratio=12 --param_count=scaling|--target_param_data_ratio=20 --param_count=all"
  [normuon]="--normuon_beta2=0.9|--normuon_beta2=0"
  [muoneq]="--muon_eq=1|--muon_eq=0"
  [muonplus]="--muon_plus=1|--muon_plus=0"
)
MODEL_PARTS="ve smear backout lambdas qk rope pad window init"
OPT_PARTS="lrs adam wd mom sched ratio normuon muoneq muonplus"

new_of() { echo "${RECIPE[$1]%%|*}"; }
old_of() { echo "${RECIPE[$1]#*|}"; }
flags_of() {  # the flags of a named set: each part at its new or its January value
  local name=$1 q p keep drop=""
  case "$name" in
    default) return ;;
    legacy) keep="" ;;
    new) keep="$MODEL_PARTS $OPT_PARTS" ;;
    new-model) keep="$MODEL_PARTS" ;;
    new-opt) keep="$OPT_PARTS" ;;
    new-minus-*) keep="$MODEL_PARTS $OPT_PARTS"; drop=${name#new-minus-} ;;
    only-*) keep=${name#only-}; keep=${keep//-/ } ;;
    *) echo "unknown set: $name (try: list)" >&2; return 1 ;;
  esac
  for p in $keep ${drop//-/ }; do
    [[ -n "${RECIPE[$p]:-}" ]] || { echo "unknown part: $p (in $name)" >&2; return 1; }
  done
  for p in ${drop//-/ }; do keep=$(echo " $keep " | sed "s/ $p / /"); done
  for q in $MODEL_PARTS $OPT_PARTS; do
    if [[ " $keep " == *" $q "* ]]; then new_of "$q"; else old_of "$q"; fi
  done | tr '\n' ' '
}

if [[ $# -eq 0 || $1 == list ]]; then
  echo "sets: default legacy new new-model new-opt new-minus-<part>[-<part>...] only-<part>[-<part>...]"
  echo "parts: $MODEL_PARTS $OPT_PARTS"
  echo "new recipe: $(flags_of new)"
  exit 0
fi

STEPS=${STEPS:-100}
OUT=${OUT:-/tmp}
NPROC=${NPROC:-1}
if [[ ${TINY:-0} == 1 ]]; then  # CPU smoke test of this script
  STEPS=${STEPS_TINY:-4}; DEPTH=${DEPTH:-2}; SEQ=${SEQ:-64}; DBS=${DBS:-2}; TBS=${TBS:-256}; EVAL_TOKENS=${EVAL_TOKENS:-256}
  EXTRA="--device_type=cpu ${EXTRA:-}"
fi
DEPTH=${DEPTH:-12}; SEQ=${SEQ:-2048}; DBS=${DBS:-32}; TBS=${TBS:-524288}; EVAL_TOKENS=${EVAL_TOKENS:-4194304}
for name in "$@"; do flags_of "$name" >/dev/null; done  # a typo stops before any run
if [[ -z "${DATA:-}" && ${DRY:-0} != 1 ]]; then echo "set DATA to the parquet shards directory" >&2; exit 1; fi
mkdir -p "$OUT"
launcher=("${PYTHON:-python}" -m scripts.base_train)
[[ $NPROC -gt 1 ]] && launcher=(torchrun --standalone --nproc_per_node="$NPROC" -m scripts.base_train --)

rows=()
for name in "$@"; do
  # shellcheck disable=SC2207
  flags=($(flags_of "$name"))
  cmd=("${launcher[@]}" --depth="$DEPTH" --window_pattern=L --max_seq_len="$SEQ" --device_batch_size="$DBS"
       --num_iterations="$STEPS" --total_batch_size="$TBS" --eval_every="$STEPS" --eval_tokens="$EVAL_TOKENS"
       --core_metric_every=-1 --sample_every=-1 --save_every=-1 --data_dir="${DATA:-DATA}" --model_tag="abl_${TAG:-}$name"
       "${flags[@]}" ${EXTRA:-})
  log="$OUT/abl_${TAG:-}$name.log"
  echo "== $name: ${cmd[*]}"
  [[ ${DRY:-0} == 1 ]] && continue
  if "${cmd[@]}" >"$log" 2>&1; then status=ok; else status=FAILED; fi
  # final val bpb, median tok/s over the logged steps after 10, peak memory
  row=$("${PYTHON:-python}" - "$log" "${TAG:-}$name" "$status" <<'EOF'
import re, statistics, sys
log, name, status = sys.argv[1:]
text = open(log).read()
bpb = re.findall(r"step \d+ \| val bpb: ([\d.]+)", text)
toks = [float(t.replace(",", "")) for s, t in re.findall(r"step (\d+)/\d+ .*?tok/sec: ([\d,]+)", text) if int(s) > 10]
mem = re.findall(r"peak memory: (\d+) MiB", text)
print(f"{name:24s} {bpb[-1] if bpb else '-':>8s} {statistics.median(toks) if toks else 0:>12,.0f} "
      f"{mem[-1] if mem else '-':>10s}  {status}")
EOF
)
  echo "$row"
  rows+=("$row")
done
[[ ${DRY:-0} == 1 ]] && exit 0
echo
printf "%-24s %8s %12s %10s  %s\n" name "val bpb" "tok/s" "peak MiB" "log: $OUT/abl_<name>.log"
printf "%s\n" "${rows[@]}"
