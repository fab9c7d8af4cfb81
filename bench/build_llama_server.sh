#!/usr/bin/env bash
# Build llama.cpp's native `llama-server` and `llama-quantize` for bench/serve.py (issues 18, 28).
#
# The source comes from PyPI: llama-cpp-python's source distribution vendors llama.cpp
# (vendor/llama.cpp), so this needs no access beyond the package index. Two targets are built
# (Release, CPU), about 5-8 minutes on 2 cores, into an ignored cache folder; a second run finds
# the binaries and does nothing:
#   llama-server    the peer server;
#   llama-quantize  makes the Q4_0 file (llama.cpp's repacked CPU format) from the shipped Q4_1.
# The build is native (-march=native) except where the CPU reports AMX: in a VM that does not let
# a process use AMX the native build dies with "Illegal instruction", so there it is built with
# GGML_NATIVE=OFF, AMX off and every AVX/AVX2/AVX-512/VNNI extension the CPU reports on, which
# keeps llama.cpp's repacked AVX-512 kernels.
#
#   bench/build_llama_server.sh [PYTHON] [CACHE_DIR]
#     PYTHON     the interpreter whose pip downloads the sdist (default .venv/bin/python)
#     CACHE_DIR  where source and build live (default .bench/llama.cpp)
#
# The binaries end up in CACHE_DIR/build/bin/; bench/serve.py looks there first (this checkout's,
# then the main checkout's when run from a git worktree), or takes --llama-bin DIR.
set -euo pipefail

PY=${1:-.venv/bin/python}
CACHE=${2:-.bench/llama.cpp}
BIN="$CACHE/build/bin"

if [ -x "$BIN/llama-server" ] && [ -x "$BIN/llama-quantize" ]; then
    echo "llama-server and llama-quantize already built: $BIN"
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

CPUFLAGS=$(grep -m1 '^flags' /proc/cpuinfo || true)
has() { [[ " $CPUFLAGS " == *" $1 "* ]] && echo ON || echo OFF; }
if [ "$(has amx_int8)" = ON ]; then
    ISA=(-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
         -DGGML_AVX=ON -DGGML_AVX2="$(has avx2)" -DGGML_FMA="$(has fma)" -DGGML_F16C="$(has f16c)"
         -DGGML_AVX_VNNI="$(has avx_vnni)" -DGGML_AVX512="$(has avx512f)"
         -DGGML_AVX512_VBMI="$(has avx512vbmi)" -DGGML_AVX512_VNNI="$(has avx512_vnni)"
         -DGGML_AVX512_BF16="$(has avx512_bf16)")
    echo "CPU reports AMX: building without -march=native, AMX off (${ISA[*]})"
else
    ISA=(-DGGML_NATIVE=ON)
fi

# No web UI (the prebuilt one would be downloaded from Hugging Face), no curl/openssl (the
# model is a local file), static libraries so the binary runs from anywhere.
"$CMAKE" -S "$SRC" -B "$CACHE/build" "${GEN[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    "${ISA[@]}" \
    -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON >"$CACHE/configure.log"
nice -n 10 "$CMAKE" --build "$CACHE/build" --config Release --target llama-server llama-quantize \
    -j "$(nproc)" >"$CACHE/build.log"
echo "built $BIN/llama-server and $BIN/llama-quantize"
