#!/usr/bin/env bash
# The test suite on this machine's CPU under the GPU machine's software, so that code written here against a newer
# torch does not first fail there, in a session's scarce GPU minutes:
#
#   bash benchmarks/device_stack.sh            # ~3 GB of downloads the first time, then the suite (~8 min)
#   bash benchmarks/device_stack.sh -x -k dino # pytest's arguments
#
# Versions as the device tool's KINDS.md lists the GPU machine's image (read 2026-11): Python 3.12, torch 2.11.0,
# torchvision 0.26.0, Lightning 2.6.6, numpy 2.5.2, tokenizers 0.23.2, safetensors 0.8.0, onnx 1.23.1,
# onnxruntime 1.30.0, onnxscript 0.7.2; plus what device_bundle.sh carries there (device-wheels.txt). Update them
# when the image changes. The venv (default /tmp/device-stack, VENV= to move it) is kept for the next call.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-/tmp/device-stack}
if [ ! -x "$venv/bin/python" ]; then
    python=
    for c in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do  # a pyenv shim may not run: try each
        if "$c" -c "" 2>/dev/null; then python=$c; break; fi
    done
    [ -n "$python" ] || { echo "no Python 3.12 here (the GPU machine runs 3.12): install one" >&2; exit 1; }
    "$python" -m venv "$venv"
fi
"$venv/bin/pip" install -q torch==2.11.0 torchvision==0.26.0 pytorch-lightning==2.6.6 numpy==2.5.2 \
    tokenizers==0.23.2 safetensors==0.8.0 onnx==1.23.1 onnxruntime==1.30.0 onnxscript==0.7.2 \
    -r benchmarks/device-wheels.txt
"$venv/bin/pip" install -q -e ".[dev]"  # the rest; the pins above already satisfy the toolkit's ranges
"$venv/bin/python" -c "import sys, torch; print('Python', sys.version.split()[0], 'torch', torch.__version__)"
exec "$venv/bin/python" -m pytest -q -rs "$@"
