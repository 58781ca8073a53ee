"""Dropping the reference's attention soft-cap at export: measured, refused by default, and exact where the cap
never acts."""
import json
import math

import numpy as np
import pytest

from lalign import export, softcap
from lalign.checkpoints import bigvision, hf
from lalign.checkpoints.manager import save_params

from interop import make


def test_threshold_is_where_the_cap_changes_a_logit_by_one_percent():
    t = softcap.threshold(30.0)
    assert abs(t - 5.2276) < 1e-3
    assert abs((t - 30 * math.tanh(t / 30)) / t - 0.01) < 1e-9


def _capped(scale):
    model, params = make(dict(patch_size=(8, 8), width=48, depth=2, mlp_dim=80, num_heads=3, pool_type="none",
                              attn_softcap=30.0))
    for i in range(2):  # larger queries: larger logits
        q = params["Transformer"][f"encoderblock_{i}"]["MultiHeadDotProductAttention_0"]["query"]
        q["kernel"] = q["kernel"] * scale
    return model, params


def test_measure_counts_the_logits_the_cap_acts_on_and_the_drift_of_the_tokens():
    x = np.random.default_rng(0).standard_normal((4, 32, 32, 3)).astype(np.float32)
    small, big = (softcap.measure(*_capped(s), x) for s in (0.05, 20.0))
    assert small["max_abs_logit"] < small["threshold"] and small["frac_beyond"] == 0
    assert small["feature_drift_max"] < 1e-3
    assert big["frac_beyond"] > 0.1 and big["feature_drift_rms"] > 100 * small["feature_drift_rms"]
    assert "of the attention logits lie beyond +-5.23" in softcap.describe(big)
    # the logits measured are the ones the model caps: recomputed here from the block's own q/k
    model, params = _capped(1.0)
    logits = softcap.attention_logits(model, params, x)
    assert len(logits) == 2 and logits[0].shape == (4, 3, 16, 16)
    with pytest.raises(ValueError, match="no attention soft-cap"):
        softcap.measure(model.clone(attn_softcap=None), params, x)


def test_export_of_a_capped_student_is_refused_with_the_measurement_unless_allowed(tmp_path, capsys):
    model, params = _capped(20.0)
    wd = tmp_path / "wd"
    save_params(str(wd / "checkpoints" / "best" / "5"), {"params": {"student": params}, "step": 5})
    (wd / "config.json").write_text(json.dumps({"model": dict(width=48, depth=2, mlp_dim=80, num_heads=3,
                                                              patch_size=8, pool_type="map", posemb="learn"),
                                                "maskembed": {"attn_softcap": 30.0},
                                                "data": {"normalization": "siglip"}}))
    step = str(wd / "checkpoints" / "best" / "5")
    args = ["--input", step, "--output", str(tmp_path / "hf"), "--to", "hf", "--no-head"]
    assert export.cli(args) == 2
    err = capsys.readouterr().err
    assert "attention soft-cap, which hf attention cannot hold" in err and "--allow-softcap-drop" in err
    assert "of the attention logits lie beyond" in err and not (tmp_path / "hf").exists()
    assert export.cli(args + ["--allow-softcap-drop"]) == 0
    out = capsys.readouterr()
    written = json.loads(out.out.strip().splitlines()[-1])
    assert written["softcap_dropped"]["frac_beyond"] > 0 and "embedded scenes" in written["softcap_dropped"]["images"]
    assert "exported without the cap" in out.err
    m2, p2 = hf.from_hf(tmp_path / "hf")
    assert m2.attn_softcap is None
    np.testing.assert_array_equal(p2["embedding"]["kernel"], params["embedding"]["kernel"])
    # formats that keep the model as it is (big_vision npz, orbax) need no measurement
    assert export.cli(["--input", step, "--output", str(tmp_path / "s.npz"), "--to", "bigvision"]) == 0
    assert bigvision.load_npz(tmp_path / "s.npz")["embedding"]["kernel"].shape == (8, 8, 3, 48)

