#!/usr/bin/env bash
# Installs lalign into the active Python environment: `bash scripts/install.sh` (core) or `... test`.
# The torch stack is pinned to the CPU wheel torch==2.13.0 and installed first, so that nothing else can make pip
# pick another torch (a multi-GB CUDA build). timm is installed without its dependencies for the same reason:
# it asks for torchvision, which would pull such a torch; torchvision is installed apart (install_torchvision).
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

# timm and open_clip import torchvision at load, and it must be the build of the installed torch: PyPI's
# torchvision 0.28.0 (the release for torch 2.13.0) is a CUDA build whose _C.so links libtorch_cuda, which the CPU
# torch lacks (its import fails: "operator torchvision::nms does not exist"); the CPU build is on PyTorch's index.
# --no-deps: its requirement torch==2.13.0 would let pip replace the CPU torch. Best effort: what does not import is
# removed again (the tests then use tests/shims/torchvision), with a hint. LALIGN_SKIP_TORCHVISION=1 skips this.
install_torchvision() {
  python -c "import torchvision" 2>/dev/null && return 0
  [ -n "${LALIGN_SKIP_TORCHVISION:-}" ] && return 0
  local tag args
  tag=$(python -c "import torch; print(torch.__version__.partition('+')[2])")  # cpu for the CPU wheel
  args=(--no-deps "torchvision==0.28.0${tag:++$tag}")
  [ -n "$tag" ] && args+=(--index-url "https://download.pytorch.org/whl/$tag")
  if ! python -m pip show -q torchvision >/dev/null 2>&1; then  # never remove a torchvision this did not install
    python -m pip install -q --retries 1 --timeout 30 "${args[@]}" >/dev/null 2>&1 || true
    python -c "import torchvision" 2>/dev/null && return 0
    python -m pip uninstall -q -y torchvision >/dev/null 2>&1 || true
  fi
  echo "install.sh: no working torchvision (timm and open_clip import it outside the tests): pip install ${args[*]}"
}

case "${1:-core}" in
  core) python -m pip install -q -e . ;;
  test)
    python -m pip install -q torch==2.13.0
    # grain (core) builds the real-image batches; the test extra adds tensorflow-datasets (without TensorFlow),
    # with which the tfds source's tests prepare their data set
    python -m pip install -q -e '.[test]'
    python -m pip install -q --no-deps 'timm>=1.0.8'  # the range pyproject.toml's timm extra states
    # open_clip (LAION / DFN / MetaCLIP checkpoints) also asks for torchvision; its tokenizer needs ftfy and regex
    python -m pip install -q --no-deps open_clip_torch
    python -m pip install -q ftfy regex
    python -m pip install -q pyyaml huggingface_hub
    install_torchvision
    ;;
  *) echo "usage: scripts/install.sh [core|test]" >&2; exit 2 ;;
esac
