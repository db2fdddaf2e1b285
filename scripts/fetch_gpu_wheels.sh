#!/usr/bin/env bash
# The pure-Python wheels the lent GPU machine's image lacks (it has torch, transformers, accelerate, peft,
# safetensors, onnx*; not diffusers, webdataset, braceexpand, importlib_metadata), into .whl/ (git-ignored here
# through .git/info/exclude); name .whl in the device run's carry. Python 3.12 there.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl \
  diffusers==0.42.1 webdataset==1.0.2 braceexpand==0.1.7 importlib_metadata
ls .whl
