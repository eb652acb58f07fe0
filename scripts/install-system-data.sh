#!/usr/bin/env bash
# Installs the Debian packages behind the real-data sources (emoji, fashion-mnist, clip-art) when we are root and they
# are missing. Never fatal: without them those sources report a clear error and their tests skip.
set -u
pkgs=(fonts-noto-color-emoji unicode-data dataset-fashion-mnist)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "setup: not root or no apt-get; missing data packages: ${missing[*]} (their datasets stay unavailable)"
  exit 0
fi
echo "setup: installing ${missing[*]}"
(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null 2>&1 \
  || echo "setup: apt-get could not install ${missing[*]}"
