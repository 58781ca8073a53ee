"""The benchmark's analytic FLOP model: against XLA's cost analysis and the published ViT-B/16 breakdown."""
import json
import subprocess
import sys

import jax
import ml_collections
import pytest

from lalign import bench, cost_model
from lalign.models.vit import make_vit
from lalign.train import build_step


def _cfg(**kw):
    base = dict(sampler="uniform", keep_prob=0.5, num_blocks=1, antithetic=True, include_ones=True,
                target_layer="penultimate", loss="mse", decoder_depth=2, attn_softcap=None, student_dtype="",
                teacher_dtype="")
    base.update(kw)
    return ml_collections.ConfigDict(base)


def test_vit_b16_breakdown_matches_the_paper_scale_numbers():
    parts = cost_model.maskembed_flops_per_image(make_vit("B/16", pool_type="map"), 224, _cfg(), 2)
    assert 245e9 < parts["total"] < 262e9  # ~257 GFLOP per image
    share = {k: parts[k] / parts["total"] for k in ("teacher", "student", "decoder")}
    assert abs(share["teacher"] - 0.38) < 0.02 and abs(share["student"] - 0.41) < 0.02
    assert abs(share["decoder"] - 0.21) < 0.02


def test_flop_model_agrees_with_xla_cost_analysis(tiny_config):
    # Matmul-dominated sizes: width 128, 64 tokens (elementwise work is what the model leaves out).
    c = tiny_config
    c.data.image_size = 32
    c.model.update(width=128, depth=3, mlp_dim=512, num_heads=4, patch_size=4)
    c.mesh = {"num_devices": 1}
    teacher = make_vit(width=128, depth=3, mlp_dim=512, num_heads=4, patch_size=4, pool_type="map")
    images = jax.random.normal(jax.random.key(0), (c.batch_size, 32, 32, 3))
    params = teacher.init(jax.random.key(0), images[:1])["params"]
    s = build_step(c, teacher, params, images[:2])
    state = s.init(params, s.keys["init"])
    xla = bench.xla_flops(s.train_step.lower(state, s.teacher_params, images).compile())
    if xla is None:
        pytest.skip("this backend has no cost analysis")
    model = cost_model.maskembed_flops_per_image(teacher, 32, c.maskembed, c.maskembed.decoder_depth)["total"]
    assert abs(model * c.batch_size / xla - 1) < 0.10, (model * c.batch_size, xla)


def test_bench_cli_prints_one_json_line():
    r = subprocess.run([sys.executable, "-m", "lalign.bench", "--config=configs/demo.py:smoke", "--steps=2",
                        "--warmup=1", "--config.batch_size=8", "--config.mesh.num_devices=1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("images_per_s", "step_s", "step_s_min", "flops_per_step", "xla_flops_per_step", "achieved_tflops",
                "peak_tflops", "mfu"):
        assert key in out, key
    assert out["images_per_s"] > 0 and 0 < out["mfu"] < 1.5


def test_profile_splits_the_step_time_by_part_and_kind(tiny_config, tmp_path):
    c = tiny_config
    c.mesh = {"num_devices": 1}
    out = bench.run(c, steps=1, warmup=0, profile_dir=str(tmp_path / "trace"))["time_breakdown"]
    assert out["op_time_s"] > 0
    assert {"teacher", "student forward", "student backward", "decoder forward", "decoder backward",
            "optimizer and rest"} == set(out["by_part"])
    assert set(out["by_kind"]) == {"attention matmul", "matmul", "elementwise and other"}
    for shares in (out["by_part"], out["by_kind"]):
        assert abs(sum(shares.values()) - 1) < 1e-3 and min(shares.values()) > 0
    assert len(out["slowest_ops"]) == 5 and list(tmp_path.glob("trace/**/*.xplane.pb"))


def test_hlo_op_kinds_reads_parts_and_attention_from_metadata():
    hlo = '''HloModule m

%fused_dot (p0: f32[2,4,4], p1: f32[2,4,4]) -> f32[2,4,4] {
  %p0 = f32[2,4,4]{2,1,0} parameter(0)
  %p1 = f32[2,4,4]{2,1,0} parameter(1)
  ROOT %dot.1 = f32[2,4,4]{2,1,0} dot(%p0, %p1), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={2}
}

ENTRY %main (a: f32[2,4,4]) -> f32[2,4,4] {
  %a = f32[2,4,4]{2,1,0} parameter(0)
  %logits = f32[2,4,4]{2,1,0} fusion(%a, %a), kind=kCustom, calls=%fused_dot, metadata={op_name="jit(train_step)/jvp(ViT)/Transformer/encoderblock_0/MultiHeadDotProductAttention_0/...hqd,...hkd->...hqk/dot_general"}
  %mlp = f32[2,4,4]{2,1,0} fusion(%a, %logits), kind=kCustom, calls=%fused_dot, metadata={op_name="jit(train_step)/transpose(jvp(MaskEmbedModel))/student/MlpBlock_0/Dense_0/dot_general"}
  ROOT %upd = f32[2,4,4]{2,1,0} add(%mlp, %a), metadata={op_name="jit(train_step)/add"}
}
'''
    kinds = bench.hlo_op_kinds(hlo)
    assert kinds["logits"] == ("teacher", "attention matmul")
    assert kinds["mlp"] == ("student backward", "matmul")
    assert kinds["upd"] == ("optimizer and rest", "elementwise and other")


def test_bench_data_times_the_image_folder_beside_the_step_and_names_the_bound(tmp_path):
    """`--data` on a tiny image folder: the source's images/s (per process, per core) beside the step's, and which
    one bounds training."""
    import os

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(12):
        os.makedirs(tmp_path / "images" / f"c{i % 2}", exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(
            tmp_path / "images" / f"c{i % 2}" / f"{i}.jpg", quality=90)
    demo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py")
    (tmp_path / "folder_config.py").write_text(f'''import importlib.util

import ml_collections


def get_config():
    spec = importlib.util.spec_from_file_location("demo_config", {demo!r})
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    c = demo.get_config("tiny")
    c.data = ml_collections.ConfigDict(dict(name="image_folder", path={str(tmp_path / "images")!r}, image_size=16,
                                            num_val=2, num_workers=2, normalization="clip"))
    c.mesh = dict(num_devices=1)
    return c
''')
    r = subprocess.run([sys.executable, "-m", "lalign.bench", f"--config={tmp_path / 'folder_config.py'}", "--data",
                        "--steps=2", "--warmup=1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["data_source"] == "image_folder" and out["data_threads"] == 2
    for key in ("data_images_per_s", "data_images_per_s_per_core", "data_cpu_ms_per_image", "data_cores",
                "images_per_s", "step_images_per_s_per_process"):
        assert out[key] > 0, key
    assert out["data_images_per_s_per_core"] <= out["data_images_per_s"]
    assert out["bound_by"] in ("data", "step")
    assert out["bound_by"] == ("data" if out["data_images_per_s"] < out["step_images_per_s_per_process"] else "step")
