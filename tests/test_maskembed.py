"""MaskEmbed's pure functions: samplers, pixel masks, targets, target scale, student init, losses."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lalign import maskembed as me
from lalign.models.vit import make_vit


def mask_cfg(**kw):
    # The maskembed fields these functions read (lalign/config.py); decoder_ln_eps None: the teacher's eps.
    base = dict(sampler="uniform", keep_prob=0.5, num_blocks=1, antithetic=True, include_ones=True,
                target_layer="penultimate", loss="mse", decoder_depth=2, decoder_ln_eps=None, attn_softcap=None,
                student_dtype="")
    base.update(kw)
    return ml_collections.ConfigDict(base)


def test_uniform_sampler_kept_count_is_uniform_and_rows_are_m_complement_ones():
    n, b = 9, 20_000
    masks = np.asarray(me.uniform_masks(jax.random.key(0), b, n))
    assert masks.shape == (b, 3, n) and masks.dtype == bool
    np.testing.assert_array_equal(masks[:, 1], ~masks[:, 0])
    assert masks[:, 2].all()
    counts = np.bincount(masks[:, 0].sum(-1), minlength=n + 1)
    expected = b / (n + 1)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 30.0, (counts, chi2)  # chi-square, 9 dof: p ~ 4e-4 at 30
    # Given k, every patch is equally likely to be kept (a uniformly random subset).
    per_patch = masks[:, 0].mean(0)
    np.testing.assert_allclose(per_patch, 0.5, atol=0.02)


def test_bernoulli_keep_prob_is_the_fraction_kept():
    m = np.asarray(me.bernoulli_masks(jax.random.key(1), 5000, 16, keep_prob=0.25, antithetic=False,
                                      include_ones=True))
    assert m.shape == (5000, 2, 16)
    assert abs(m[:, 0].mean() - 0.25) < 0.01 and m[:, 1].all()


def test_block_masks_keep_rectangles_with_complement_and_ones():
    m = np.asarray(me.block_masks(jax.random.key(2), 500, (4, 5), num_blocks=1))
    assert m.shape == (500, 3, 20)
    np.testing.assert_array_equal(m[:, 1], ~m[:, 0])
    assert m[:, 2].all()  # the all-ones rows really are all ones
    for row in m[:50, 0]:
        grid = row.reshape(4, 5)
        ys, xs = np.nonzero(grid)
        assert grid[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()  # a filled rectangle
        assert grid.sum() >= 1


def test_sample_masks_dispatch_and_num_masks():
    for sampler in ("uniform", "bernoulli", "block"):
        for anti, ones in [(True, True), (False, True), (True, False), (False, False)]:
            cfg = mask_cfg(sampler=sampler, antithetic=anti, include_ones=ones)
            m = me.sample_masks(jax.random.key(0), 3, (2, 3), cfg)
            assert m.shape == (3, me.num_masks(cfg), 6)
    with pytest.raises(ValueError, match="sampler"):
        me.sample_masks(jax.random.key(0), 3, (2, 3), mask_cfg(sampler="grid"))


def test_pixel_mask_upsamples_and_zero_pads_sizes_not_multiple_of_patch():
    # 27 * 14 = 378 < 384, as SO400M/14 at 384; here 2 * 3 = 6 < 8.
    m = jnp.array([[1, 0, 0, 1]], bool)  # 2x2 grid
    px = np.asarray(me.pixel_mask(m, (2, 2), (3, 3), (8, 7)))
    assert px.shape == (1, 8, 7)
    assert px[0, :3, :3].all() and not px[0, :3, 3:6].any() and px[0, 3:6, 3:6].all()
    assert not px[0, 6:].any() and not px[0, :, 6:].any()
    with pytest.raises(ValueError, match="smaller than the patch grid"):
        me.pixel_mask(m, (2, 2), (3, 3), (5, 5))


def test_token_masks_zero_prefix_tokens():
    tm = me.token_masks(jnp.ones((2, 3, 4), bool), 1)
    assert tm.shape == (2, 3, 5)
    assert (tm[..., 0] == 0).all() and (tm[..., 1:] == 1).all()


@pytest.fixture
def teacher():
    m = make_vit(width=16, depth=3, mlp_dim=32, num_heads=2, patch_size=4, pool_type="map", num_classes=5)
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    p = m.init(jax.random.key(1), x)["params"]
    p = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), p)  # no trivial inits
    return m, p, x


def test_teacher_targets_are_final_norm_of_target_block_on_masked_images(teacher):
    model, params, x = teacher
    masks = me.uniform_masks(jax.random.key(3), 4, 16)
    t, tp = me.Teacher.create(model, params, "penultimate")
    out = t(tp, x, masks)
    assert out.shape == (4, 3, 16, 16)
    # Reference: run the full teacher on one masked copy and normalize its block-1 output with encoder_norm.
    px = me.pixel_mask(masks[1, 0], (4, 4), (4, 4), (16, 16))
    _, aux = model.apply({"params": params}, x[1:2] * px[..., None])
    norm = params["Transformer"]["encoder_norm"]
    y = aux["block01"][0]
    ref = (y - y.mean(-1, keepdims=True)) / jnp.sqrt(y.var(-1, keepdims=True) + 1e-6) * norm["scale"] + norm["bias"]
    np.testing.assert_allclose(out[1, 0], ref, atol=1e-4)
    last, lp = me.Teacher.create(model, params, "last")
    _, full = model.apply({"params": params}, x)
    np.testing.assert_allclose(last(lp, x), full["encoded"], atol=1e-5)
    with pytest.raises(ValueError, match="target_layer"):
        me.Teacher.create(model, params, "first")


def test_target_std_makes_the_mean_predictor_loss_about_one(teacher):
    model, params, x = teacher
    cfg = mask_cfg()
    t, tp = me.Teacher.create(model, params, "penultimate")
    batches = [np.asarray(jax.random.normal(jax.random.key(i), (8, 16, 16, 3))) for i in range(3)]
    std = me.estimate_target_stats(t, tp, batches, jax.random.key(0), cfg)["std"]
    targets = jnp.concatenate([t(tp, jnp.asarray(b), me.sample_masks(jax.random.fold_in(jax.random.key(0), i), 8,
                                                                      (4, 4), cfg)) for i, b in enumerate(batches)])
    targets = targets / std
    loss = me.maskembed_loss(jnp.full_like(targets, targets.mean()), targets, None, "mse")
    assert abs(float(loss) - 1.0) < 1e-3


def test_whitened_targets_have_identity_covariance_but_for_the_layernorm_null_direction(teacher):
    model, params, x = teacher
    cfg = mask_cfg()
    t, tp = me.Teacher.create(model, params, "penultimate")  # ends in a LayerNorm: one direction has no variance
    batches = [np.asarray(jax.random.normal(jax.random.key(i), (8, 16, 16, 3))) for i in range(3)]
    stats = me.estimate_target_stats(t, tp, batches, jax.random.key(0), cfg, whiten=True, eps=1e-6)
    w = stats["whitening"]
    # The same pass gives the same std as without whitening (its diagonal).
    np.testing.assert_allclose(stats["std"], me.estimate_target_stats(t, tp, batches, jax.random.key(0), cfg)["std"],
                               rtol=1e-5)
    d = model.width
    assert w["mean"].shape == (d,) and w["matrix"].shape == (d, d)
    np.testing.assert_allclose(w["matrix"], w["matrix"].T, atol=1e-5)  # ZCA: symmetric, keeps the feature basis
    targets = jnp.concatenate([t(tp, jnp.asarray(b), me.sample_masks(jax.random.fold_in(jax.random.key(0), i), 8,
                                                                      (4, 4), cfg)) for i, b in enumerate(batches)])
    white = np.asarray(me.normalize_targets(targets, w), np.float64).reshape(-1, d)
    np.testing.assert_allclose(white.mean(0), 0.0, atol=1e-3)
    eigvals = np.linalg.eigvalsh(np.cov(white.T, bias=True))
    assert eigvals[0] < 1e-2, eigvals  # the null direction stays (nearly) null instead of being blown up
    np.testing.assert_allclose(eigvals[1:], 1.0, atol=2e-3)
    # The scalar form divides by the std.
    np.testing.assert_allclose(me.normalize_targets(targets, jnp.float32(2.0)), targets / 2.0)


def test_student_is_teacher_copy_with_fresh_norm_and_zero_proj(teacher):
    model, params, x = teacher
    cfg = mask_cfg()
    mm = me.make_maskembed_model(model, cfg)
    p = me.init_from_teacher(mm, params, jax.random.key(5), x[:2], me.num_masks(cfg))
    assert set(p) == {"student", "proj", "decoder"}
    assert "MAPHead_0" not in p["student"] and "head" not in p["student"]
    np.testing.assert_array_equal(p["student"]["Transformer"]["encoderblock_1"]["LayerNorm_0"]["scale"],
                                  params["Transformer"]["encoderblock_1"]["LayerNorm_0"]["scale"])
    np.testing.assert_array_equal(p["student"]["Transformer"]["encoder_norm"]["scale"], np.ones(16))
    np.testing.assert_array_equal(p["student"]["Transformer"]["encoder_norm"]["bias"], np.zeros(16))
    assert not np.any(p["proj"]["kernel"]) and not np.any(p["proj"]["bias"])
    # Zero-init projection: the initial prediction is the decoder's response to all-zero (masked) tokens,
    # whatever the image and the mask.
    tm = me.token_masks(me.uniform_masks(jax.random.key(6), 2, 16), 0)
    pred = mm.apply({"params": p}, x[:2], tm)
    ref = mm.decoder.apply({"params": p["decoder"]}, jnp.zeros((1, 16, 16)))
    np.testing.assert_allclose(pred, jnp.broadcast_to(ref, pred.shape), atol=1e-5)


def test_init_from_teacher_rejects_mismatched_checkpoint(teacher):
    model, params, x = teacher
    mm = me.make_maskembed_model(model, mask_cfg())
    bad = jax.tree.map(lambda a: a, params)
    bad["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"] = jnp.zeros((16, 31))
    with pytest.raises(ValueError, match=r"Dense_0.*kernel.*expected \(16, 32\), got \(16, 31\)"):
        me.init_from_teacher(mm, bad, jax.random.key(0), x[:2], 3)


def test_losses_match_hand_computed_values():
    pred = jnp.array([[[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]]])  # (B=1, M=1, T=3, D=2)
    target = jnp.array([[[[0.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]]])
    tm = jnp.array([[[0.0, 1.0, 0.0]]])  # token 0 is a prefix token; token 1 kept; token 2 masked
    assert np.isclose(me.maskembed_loss(pred, target, tm, "mse"), (1 + 0 + 0 + 1 + 4 + 4) / 6)
    assert np.isclose(me.maskembed_loss(pred, target, tm, "l1"), (1 + 0 + 0 + 1 + 2 + 2) / 6)
    # cosine: token 0 has a zero target (cos 0 -> 1), token 1 cos 1 -> 0, token 2 cos -1 -> 2.
    assert np.isclose(me.maskembed_loss(pred, target, tm, "cosine"), (1 + 0 + 2) / 3)
    # prefix token excluded; masked-only sees token 2 (error 4 per dim), unmasked-only token 1 (0.5 per dim).
    assert np.isclose(me.maskembed_loss(pred, target, tm, "mse_masked", num_prefix_tokens=1), 4.0)
    assert np.isclose(me.maskembed_loss(pred, target, tm, "mse_unmasked", num_prefix_tokens=1), 0.5)
    with pytest.raises(ValueError, match="loss"):
        me.maskembed_loss(pred, target, tm, "huber")


def test_default_weight_decay_falls_on_every_parameter_as_the_reference_does():
    """The reference hands timm's optimizer factory an iterator of parameters, so AdamW decays every one: the
    default mask selects every leaf of the MaskEmbed state's params (student, projection, decoder)."""
    from conftest import load_config
    from lalign.models.vit import vit_from_config
    from lalign.optim import make_optimizer, weight_decay_mask

    for c in (load_config(arg="tiny"), load_config("configs/siglip_b16.py", "smoke")):
        assert c.optimizer.weight_decay_on == "all"
        teacher = vit_from_config(c, num_classes=3)
        size = c.data.image_size
        tparams = teacher.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]
        model = me.make_maskembed_model(teacher, c.maskembed)
        params = me.init_from_teacher(model, tparams, jax.random.key(1), jnp.zeros((2, size, size, 3)), 3)
        mask = weight_decay_mask(params, c.optimizer.weight_decay_on)
        leaves = jax.tree.leaves(mask)
        assert len(leaves) == len(jax.tree.leaves(params)) > 20 and all(leaves)
        # and the optimizer built from the config applies it: one update with wd differs by -lr*wd*p everywhere
        grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
        updates = {}
        for wd in (0.0, 0.1):
            cfg = ml_collections.ConfigDict(dict(c.optimizer.to_dict(), lr=1e-2, wd=wd, grad_clip=0.0,
                                                 lr_min_ratio=1.0))
            tx, _ = make_optimizer(cfg, 10)
            updates[wd] = tx.update(grads, tx.init(params), params)[0]
        for d0, d1, p in zip(jax.tree.leaves(updates[0.0]), jax.tree.leaves(updates[0.1]), jax.tree.leaves(params)):
            np.testing.assert_allclose(d1 - d0, -1e-2 * 0.1 * p, rtol=1e-4, atol=1e-8)
    with pytest.raises(ValueError, match="'reference' is now called 'timm_groups'"):
        weight_decay_mask(params, "reference")


