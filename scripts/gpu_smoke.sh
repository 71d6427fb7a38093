#!/usr/bin/env bash
# GPU smoke test (scripts/gpu_smoke.py): a ~0.44B random-init Qwen3 through generation on
# CUDA, DeepSpeed ZeRO-2 bf16 on CUDA and the bucketed weight sync for 3 DualGRPO steps,
# printing one JSON line per stage. Runs in a few minutes on one H100.
#
#   bash scripts/gpu_smoke.sh [--steps N] [--prompts P] [--no-nccl-probe] [--schedule colocated]
#
# --schedule colocated: the engine sleeps while the learner trains on the same GPU and the new
# weights go by CUDA IPC (scripts/smoke_colocated.py), as cluster.schedule=colocated does.
#
# Uses the `python3` on PATH (or $PYTHON), which must hold a CUDA torch. A machine with no
# package index can get the rest as wheels in .whl/ (deepspeed built with DS_BUILD_OPS=0,
# hjson, pydantic and its deps): they are installed into a scratch folder first.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    site=${TMPDIR:-/tmp}/personadual-smoke-site
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 PERSONADUAL_CACHE=${PERSONADUAL_CACHE:-${TMPDIR:-/tmp}/personadual-cache}
exec "$PYTHON" scripts/gpu_smoke.py "$@"
