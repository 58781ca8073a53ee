"""Shared fixtures: tiny configs so every test runs in seconds on 2 CPU cores."""
import os
import shutil
import sys
import tempfile

# 8 fake CPU devices for the sharding tests; must be set before JAX is first imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache for the test run, shared with the subprocesses tests start (through the
# environment). Why: most tests train the same tiny configs, and each `train_maskembed` builds new jitted closures,
# so the in-memory cache never hits; compiling the same programs again was over half the suite's time on a slow
# 2-core machine. Every program is still compiled once per run; set JAX_COMPILATION_CACHE_DIR to keep the
# cache from one run to the next.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lalign-tests-xla-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# pytest-xdist workers share it too. JAX does not lock the cache (unless given a size limit, whose eviction scans
# the whole directory on every write): an entry read while another process writes it fails to decompress, and JAX
# then warns and compiles instead. Never a wrong program, at worst a compile.

import importlib.util  # noqa: E402

import pytest  # noqa: E402

# timm and open_clip import torchvision at load time. scripts/install.sh installs PyTorch's CPU build of it where
# that index is reachable (PyPI's build needs a CUDA torch); where none is installed, a test-only shim answers those
# imports. See tests/shims/torchvision/__init__.py.
if importlib.util.find_spec("torchvision") is None:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "shims"))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# PyTorch and the libraries on it, for parity tests: skipped where not installed; one thread (the suite runs two
# pytest workers on two cores).
@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    return torch


@pytest.fixture(scope="module")
def transformers(torch):
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def timm_mod(torch):
    return pytest.importorskip("timm")


def load_config(name: str = "configs/demo.py", arg: str = "smoke"):
    from lalign import config

    return config.load(f"{name}:{arg}")


@pytest.fixture
def tiny_config():
    """configs/demo.py:tiny: 16px scenes, 4px patches, a 2-block width-16 ViT, batch 8 (one per fake device)."""
    return load_config(arg="tiny")


def pytest_sessionstart(session):
    """The sharding tests compare 8 devices with 1: on fewer they would pass without testing anything."""
    import jax

    if len(jax.devices()) != 8:
        pytest.exit(f"the tests need 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8); JAX has "
                    f"{len(jax.devices())}: XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}", returncode=2)


def pytest_sessionfinish(exitstatus):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
