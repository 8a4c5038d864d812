#!/usr/bin/env bash
# Installs every Debian package visionformers needs to build, test and run (a fresh Debian 12 has none of them).
# ocl-icd-opencl-dev: Debian's libdnnl-dev CMake config looks for OpenCL even for a CPU-only build.
set -euo pipefail
pkgs=(build-essential cmake pkg-config git ca-certificates
      libdnnl-dev ocl-icd-opencl-dev
      libjpeg62-turbo-dev libpng-dev zlib1g-dev libwebp-dev libtiff-dev libgif-dev
      libcurl4-openssl-dev libcpp-httplib-dev
      nlohmann-json3-dev libcli11-dev libgtest-dev libbenchmark-dev
      python3 python3-dev pybind11-dev python3-numpy python3-pil python3-distributed)
# Benchmarks against PyTorch eager on this machine (bench/ only). Debian's torch is built against the generic BLAS:
# without OpenBLAS as libblas.so.3 its matrix products run on the reference BLAS, many times slower.
[ "${VF_BENCH_DEPS:-0}" = 1 ] && pkgs+=(python3-torch python3-torchvision libopenblas0-openmp)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
