#!/usr/bin/env bash
# Download into wheels/ (at the checkout root) exactly the wheels that benchmarks/gpu_train.py needs and the GPU
# image lacks, for its Python 3.12 on manylinux x86_64 (/work/.library/device/KINDS.md lists what the image holds:
# torch, transformers, tokenizers, safetensors, pyyaml, einops, msgpack, ninja, psutil, py-cpuinfo, tqdm, ...).
# Runs on any machine with pip and network access; versions are the ones the project is tested with.
#   DeepSpeed 0.19.8 (an sdist only: built here into a pure-Python wheel, no ops compiled) and what it needs beyond
#   the image: hjson, pydantic with pydantic-core, annotated-types, typing-inspection; omegaconf (configs);
#   sentencepiece 0.2.3 (the image's 0.2.2 aborts in C++ while training the benchmark's tokenizer).
# On the GPU machine: python3 -m pip install -q --no-index --no-deps --target /tmp/site wheels/*.whl and put
# /tmp/site on PYTHONPATH (the command in benchmarks/README.md does both).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
mkdir -p wheels
"$PY" -m pip wheel -q --no-deps -w wheels deepspeed==0.19.8
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d wheels hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 omegaconf==2.4.0 sentencepiece==0.2.3
ls -1 wheels
