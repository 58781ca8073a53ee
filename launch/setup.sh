#!/usr/bin/env bash
# Copies this checkout to every host of the slice and installs lalign with the TPU extra.
set -euo pipefail
: "${PROJECT:?}" "${ZONE:?}" "${NAME:?}"
cd "$(dirname "$0")/.."
tar czf /tmp/lalign.tgz --exclude=.git --exclude=.venv --exclude=runs .
gcloud compute tpus tpu-vm scp /tmp/lalign.tgz "$NAME":~/ --project="$PROJECT" --zone="$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$NAME" --project="$PROJECT" --zone="$ZONE" --worker=all --command \
  'mkdir -p ~/lalign && tar xzf ~/lalign.tgz -C ~/lalign && cd ~/lalign && pip install -q -e ".[tpu,gcs]"'
