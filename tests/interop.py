"""Helpers of the interoperability tests: tiny random ViTs, images, exact and approximate comparisons."""
import jax
import jax.numpy as jnp
import numpy as np

from lalign.checkpoints.common import flatten, model_fields
from lalign.models.vit import ViT

TOL = 1e-4
IMG = 32
SMALL = dict(patch_size=(8, 8), width=48, depth=2, mlp_dim=80, num_heads=3)
SIGLIP = dict(SMALL, pool_type="map")  # big_vision SigLIP: no class token, MAP head, gelu-tanh, eps 1e-6
CLIP = dict(SMALL, pool_type="tok", class_token=True, cls_posemb=True, pre_norm=True, patch_bias=False,
            act="quick_gelu", ln_eps=1e-5)


def randomize(params, seed=0):
    """Every leaf random: LayerNorm scales around 1, everything else N(0, 0.2^2)."""
    rng = np.random.default_rng(seed)

    def r(path, a):
        name = jax.tree_util.keystr(path)
        x = 0.2 * rng.standard_normal(a.shape)
        return (1.0 + x if "scale" in name else x).astype(np.float32)

    return jax.tree_util.tree_map_with_path(r, params)


def make(fields, seed=0, image=(IMG, IMG)):
    model = ViT(**fields)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image, 3)))["params"]
    return model, randomize(shapes, seed)


def images(n=2, image=(IMG, IMG), seed=1):
    return np.random.default_rng(seed).standard_normal((n, *image, 3)).astype(np.float32)


def assert_same_tree(a, b):
    fa, fb = flatten(a), flatten(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        assert x.dtype == y.dtype and x.shape == y.shape, k
        np.testing.assert_array_equal(x, y, err_msg=k)


def same_model(a: ViT, b: ViT):
    assert model_fields(a) == model_fields(b)


def is_norm_weight(torch_name: str) -> bool:
    """LayerNorm scales in HF / timm names: layer_norm1, post_layernorm, pre_layrnorm, norm1, norm_pre, ..."""
    parts = torch_name.split(".")
    return parts[-1] == "weight" and len(parts) > 1 and "norm" in parts[-2]


def maxdiff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def nchw(torch, x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def randomize_torch(torch, module, seed=0):
    """Every weight of a torch module random (norm scales around 1), so that parity tests see every tensor."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                r = 0.2 * torch.randn(v.shape, generator=gen)
                v.copy_(1 + r if is_norm_weight(name) else r)
    return module
