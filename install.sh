#!/usr/bin/env bash
# Installs msif-ray and its test dependencies into the current Python environment.
# torch comes first and pinned: the 2.13.0 CPU build; a bare `torch` would pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
# kronfluence (a test reference) without its declared torchvision dependency, which it never imports.
python -m pip install -q --no-deps kronfluence==1.0.1
