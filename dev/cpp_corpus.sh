#!/usr/bin/env bash
# A local test corpus of C++ projects in different styles for dev/cpp_syntax_check.py (issue 23):
# installs the Debian packages (apt-get, as root) and copies each project into DIR/<label>/ laid
# out so that `-I DIR/<label>` resolves its own includes (<absl/...>, "json/..."), then prints
# the roots, one a line. Copies, not symlinks: cpp_chunker does not follow symlinks.
#   bash dev/cpp_corpus.sh DIR                      # packages + copies; prints the roots
#   LEVELDB_SRC=~/src/leveldb bash dev/cpp_corpus.sh DIR   # leveldb's sources, not only its headers
#   python dev/cpp_syntax_check.py --roots $(bash dev/cpp_corpus.sh DIR) --mode compilable ...
# Styles: Google guards and sources (leveldb, googletest, re2, yaml-cpp), macros that open
# namespaces (absl ABSL_NAMESPACE_BEGIN, fmt FMT_BEGIN_NAMESPACE), #pragma once (spdlog),
# template-heavy (glm, absl), C-with-classes (tinyxml2, pugixml, jsoncpp), generated config
# headers (snappy-stubs-public.h, jsoncpp's version.h, leveldb's port_config.h absent),
# small programs (pugixml samples, catch2 examples).
set -euo pipefail
DIR=${1:?usage: bash dev/cpp_corpus.sh DIR}
PACKAGES=(googletest libgmock-dev libabsl-dev libfmt-dev libspdlog-dev libyaml-cpp-dev libre2-dev libsnappy-dev
    libjsoncpp-dev libpugixml-dev libtinyxml2-dev catch2 libglm-dev libleveldb-dev libbenchmark-dev)
missing=()
for p in "${PACKAGES[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    if ! command -v apt-get >/dev/null || [ "$(id -u)" != 0 ]; then
        echo "cpp_corpus: needs the Debian packages ${missing[*]}; install them as root with apt-get install (this is not a root shell on Debian/Ubuntu)" >&2
        exit 2
    fi
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
fi
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
copy() {  # copy LABEL DEST_SUBDIR SOURCE...: SOURCE files/dirs into DIR/LABEL/DEST_SUBDIR, replaced whole
    local label=$1 sub=$2; shift 2
    rm -rf "${DIR:?}/$label"
    mkdir -p "$DIR/$label/$sub"
    cp -rL "$@" "$DIR/$label/$sub/"
    echo "$DIR/$label"
}
if [ -n "${LEVELDB_SRC:-}" ]; then copy leveldb . "$LEVELDB_SRC"/. && rm -rf "$DIR/leveldb/.git"
else copy leveldb leveldb /usr/include/leveldb/.; fi
copy googletest . /usr/src/googletest/.
copy absl absl /usr/include/absl/.
copy fmt fmt /usr/include/fmt/.
copy spdlog spdlog /usr/include/spdlog/.
copy yaml-cpp yaml-cpp /usr/include/yaml-cpp/.
copy re2 re2 /usr/include/re2/.
copy snappy . /usr/include/snappy.h /usr/include/snappy-sinksource.h /usr/include/snappy-stubs-public.h
copy jsoncpp json /usr/include/jsoncpp/json/.
copy pugixml . /usr/include/pugixml.hpp /usr/include/pugiconfig.hpp /usr/share/doc/libpugixml-dev/examples/samples/.
copy tinyxml2 . /usr/include/tinyxml2.h
copy catch2-examples . /usr/share/doc/catch2/examples/.
copy glm glm /usr/include/glm/.