def test_timm_groups_weight_decay_skips_biases_norms_and_layerscale():
    """Option "timm_groups" (what timm's factory builds when handed a module): decay iff the leaf is a kernel,
    pos_embedding or cls; every bias (q/k/v biases are 2-D in Flax), LayerNorm scale and LayerScale is left
    alone."""
    from conftest import load_config
    from lalign.models.vit import vit_from_config
    from lalign.sharding import path_str
    from lalign.optim import make_optimizer, weight_decay_mask

    c = load_config(arg="tiny")
    c.model.update(class_token=True)  # a CLIP-style student: a cls to decay too
    teacher = vit_from_config(c, num_classes=3)
    tparams = teacher.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    model = me.make_maskembed_model(teacher, c.maskembed)
    params = me.init_from_teacher(model, tparams, jax.random.key(1), jnp.zeros((2, 16, 16, 3)), 3)
    mask = {path_str(p): m for p, m in jax.tree_util.tree_leaves_with_path(weight_decay_mask(params, "timm_groups"))}
    block = "Transformer/encoderblock_0"
    decayed = {"student/cls", "student/embedding/kernel", "student/pos_embedding", "proj/kernel",
               "decoder/pos_embedding", "decoder/head/kernel",
               *(f"student/{block}/{m}" for m in ("MultiHeadDotProductAttention_0/query/kernel",
                                                  "MultiHeadDotProductAttention_0/key/kernel",
                                                  "MultiHeadDotProductAttention_0/value/kernel",
                                                  "MultiHeadDotProductAttention_0/out/kernel",
                                                  "MlpBlock_0/Dense_0/kernel", "MlpBlock_0/Dense_1/kernel"))}
    not_decayed = {"student/embedding/bias", "student/Transformer/encoder_norm/scale",
                   "student/Transformer/encoder_norm/bias", "proj/bias", "decoder/head/bias",
                   "decoder/encoderblock_0/LayerScale_0", "decoder/encoderblock_0/LayerScale_1",
                   *(f"student/{block}/{m}" for m in ("LayerNorm_0/scale", "LayerNorm_0/bias", "LayerNorm_1/scale",
                                                      "LayerNorm_1/bias", "MultiHeadDotProductAttention_0/query/bias",
                                                      "MultiHeadDotProductAttention_0/key/bias",
                                                      "MultiHeadDotProductAttention_0/value/bias",
                                                      "MultiHeadDotProductAttention_0/out/bias",
                                                      "MlpBlock_0/Dense_0/bias", "MlpBlock_0/Dense_1/bias"))}
    assert decayed <= {k for k, v in mask.items() if v} and not_decayed <= {k for k, v in mask.items() if not v}
    assert all(mask[k] == (k.rsplit("/", 1)[-1] in ("kernel", "pos_embedding", "cls")) for k in mask)

    # One AdamW update with and without weight decay: they differ by exactly -lr * wd * p on the decayed set and
    # not at all elsewhere.
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
    updates = {}
    for wd in (0.0, 0.1):
        cfg = dict(lr=1e-2, wd=wd, b1=0.9, b2=0.95, grad_clip=0.0, warmup_steps=0, lr_min_ratio=1.0,
                   weight_decay_on="timm_groups")
        tx, _ = make_optimizer(ml_collections.ConfigDict(cfg), 10)
        updates[wd] = tx.update(grads, tx.init(params), params)[0]
    for path, p in jax.tree_util.tree_leaves_with_path(params):
        name = path_str(path)
        diff = _leaf(updates[0.1], path) - _leaf(updates[0.0], path)
        expected = -1e-2 * 0.1 * p if mask[name] else jnp.zeros_like(p)
        np.testing.assert_allclose(diff, expected, rtol=1e-4, atol=1e-8, err_msg=name)  # rounding of two updates
    with pytest.raises(ValueError, match="optimizer.weight_decay_on 'biases'"):
        weight_decay_mask(params, "biases")


