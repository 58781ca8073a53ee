"""lalign's timm files on the timm releases users have (1.0.8, the reference's pin, and later).

Two arguments changed between them: timm >= 1.0.16 takes `pool_include_prefix` (before, the MAP head always sees
the prefix tokens), and timm >= 1.0.15 gives the MAP head's MLP the model's `act_layer` (before, exact GELU).
These tests run against the installed timm; the older behaviour is reproduced on it where it matters (the MAP
head's exact GELU, the signature without `pool_include_prefix`).

Manual check with timm 1.0.8 (not in CI, which installs one timm): unpack its wheel into DIR and run
    PYTHONPATH=DIR python -m pytest -q tests/test_interop.py tests/test_teachers.py tests/test_timm_versions.py -k timm
"""
import importlib.util
import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lalign.checkpoints import timm as ltimm

from interop import SIGLIP, TOL, images, make, maxdiff, nchw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pooled(torch, t, x):
    t.eval()
    with torch.no_grad():
        f = t.forward_features(nchw(torch, x))
        return f, t.forward_head(f, pre_logits=True)


def _export(fields, path):
    model, params = make(fields)
    x = images()
    out, aux = model.apply({"params": params}, x)
    ltimm.to_timm(params, model, path)
    return x, np.asarray(aux["encoded"]), np.asarray(aux["pre_logits"])


def _kwargs(path):
    return json.loads(ltimm.read_metadata(str(path))["timm_kwargs"])


def test_map_head_with_registers_and_no_class_token_pools_every_token(torch, timm_mod, tmp_path):
    """lalign's MAP head attends to the registers too: timm must not drop them before pooling."""
    from safetensors.torch import load_file

    x, encoded, pooled = _export(dict(SIGLIP, num_registers=2), tmp_path / "m.safetensors")
    t = ltimm.timm_model(tmp_path / "m.safetensors")
    t.load_state_dict(load_file(tmp_path / "m.safetensors"), strict=True)
    f, p = _pooled(torch, t, x)
    assert f.shape[1] == 2 + 16
    assert maxdiff(f, encoded) <= TOL and maxdiff(p, pooled) <= TOL


def test_map_head_gets_the_blocks_tanh_gelu_where_timm_builds_exact_gelu(torch, timm_mod, tmp_path):
    """timm < 1.0.15 builds attn_pool's MLP with exact GELU; big_vision's MAP head uses the tanh one."""
    from safetensors.torch import load_file

    x, encoded, pooled = _export(SIGLIP, tmp_path / "m.safetensors")
    t = ltimm.timm_model(tmp_path / "m.safetensors")
    t.load_state_dict(load_file(tmp_path / "m.safetensors"), strict=True)
    assert repr(t.attn_pool.mlp.act) == repr(t.blocks[0].mlp.act) != repr(torch.nn.GELU())
    t.attn_pool.mlp.act = torch.nn.GELU()  # as timm 1.0.8 builds it
    _, exact = _pooled(torch, t, x)
    assert maxdiff(exact, pooled) > 3 * TOL  # 6.7e-4: beyond the parity tolerance
    ltimm.match_map_head_activation(t)
    f, p = _pooled(torch, t, x)
    assert maxdiff(f, encoded) <= TOL and maxdiff(p, pooled) <= TOL


def test_kwargs_fit_a_timm_without_pool_include_prefix(timm_mod, tmp_path):
    """The installed VisionTransformer's signature without `pool_include_prefix` (as timm < 1.0.16 has it): the
    argument is left out where that timm pools the same tokens, and refused with the release needed where not."""
    from timm.models.vision_transformer import VisionTransformer

    sig = inspect.signature(VisionTransformer.__init__)

    class Old:
        def __init__(self, *args, **kwargs):
            pass

    Old.__init__.__signature__ = sig.replace(
        parameters=[p for p in sig.parameters.values() if p.name != "pool_include_prefix"])
    _export(SIGLIP, tmp_path / "siglip.safetensors")
    kwargs = _kwargs(tmp_path / "siglip.safetensors")
    del kwargs["norm_eps"]  # lalign's own key: timm_model turns it into norm_layer
    assert kwargs["global_pool"] == "map" and not kwargs["pool_include_prefix"]  # no prefix tokens
    if "pool_include_prefix" in sig.parameters:  # timm >= 1.0.16: passed as it is
        assert ltimm.kwargs_for_installed_timm(kwargs, VisionTransformer, timm_mod.__version__) == kwargs
    fitted = ltimm.kwargs_for_installed_timm(kwargs, Old, "1.0.8")
    assert "pool_include_prefix" not in fitted and fitted == {k: v for k, v in kwargs.items()
                                                               if k != "pool_include_prefix"}
    with_cls = dict(kwargs, class_token=True, pool_include_prefix=True)  # MAP over the class token: old timm's way
    assert "pool_include_prefix" not in ltimm.kwargs_for_installed_timm(with_cls, Old, "1.0.8")
    with pytest.raises(ValueError, match=r"^timm 1\.0\.8's VisionTransformer has no argument pool_include_prefix "
                                         r"\(this model needs pool_include_prefix=False\): install timm>=1\.0\.16\.$"):
        ltimm.kwargs_for_installed_timm(dict(with_cls, pool_include_prefix=False), Old, "1.0.8")
    with pytest.raises(ValueError, match="has no argument pool_include_prefix"):  # an average over the prefix too
        ltimm.kwargs_for_installed_timm(dict(with_cls, global_pool="avg"), Old, "1.0.8")


def test_timm_and_open_clip_without_torchvision_are_one_line_naming_the_install():
    """Outside the tests' shim, timm and open_clip fail to import without torchvision: lalign says what to
    install."""
    pytest.importorskip("torch")
    if importlib.util.find_spec("timm") is None or importlib.util.find_spec("open_clip") is None:
        pytest.skip("timm or open_clip is not installed")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and "shims" not in p]))
    code = ("import importlib.util, sys\n"
            "if importlib.util.find_spec('torchvision'): sys.exit(3)\n"
            "from lalign.checkpoints.open_clip import open_clip_visual\n"
            "from lalign.checkpoints.timm import timm_model\n"
            "for build, arg in ((timm_model, {}), (open_clip_visual, {'embed_dim': 8, 'vision_cfg': {}})):\n"
            "    try:\n"
            "        build(arg)\n"
            "    except ImportError as e:\n"
            "        print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if r.returncode == 3:
        pytest.skip("torchvision is installed")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert [line.split(" ")[0] for line in lines] == ["timm", "open_clip"], r.stdout
    import torch

    for line in lines:
        assert " imports torchvision, which is not installed: pip install --no-deps torchvision==" in line
        if torch.__version__ == "2.13.0+cpu":
            assert "torchvision==0.28.0+cpu --index-url https://download.pytorch.org/whl/cpu" in line
