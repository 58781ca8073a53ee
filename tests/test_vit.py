"""The ViT: big_vision parameter names and shapes for every variant, options, clear errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lalign.models.token_heads import MaskEmbedDecoder, PatchProbe
from lalign.models.vit import VARIANTS, ViT, decode_variant, make_vit, posemb_sincos_2d, truncate_params


def _shapes(model, image_size, batch=1):
    x = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
    return jax.tree.map(lambda a: a.shape, jax.eval_shape(model.init, jax.random.key(0), x)["params"])


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_has_big_vision_names_and_shapes(name):
    width, depth, mlp, heads = VARIANTS[name]
    model = make_vit(f"{name}/16", pool_type="map", num_classes=7)
    p = _shapes(model, 32)
    assert set(p) == {"embedding", "pos_embedding", "Transformer", "MAPHead_0", "head"}
    assert p["embedding"] == {"kernel": (16, 16, 3, width), "bias": (width,)}
    assert p["pos_embedding"] == (1, 4, width)
    blocks = [k for k in p["Transformer"] if k.startswith("encoderblock_")]
    assert len(blocks) == depth and "encoder_norm" in p["Transformer"]
    blk = p["Transformer"]["encoderblock_0"]
    assert set(blk) == {"LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"}
    attn = blk["MultiHeadDotProductAttention_0"]
    assert attn["query"]["kernel"] == (width, heads, width // heads)
    assert attn["out"]["kernel"] == (heads, width // heads, width)
    assert blk["MlpBlock_0"]["Dense_0"]["kernel"] == (width, mlp)
    assert p["MAPHead_0"]["probe"] == (1, 1, width)
    assert p["head"]["kernel"] == (width, 7)


def test_so400m_patch14_at_384_has_27x27_patches():
    model = make_vit("So400m/14", pool_type="map")
    assert _shapes(model, 384)["pos_embedding"] == (1, 729, 1152)


def test_scanned_layout_stacks_blocks_on_a_leading_axis():
    p = _shapes(make_vit("Ti/16", scan=True, depth=3), 32)
    assert set(p["Transformer"]) == {"encoderblock", "encoder_norm"}
    assert p["Transformer"]["encoderblock"]["LayerNorm_0"]["scale"] == (3, 192)


def test_scan_and_loop_compute_the_same_function():
    kw = dict(width=16, depth=3, mlp_dim=24, num_heads=2, patch_size=4, pool_type="tok")
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    loop, scan = make_vit(**kw), make_vit(**kw, scan=True, remat_policy="nothing_saveable")
    p = loop.init(jax.random.key(0), x)["params"]
    blocks = [p["Transformer"][f"encoderblock_{i}"] for i in range(3)]
    ps = dict(p, Transformer={"encoder_norm": p["Transformer"]["encoder_norm"],
                              "encoderblock": jax.tree.map(lambda *a: jnp.stack(a), *blocks)})
    a, aux_a = loop.apply({"params": p}, x)
    b, aux_b = scan.apply({"params": ps}, x)
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(aux_a["block01"], aux_b["block01"], atol=1e-5)


def test_pool_types_class_token_and_outputs():
    x = jnp.ones((2, 16, 16, 3))
    for pool, shape in [("map", (2, 16)), ("gap", (2, 16)), ("tok", (2, 16)), ("none", (2, 17, 16))]:
        m = make_vit(width=16, depth=2, num_heads=2, patch_size=4, pool_type=pool, class_token=pool != "map" or None)
        out, aux = m.apply(m.init(jax.random.key(0), x), x)
        assert out.shape == shape, pool
        assert aux["encoded"].shape[1] == 16 + m.num_prefix_tokens
        assert {"block00", "block01", "pre_ln", "stem"} <= set(aux)


def test_clip_extras():
    m = make_vit(width=16, depth=1, num_heads=2, patch_size=4, pool_type="tok", pre_norm=True, cls_posemb=True,
                 patch_bias=False, act="quick_gelu", ln_eps=1e-5)
    p = _shapes(m, 16)
    assert p["pos_embedding"] == (1, 17, 16) and p["cls"] == (1, 1, 16) and "pre_norm" in p
    assert "bias" not in p["embedding"]


def test_sincos_posemb_has_no_param_and_matches_formula():
    m = make_vit(width=16, depth=1, num_heads=2, patch_size=4, posemb="sincos2d")
    assert "pos_embedding" not in _shapes(m, 16)
    pe = np.asarray(posemb_sincos_2d(2, 3, 8))[0]
    # row index = y * w + x; first quarter is sin(x * omega_0) with omega_0 = 1.
    np.testing.assert_allclose(pe[4, 0], np.sin(1.0), rtol=1e-6)  # y=1, x=1
    np.testing.assert_allclose(pe[4, 6], np.cos(1.0), rtol=1e-6)  # cos(y * omega_0), y=1
    np.testing.assert_allclose(pe[4, 7], np.cos(1.0 / 10_000), rtol=1e-6)  # cos(y * omega_1)


def test_attention_softcap_bounds_logits_and_changes_output():
    kw = dict(width=16, depth=1, num_heads=2, patch_size=4)
    x = 50 * jax.random.normal(jax.random.key(0), (1, 16, 16, 3))
    plain, capped = make_vit(**kw), make_vit(**kw, attn_softcap=0.1)
    p = plain.init(jax.random.key(0), x)
    assert not np.allclose(plain.apply(p, x)[0], capped.apply(p, x)[0])


@pytest.mark.parametrize("pool_type", ("map", "tok"))
def test_fused_attention_computes_the_same_outputs_and_gradients(pool_type):
    kw = dict(width=16, depth=2, mlp_dim=24, num_heads=2, patch_size=4, pool_type=pool_type, num_classes=3)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    xla, fused = make_vit(**kw), make_vit(**kw, attention_impl="fused")
    p = xla.init(jax.random.key(0), x)["params"]
    assert jax.tree.map(jnp.shape, fused.init(jax.random.key(0), x)["params"]) == jax.tree.map(jnp.shape, p)
    np.testing.assert_allclose(xla.apply({"params": p}, x)[0], fused.apply({"params": p}, x)[0], atol=1e-5)
    grads = [jax.grad(lambda q, m=m: jnp.sum(m.apply({"params": q}, x)[0] ** 2))(p) for m in (xla, fused)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), *grads)
    dec = [MaskEmbedDecoder(out_dim=8, num_heads=2, attention_impl=impl) for impl in ("xla", "fused")]
    tokens = jax.random.normal(jax.random.key(2), (2, 3, 5, 16))  # extra leading axis: (batch, masks, T, D)
    dp = dec[0].init(jax.random.key(0), tokens[:, 0])
    np.testing.assert_allclose(jax.vmap(lambda t: dec[0].apply(dp, t), 1, 1)(tokens),
                               jax.vmap(lambda t: dec[1].apply(dp, t), 1, 1)(tokens), atol=1e-5)
    with pytest.raises(ValueError, match="attention_impl='fused' has no logit soft-cap"):
        make_vit(**kw, attention_impl="fused", attn_softcap=30.0).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="Unknown attention_impl 'flash'"):
        make_vit(**kw, attention_impl="flash").init(jax.random.key(0), x)


def test_truncate_params_both_layouts_compute_the_target_block():
    kw = dict(width=16, depth=3, mlp_dim=24, num_heads=2, patch_size=4, pool_type="map", num_classes=3)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    m = make_vit(**kw)
    p = m.init(jax.random.key(0), x)["params"]
    short = m.clone(depth=2, pool_type="none", num_classes=None)
    tp = truncate_params(p, 2)
    assert "MAPHead_0" not in tp and "encoderblock_2" not in tp["Transformer"]
    _, full = m.apply({"params": p}, x)
    _, aux = short.apply({"params": tp}, x)
    ln = lambda y: (y - y.mean(-1, keepdims=True)) / jnp.sqrt(y.var(-1, keepdims=True) + 1e-6)
    norm = p["Transformer"]["encoder_norm"]
    np.testing.assert_allclose(aux["encoded"], ln(full["block01"]) * norm["scale"] + norm["bias"], atol=1e-5)


def test_unknown_variant_and_fields_raise_clear_errors():
    with pytest.raises(ValueError, match="Unknown ViT variant 'Q/16'"):
        decode_variant("Q/16")
    with pytest.raises(ValueError, match="Unknown ViT field"):
        make_vit("B/16", widht=3)
    with pytest.raises(ValueError, match="pool_type"):
        ViT(pool_type="avg", width=16, depth=1, num_heads=2, patch_size=(4, 4)).init(
            jax.random.key(0), jnp.ones((1, 8, 8, 3)))
    with pytest.raises(ValueError, match=r"\(batch, height, width, 3\)"):
        make_vit("mu/4").init(jax.random.key(0), jnp.ones((1, 8, 8)))


def test_decoder_and_probe_layerscale_init_and_posemb():
    x = jnp.ones((2, 5, 16))
    dec = MaskEmbedDecoder(out_dim=24, num_heads=2)
    p = dec.init(jax.random.key(0), x)["params"]
    assert [k for k in p if k.startswith("encoderblock_")] == ["encoderblock_0", "encoderblock_1"]
    for blk in ("encoderblock_0", "encoderblock_1"):
        for ls in ("LayerScale_0", "LayerScale_1"):
            np.testing.assert_array_equal(p[blk][ls], np.full(16, 1e-6, np.float32))
        assert p[blk]["MlpBlock_0"]["Dense_0"]["kernel"].shape == (16, 64)  # MLP ratio 4
    assert p["pos_embedding"].shape == (1, 5, 16)
    assert 0.01 < float(jnp.std(p["pos_embedding"])) < 0.03  # normal, std 0.02
    assert dec.apply({"params": p}, x).shape == (2, 5, 24)
    probe = PatchProbe(num_classes=7, num_heads=2)
    pp = probe.init(jax.random.key(0), x)["params"]
    assert "pos_embedding" not in pp
    np.testing.assert_allclose(pp["encoderblock_0"]["LayerScale_0"], 0.01)
