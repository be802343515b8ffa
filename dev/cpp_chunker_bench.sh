#!/usr/bin/env bash
# cpp_chunker throughput: MB/s of source per mode next to tree-sitter's parse-only floor,
# at 1 and 2 threads (median of 3 runs each). Roots: the arguments, default the
# Debian-packaged C++ that dev/cpp_syntax_check.py --debian uses.
# $CPP_CHUNKER_BINARY, when set, is the binary measured (to compare two builds); else the
# crate's release build, built first.
#   bash dev/cpp_chunker_bench.sh [ROOT ...]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${CPP_CHUNKER_BINARY:-tools/cpp_chunker/target/release/cpp_chunker}
[ -n "${CPP_CHUNKER_BINARY:-}" ] || (cd tools/cpp_chunker && cargo build --release --locked -q)
ROOTS=("$@")
[ ${#ROOTS[@]} -gt 0 ] || ROOTS=(/usr/include/eigen3 /usr/include/fmt /usr/include/spdlog /usr/include/nlohmann
    /usr/share/doc/nlohmann-json3-dev/examples /usr/src/googletest /usr/include/boost/smart_ptr
    /usr/include/boost/container /usr/include/boost/algorithm /usr/include/boost/mp11)
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
echo "| run | threads | MB read | median s | MB/s | x parse-only time |"
echo "| --- | --- | --- | --- | --- | --- |"
for threads in 1 2; do
    floor=""
    for run in parse-only file crossfile project compilable "compilable --dedup none"; do
        if [ "$run" = parse-only ]; then args=(--parse-only); else args=(--mode $run --out "$OUT" --overwrite); fi
        times=()
        for i in 1 2 3; do
            s=$("$BIN" --roots "${ROOTS[@]}" "${args[@]}" --threads $threads 2>/dev/null)
            times+=("$(python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); print(d["seconds"], d["bytes_read"])' <<<"$s")")
        done
        read -r med mb < <(printf '%s\n' "${times[@]}" | sort -n | sed -n 2p | awk '{print $1, $2/1e6}')
        [ -n "$floor" ] || floor=$med
        python3 -c "print(f'| $run | $threads | {$mb:.2f} | {$med:.2f} | {$mb/$med:.2f} | {$med/$floor:.2f} |')"
    done
done
