#!/usr/bin/env bash
# Installs the Debian packages visionformers builds and tests with.
set -euo pipefail
pkgs=(build-essential cmake pkg-config
      libdnnl-dev libjpeg62-turbo-dev libpng-dev zlib1g-dev
      nlohmann-json3-dev libcli11-dev libgtest-dev libbenchmark-dev)
# Benchmarks against PyTorch eager on this machine (bench/ only).
[ "${VF_BENCH_DEPS:-0}" = 1 ] && pkgs+=(python3-torch python3-torchvision python3-numpy)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
