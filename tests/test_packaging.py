"""The package as users install it: every package folder in the wheel, the configs as `lalign.configs` and no
top-level `configs`, one version, the command lines on the PATH, and a code base that passes its own linter."""
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata

import pytest

import lalign

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def project():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _package_folders() -> set[str]:
    """Every folder with an __init__.py, named as it installs (configs/ -> lalign.configs)."""
    out = set()
    for top, name in (("lalign", "lalign"), ("configs", "lalign.configs")):
        for d, _, names in os.walk(os.path.join(ROOT, top)):
            if "__init__.py" in names:
                rel = os.path.relpath(d, os.path.join(ROOT, top))
                out.add(name if rel == "." else f"{name}.{rel.replace(os.sep, '.')}")
    return out


def test_every_package_folder_is_listed(project):
    assert set(project["tool"]["setuptools"]["packages"]) == _package_folders()


def test_the_version_is_written_once(project):
    assert "version" in project["project"]["dynamic"]
    assert metadata.version("lalign") == lalign.__version__
    changelog = open(os.path.join(ROOT, "CHANGELOG.md")).read()
    assert re.search(rf"^## \[{re.escape(lalign.__version__)}\]", changelog, re.M)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools leaves build/ in the source tree, and files there from an earlier build (a module
    # since removed) would end up in this wheel.
    source = out / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", "*.egg-info",
                                                                "__pycache__", ".*_cache"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(out), str(source)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    (path,) = out.glob("lalign-*.whl")
    return path


def test_the_wheel_installs_the_configs_inside_lalign_and_no_top_level_configs(wheel, tmp_path, project):
    names = zipfile.ZipFile(wheel).namelist()
    assert "lalign/configs/siglip_so400m.py" in names and "lalign/configs/probe/coco_stuff.py" in names
    assert {n.split("/")[0] for n in names} == {"lalign", f"lalign-{lalign.__version__}.dist-info"}
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    sources = {os.path.relpath(os.path.join(d, f), ROOT).replace("configs/", "lalign/configs/", 1)
               for top in ("lalign", "configs") for d, _, fs in os.walk(os.path.join(ROOT, top))
               for f in fs if f.endswith(".py")}
    assert {n for n in names if n.endswith(".py")} == sources  # every module, and nothing else
    entry_points = zipfile.ZipFile(wheel).read(f"lalign-{lalign.__version__}.dist-info/entry_points.txt").decode()
    for script, target in project["project"]["scripts"].items():
        assert f"{script} = {target}" in entry_points

    # The unpacked wheel alone on the path, run from elsewhere: the configs import, `configs` does not.
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = ("import importlib.util, lalign.configs.siglip_so400m as c\n"
            "print(c.get_config('smoke').maskembed.loss)\n"
            "print(importlib.util.find_spec('configs'))\n")
    # -S: no site hooks, so not the editable install's finder; the dependencies' folders, but not the checkout
    deps = [p for p in sys.path[1:] if p and os.path.abspath(p) not in (ROOT, os.path.join(ROOT, "tests"))]
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    r = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path += {deps!r}\n{code}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    loss, spec = r.stdout.split("\n")[:2]
    assert loss == "mse" and spec == "None"


@pytest.mark.parametrize("script", ["lalign-train", "lalign-probe", "lalign-export", "lalign-report",
                                    "lalign-bench"])
def test_the_command_lines_are_on_the_path(script, tmp_path):
    path = shutil.which(script, path=os.path.dirname(sys.executable))
    assert path, f"{script} is not installed beside {sys.executable}"
    r = subprocess.run([path, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "--" in r.stdout + r.stderr, r.stderr[-3000:]


def test_a_command_line_user_error_is_one_line(tmp_path):
    path = shutil.which("lalign-export", path=os.path.dirname(sys.executable))
    r = subprocess.run([path, "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "out"), "--to", "hf"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-3000:]
    assert "missing" in r.stderr


def test_the_code_passes_its_linter():
    ruff = shutil.which("ruff", path=os.path.dirname(sys.executable)) or shutil.which("ruff")
    assert ruff, "ruff is part of the test install (pyproject.toml's test extra)"
    r = subprocess.run([ruff, "check", "--no-cache", ROOT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-5000:]
