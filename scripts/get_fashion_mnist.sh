#!/usr/bin/env bash
# Make Fashion-MNIST available to robustune from the Debian package `dataset-fashion-mnist`.
#   - already installed system-wide: nothing to do;
#   - root: install the package (files land in /usr/share/datasets/fashion-mnist);
#   - otherwise: download the .deb with apt (no root needed) and extract its files into
#     ${1:-data}/fashion-mnist, where robustune looks (./data/<name>).
# Uses the machine's configured apt sources; no registry host is hard-coded here.
set -euo pipefail

PKG=dataset-fashion-mnist
SYSTEM_DIR=/usr/share/datasets/fashion-mnist

if [[ -f "$SYSTEM_DIR/train-images-idx3-ubyte.gz" ]]; then
    echo "Fashion-MNIST is already installed in $SYSTEM_DIR"
    exit 0
fi

if [[ "$(id -u)" -eq 0 ]]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$PKG"
    echo "Fashion-MNIST installed in $SYSTEM_DIR"
    exit 0
fi

target="${1:-data}/fashion-mnist"
mkdir -p "$target"
target="$(cd "$target" && pwd)"   # absolute: we cd into a temp dir below
if [[ -f "$target/train-images-idx3-ubyte.gz" ]]; then
    echo "Fashion-MNIST is already in $target"
    exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(
    cd "$tmp"
    apt-get download "$PKG"
    dpkg-deb -x ./*.deb extracted
)
cp "$tmp"/extracted/usr/share/datasets/fashion-mnist/*.gz "$target/"
echo "Fashion-MNIST extracted to $target"
echo "robustune finds ./data/fashion-mnist by itself; from elsewhere pass --data-dir $target" \
     "or set ROBUSTUNE_DATA_DIR=$(dirname "$target")"
