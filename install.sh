#!/usr/bin/env bash
# Installs msif-ray and its test dependencies into the current Python environment.
# torch comes first and pinned: the 2.13.0 CPU build; a bare `torch` would pull a CUDA build.
#
#   ./install.sh            within constraints.txt: the versions CI last passed with
#   ./install.sh --latest   the newest releases (then run the tests, and ./install.sh --freeze if they pass)
#   ./install.sh --freeze   write constraints.txt from the current environment (nothing is installed)
set -euo pipefail
cd "$(dirname "$0")"
mode="${1:-}"
if [ "$mode" = "--freeze" ]; then
    header=$(sed -n '/^#/p' constraints.txt)
    pins=$(python -m pip freeze --exclude-editable | sed 's/+[^ ]*$//' | sort -f)
    printf '%s\n%s\n' "$header" "$pins" > constraints.txt
    echo "constraints.txt: $(echo "$pins" | wc -l) pins"
    exit 0
fi
constraints=(-c constraints.txt)
if [ "$mode" = "--latest" ]; then
    constraints=()
elif [ -n "$mode" ]; then
    echo "usage: ./install.sh [--latest | --freeze]" >&2
    exit 2
fi
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q "${constraints[@]}" -e ".[test]"
# kronfluence (a test reference) without its declared torchvision dependency, which it never imports.
python -m pip install -q --no-deps kronfluence==1.0.1
