#!/usr/bin/env bash
# Installs lalign into the active Python environment: `bash scripts/install.sh` (core) or `... test`.
# The torch stack is pinned to the CPU wheel torch==2.13.0 and installed first, so that nothing else can make pip
# pick another torch (a multi-GB CUDA build). timm is installed without its dependencies for the same reason:
# it asks for torchvision, which would pull such a torch; timm's ViTs do not need torchvision.
set -euo pipefail
cd "$(dirname "$0")/.."
# tcmalloc (Debian/Ubuntu package libtcmalloc-minimal4): XLA:CPU steps run 1.3-2x faster with it, and lalign's
# entry points preload it when it is installed (lalign/allocator.py). Best effort: installed only as root where
# apt-get exists; anything else prints a hint and goes on. LALIGN_SKIP_TCMALLOC=1 skips this.
install_tcmalloc() {
  # (not grep -q: its early exit would fail the pipe under pipefail)
  { ldconfig -p || /sbin/ldconfig -p; } 2>/dev/null | grep libtcmalloc >/dev/null && return 0
  [ -n "${LALIGN_SKIP_TCMALLOC:-}" ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "install.sh: installing tcmalloc (apt-get install libtcmalloc-minimal4) for faster XLA:CPU steps"
    export DEBIAN_FRONTEND=noninteractive
    apt_install() {
      local pkg
      for pkg in libtcmalloc-minimal4 libtcmalloc-minimal4t64; do  # the second: Ubuntu 24.04's name
        timeout 300 apt-get install -y -q "$pkg" >/dev/null 2>&1 && return 0
      done
      return 1
    }
    apt_install && return 0
    timeout 300 apt-get update -q >/dev/null 2>&1 && apt_install && return 0  # package lists may be empty
  fi
  echo "install.sh: tcmalloc not installed; for 1.3-2x faster CPU steps: sudo apt-get install libtcmalloc-minimal4"
}
install_tcmalloc

case "${1:-core}" in
  core) python -m pip install -q -e . ;;
  test)
    python -m pip install -q torch==2.13.0
    python -m pip install -q -e '.[test]'
    python -m pip install -q --no-deps timm
    # open_clip (LAION / DFN / MetaCLIP checkpoints) also asks for torchvision; its tokenizer needs ftfy and regex
    python -m pip install -q --no-deps open_clip_torch
    python -m pip install -q ftfy regex
    python -m pip install -q pyyaml huggingface_hub
    ;;
  *) echo "usage: scripts/install.sh [core|test]" >&2; exit 2 ;;
esac
