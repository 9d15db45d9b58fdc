#!/usr/bin/env bash
# Install spfa with its test extras (CPU torch) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --upgrade pip
python3 -m pip install -q "torch==2.13.0" -e ".[test]"
python3 -m pytest -q -p no:cacheprovider "$@"
