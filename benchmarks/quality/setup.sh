#!/usr/bin/env bash
# Material for benchmarks/quality/: the packages of the `quality` extra and Debian's Fashion-MNIST.
set -euo pipefail
cd "$(dirname "$0")/../.."
pip install -e ".[quality]"
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    sudo_=""; [ "$(id -u)" -ne 0 ] && sudo_="sudo"
    $sudo_ apt-get install -y dataset-fashion-mnist
fi
