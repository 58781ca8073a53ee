"""config.init_from: a teacher from a big_vision npz or a Hugging Face directory aligns exactly like the same
teacher held in memory."""
import jax
import numpy as np
import pytest

from lalign import teacher as teacher_lib
from lalign.checkpoints import bigvision, hf
from lalign.pretrain import pretrain_teacher
from lalign.train import train_maskembed


@pytest.mark.parametrize("fmt", ["bigvision", "hf"])
def test_maskembed_from_a_converted_teacher_equals_in_memory_teacher(tiny_config, tmp_path, fmt):
    model, params = pretrain_teacher(tiny_config, str(tmp_path / "demo"))
    expected = train_maskembed(tiny_config, str(tmp_path / "direct"), model, params)["last_params"]

    if fmt == "bigvision":
        path = str(tmp_path / "teacher.npz")
        bigvision.save_npz(path, params)
    else:
        path = str(tmp_path / "teacher_hf")
        hf.to_hf(params, model, path, kind="siglip")
    tiny_config.stages = ("maskembed",)
    tiny_config.init_from = path
    teacher, loaded = teacher_lib.get_teacher(tiny_config, str(tmp_path / "from_file"))
    assert (teacher.width, teacher.depth, teacher.pool_type) == (model.width, model.depth, "map")
    got = train_maskembed(tiny_config, str(tmp_path / "from_file"), teacher, loaded)["last_params"]
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_missing_init_from_is_a_clear_error(tiny_config, tmp_path):
    tiny_config.stages = ("maskembed",)
    with pytest.raises(ValueError, match="config.init_from must name the teacher"):
        teacher_lib.get_teacher(tiny_config, str(tmp_path))
    tiny_config.init_from = str(tmp_path / "nope.npz")
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        teacher_lib.get_teacher(tiny_config, str(tmp_path))


@pytest.mark.parametrize("how", ["bicubic_antialias", "bicubic", "none"])
def test_a_teacher_of_another_grid_is_resized_to_the_run(tiny_config, tmp_path, capsys, how):
    """A DINOv2-style teacher saved at 32 px (8x8 patches) for a 16 px run (4x4): its table is resized as timm's
    checkpoint filter does (or as HF does at run time); 'none' keeps the table and the run refuses it."""
    from lalign.checkpoints import timm as ltimm
    from lalign.checkpoints.common import resample_posemb
    from lalign.models.vit import ViT
    from lalign.train import check_image_size

    model = ViT(patch_size=(4, 4), width=16, depth=2, mlp_dim=32, num_heads=2, pool_type="tok", class_token=True,
                cls_posemb=True, num_registers=2, layerscale_init=1e-5, act="gelu_exact")
    params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 32, 32, 3)))["params"]
    ltimm.to_timm(params, model, str(tmp_path / "t.safetensors"))
    tiny_config.stages = ("maskembed",)
    tiny_config.init_from = str(tmp_path / "t.safetensors")
    tiny_config.init_posemb_resize = how
    teacher, loaded = teacher_lib.get_teacher(tiny_config, str(tmp_path / "wd"))
    assert teacher.num_registers == 2
    if how == "none":
        assert loaded["pos_embedding"].shape == (1, 65, 16)
        with pytest.raises(ValueError, match="pos_embedding has 65 rows"):
            check_image_size(teacher, loaded, 16, "teacher")
        return
    assert "position table resized 8x8 -> 4x4 patches for 16 px images" in capsys.readouterr().err
    expected = resample_posemb(params, model, (4, 4), antialias=how == "bicubic_antialias")["pos_embedding"]
    np.testing.assert_allclose(loaded["pos_embedding"], expected, atol=1e-6)
    check_image_size(teacher, loaded, 16, "teacher")
