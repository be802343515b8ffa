#!/usr/bin/env bash
# The tiny nanochat pipeline on any CPU, on the embedded corpus (no downloads needed):
# corpus -> tokenizer -> pretraining -> bits per byte -> CORE -> report.md. About 5 minutes on
# 2 cores. Later stages (midtraining, SFT, chat) join as they land.
# Everything goes to $NANOCHAT_BASE_DIR (default ~/.cache/nanochat).
source "$(dirname "$0")/setup.sh"
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
export NANOCHAT_DATA_DIR="${NANOCHAT_DATA_DIR:-$NANOCHAT_BASE_DIR/embedded_data}"
ITERS=${ITERS:-60}          # pretraining steps (CI runs a shorter profile with ITERS=4)
CORPUS_MB=${CORPUS_MB:-24}  # megabytes of C++ and of Python in the embedded corpus

python -m nanochat.report reset
# 1. the embedded corpus: C++ headers + Python stdlib sources found on this machine
python -m nanochat.corpus --out_dir "$NANOCHAT_DATA_DIR" --cpp_mb="$CORPUS_MB" --py_mb="$CORPUS_MB"
# 2. tokenizer: a small vocabulary keeps the CPU model fast (the GPU runs use 32768)
python -m scripts.tok_train --vocab_size=8192
python -m scripts.tok_eval
python -m nanochat.dataloader --seconds=5
# 3. pretrain a 4-layer model for a few minutes
python -m scripts.base_train --depth=4 --max_seq_len=512 --device_batch_size=4 --total_batch_size=2048 \
    --num_iterations="$ITERS" --eval_every=$(( (ITERS + 1) / 2 )) --eval_tokens=8192 --core_metric_every=-1 \
    --sample_every="$ITERS" \
    --device_type=cpu --run=dummy
# 4. evaluate it: bits per byte and samples, then CORE on a few examples per task
python -m scripts.base_loss --device_batch_size=4 --split_tokens=8192 --device_type=cpu
python -m scripts.base_eval --max_per_task=16 --device_type=cpu \
    || echo "CORE skipped: the DCLM eval bundle could not be downloaded (offline?); see python -m scripts.base_eval --help"
# 5. the report card: ./report.md (and $NANOCHAT_BASE_DIR/report/ with the plots)
python -m nanochat.report generate
