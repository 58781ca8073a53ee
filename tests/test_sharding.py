"""Sharding: mesh sizing, PartitionSpec rules, and sharded training == single-device training."""
import json
import os
import sys

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lalign import sharding
from lalign.models.vit import make_vit
from lalign.pretrain import pretrain_teacher
from lalign.train import train_maskembed


def test_mesh_shape_fills_minus_one_and_rejects_bad_meshes():
    assert sharding.mesh_shape({"data": -1}, 8) == (8, 1, 1)
    assert sharding.mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="needs 6 devices, but 8 devices are available"):
        sharding.mesh_shape({"data": 3, "fsdp": 2}, 8)
    with pytest.raises(ValueError, match="not divisible by 3"):
        sharding.mesh_shape({"data": -1, "fsdp": 3}, 8)
    with pytest.raises(ValueError, match="at most one axis"):
        sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)


def test_default_rules_tensor_parallel_blocks_and_fsdp_elsewhere():
    assert len(jax.devices()) == 8, "tests expect XLA_FLAGS=--xla_force_host_platform_device_count=8"
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = make_vit("S/16", pool_type="map", num_classes=9)
    params = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32))
    specs = jax.tree.map(lambda s: s.spec, sharding.tree_shardings(params["params"], mesh))
    blk = specs["Transformer"]["encoderblock_0"]
    assert blk["MultiHeadDotProductAttention_0"]["query"]["kernel"] == P("fsdp", "tensor", None)
    assert blk["MultiHeadDotProductAttention_0"]["out"]["kernel"] == P("tensor", None, "fsdp")
    assert blk["MlpBlock_0"]["Dense_0"]["kernel"] == P("fsdp", "tensor")
    assert blk["MlpBlock_0"]["Dense_1"]["kernel"] == P("tensor", "fsdp")
    assert specs["embedding"]["kernel"] == P(None, None, None, "fsdp")
    assert specs["head"]["bias"] == P(None)  # 9 is not divisible by fsdp=2: left whole
    scanned = jax.eval_shape(make_vit("S/16", scan=True).init, jax.random.key(0),
                             jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32))
    sspecs = jax.tree.map(lambda s: s.spec, sharding.tree_shardings(scanned["params"], mesh))
    assert sspecs["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"] == P(None, "fsdp", "tensor")


def test_batch_not_divisible_by_batch_shards_is_a_clear_error():
    mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
    with pytest.raises(ValueError, match="batch_size 12 is not divisible by the 8 batch shards"):
        sharding.check_batch_divisible(12, mesh)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from conftest import load_config

    c = load_config()
    c.data.update(image_size=16, patch_size=4, digit_size=(6, 8), max_objects=2)
    c.model.update(width=16, depth=2, mlp_dim=32, num_heads=4, patch_size=4)
    c.pretrain.update(steps=2, batch_size=8)
    c.quiet = True
    return c, pretrain_teacher(c, str(tmp_path_factory.mktemp("t")))


def _run(teacher, workdir, mesh):
    config, (model, params) = teacher
    config = ml_collections.ConfigDict(config.to_dict())
    config.update(total_steps=3, batch_size=8, log_every=1, eval_every=0, val_batches=1, async_checkpointing=False)
    config.maskembed.target_std_batches = 1
    config.mesh = mesh
    return train_maskembed(config, str(workdir), model, params)["last_params"]


@pytest.fixture(scope="module")
def single_device_params(teacher, tmp_path_factory):
    return _run(teacher, tmp_path_factory.mktemp("single"), {"data": 1, "fsdp": 1, "tensor": 1, "num_devices": 1})


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_training_equals_single_device(teacher, single_device_params, tmp_path, mesh):
    sharded = _run(teacher, tmp_path, dict(zip(("data", "fsdp", "tensor"), mesh)))
    for a, b in zip(jax.tree.leaves(single_device_params), jax.tree.leaves(sharded)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------- golden sharding
GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "siglip_so400m_shardings.json")
GOLDEN_MESHES = {  # name: (config.mesh, devices)
    "default_mesh_256": (None, 256),  # the config's own mesh on a v4-256: data=16, fsdp=16
    "tensor_parallel_256": (dict(data=-1, fsdp=8, tensor=4, num_devices=0), 256),
}


def so400m_shardings() -> dict:
    from conftest import load_config

    from lalign import memory

    out = {}
    for name, (mesh, devices) in GOLDEN_MESHES.items():
        c = load_config("configs/siglip_so400m.py", "full")
        if mesh is not None:
            c.mesh = mesh
        out[name] = memory.shardings(c, devices)
    return out


def test_golden_sharding_so400m():
    """Every So400m parameter's PartitionSpec under the default rules, as pinned in tests/golden: a rule change
    that silently replicates a big weight (or moves an axis) fails here."""
    with open(GOLDEN) as f:
        golden = json.load(f)
    actual = so400m_shardings()
    for name in GOLDEN_MESHES:
        want, got = golden[name]["specs"], actual[name]["specs"]
        assert golden[name]["mesh"] == actual[name]["mesh"], name
        assert sorted(want) == sorted(got), f"{name}: parameters added/removed: {set(want) ^ set(got)}"
        changed = {k: (want[k], got[k]) for k in want if want[k] != got[k]}
        assert not changed, f"{name}: PartitionSpecs changed (golden, now): {changed}"
    for path, spec in actual["default_mesh_256"]["specs"].items():  # no big weight is replicated
        shape = json.loads(spec[spec.index("["):])
        if np.prod(shape) >= 2**20:
            assert "fsdp" in spec, f"{path} {spec} is replicated on every device"


if __name__ == "__main__" and "--regenerate-golden" in sys.argv:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    data = {"_about": "PartitionSpec [shape] of every So400m parameter under lalign.sharding.DEFAULT_RULES, pinned "
                      "by tests/test_sharding.py::test_golden_sharding_so400m. After an intended change of the "
                      "rules, regenerate: python tests/test_sharding.py --regenerate-golden", **so400m_shardings()}
    with open(GOLDEN, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    print(f"wrote {GOLDEN}")