def _leaf(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def test_a_dinov2_teacher_with_registers_trains_with_every_prefix_token_masked():
    """Class token + 4 registers: the decoder sees all five prefix tokens zeroed (the reference's
    num_prefix_tokens), targets and predictions cover 1 + 4 + N tokens, and the loss has a finite gradient."""
    m = make_vit(width=16, depth=3, mlp_dim=64, num_heads=2, patch_size=4, pool_type="tok", class_token=True,
                 cls_posemb=True, num_registers=4, layerscale_init=1e-5, act="gelu_exact")
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    params = m.init(jax.random.key(1), x)["params"]
    cfg = mask_cfg()
    mm = me.make_maskembed_model(m, cfg)
    assert mm.student.num_prefix_tokens == 5
    p = me.init_from_teacher(mm, params, jax.random.key(5), x, me.num_masks(cfg))
    assert p["student"]["registers"].shape == (1, 4, 16)
    np.testing.assert_array_equal(p["student"]["registers"], params["registers"])
    teacher, tp = me.Teacher.create(m, params, cfg.target_layer)
    masks = me.uniform_masks(jax.random.key(3), 2, 16)
    tm = me.token_masks(masks, mm.student.num_prefix_tokens)
    assert tm.shape == (2, 3, 5 + 16) and not np.any(tm[..., :5])
    assert teacher(tp, x, masks).shape == (2, 3, 21, 16)
    loss_fn = me.make_masked_loss_fn(mm, teacher, cfg)
    # (the zero-initialized projection stops every student gradient at step 0; a trained one lets them through)
    p["proj"]["kernel"] = 0.1 * jax.random.normal(jax.random.key(7), p["proj"]["kernel"].shape)
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, tp, x, masks, jax.random.key(4), 1.0)
    assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert np.any(grads["student"]["registers"]) and np.any(grads["student"]["Transformer"]["encoderblock_0"][
        "LayerScale_0"])


def test_decoder_layernorm_eps_is_the_references_unless_set():
    """The reference builds its decoder norms from type(encoder.norm): torch's default eps 1e-5 whatever the
    teacher's; maskembed.decoder_ln_eps=None gives the teacher's."""
    from conftest import load_config
    from lalign.models.vit import vit_from_config

    c = load_config("configs/siglip_b16.py", "smoke")
    teacher = vit_from_config(c, num_classes=None)
    assert teacher.ln_eps == 1e-6 and c.maskembed.decoder_ln_eps == 1e-5
    assert me.make_maskembed_model(teacher, c.maskembed).decoder.ln_eps == 1e-5
    c.maskembed.decoder_ln_eps = None
    assert me.make_maskembed_model(teacher, c.maskembed).decoder.ln_eps == 1e-6
