#!/usr/bin/env bash
# A multi-host job on this machine: N JAX processes x K CPU devices running a real config (lalign/rehearse.py).
#   bash scripts/pod_rehearsal.sh --processes N --devices K --steps S [--sigterm-at STEP] [--data DIR] [--workdir DIR]
# Exits 0 only when every host finished; the last line is a one-line summary.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m lalign.rehearse "$@"
