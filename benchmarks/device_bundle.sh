#!/usr/bin/env bash
# What a GPU session carries to the lent GPU machine, built on this machine (which has the network and ../shared):
#
#   bash benchmarks/device_bundle.sh      # then: the device tool's run with carry [".whl", ".carry"]
#
#   .whl/            Python 3.12 wheels of what the GPU machine's image lacks (benchmarks/device-wheels.txt):
#                    kornia, faiss-cpu, LightningCLI's jsonargparse and its helpers, and lightly (lightly_reference.py only; installed there without
#                    its dependencies, which the image has or the benchmark does not import)
#   .carry/cifar10/  the CIFAR-10 pack and its unpack.py from ../shared/datasets (gpu_session.sh unpacks it)
#
# Both folders are git-ignored; together about 45 MB of the device tool's 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${SHARED:-../shared}
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl -r benchmarks/device-wheels.txt
mkdir -p .carry/cifar10
cp "$shared"/datasets/cifar10/*.npz "$shared"/datasets/cifar10/unpack.py .carry/cifar10/
du -sh .whl .carry
