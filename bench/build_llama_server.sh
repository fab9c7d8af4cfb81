#!/usr/bin/env bash
# Build llama.cpp's native `llama-server` for bench/serve.py (issue 18, item 1).
#
# The source comes from PyPI: llama-cpp-python's source distribution vendors llama.cpp
# (vendor/llama.cpp), so this needs no access beyond the package index. Only the llama-server
# target is built (Release, CPU, -march=native), about 5 minutes on 2 cores, into an ignored
# cache folder; a second run finds the binary and does nothing.
#
#   bench/build_llama_server.sh [PYTHON] [CACHE_DIR]
#     PYTHON     the interpreter whose pip downloads the sdist (default .venv/bin/python)
#     CACHE_DIR  where source and build live (default .bench/llama.cpp)
#
# The binary ends up at CACHE_DIR/build/bin/llama-server; bench/serve.py looks there first.
set -euo pipefail

PY=${1:-.venv/bin/python}
CACHE=${2:-.bench/llama.cpp}
BIN="$CACHE/build/bin/llama-server"

if [ -x "$BIN" ]; then
    echo "llama-server already built: $BIN"
    exit 0
fi

mkdir -p "$CACHE/sdist"
if ! ls "$CACHE"/sdist/llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
    "$PY" -m pip download --quiet --no-binary :all: --no-deps llama-cpp-python -d "$CACHE/sdist"
fi
SDIST=$(ls "$CACHE"/sdist/llama_cpp_python-*.tar.gz | sort -V | tail -n 1)
SRC="$CACHE/src"
if [ ! -f "$SRC/CMakeLists.txt" ]; then
    rm -rf "$CACHE/unpack" "$SRC"
    mkdir -p "$CACHE/unpack"
    tar -xzf "$SDIST" -C "$CACHE/unpack"
    mv "$CACHE"/unpack/llama_cpp_python-*/vendor/llama.cpp "$SRC"
    rm -rf "$CACHE/unpack"
fi

# cmake from PyPI when the system has none (the ninja generator likewise, else make).
CMAKE=$(command -v cmake || true)
if [ -z "$CMAKE" ]; then
    "$PY" -m pip install --quiet cmake
    CMAKE="$(dirname "$PY")/cmake"
fi
GEN=()
if command -v ninja >/dev/null; then GEN=(-G Ninja); fi

# No web UI (the prebuilt one would be downloaded from Hugging Face), no curl/openssl (the
# model is a local file), static libraries so the binary runs from anywhere.
"$CMAKE" -S "$SRC" -B "$CACHE/build" "${GEN[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON >"$CACHE/configure.log"
nice -n 10 "$CMAKE" --build "$CACHE/build" --config Release --target llama-server \
    -j "$(nproc)" >"$CACHE/build.log"
echo "built $BIN"
