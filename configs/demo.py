"""The embedded demo: locality alignment end to end on synthetic digit scenes, on CPU, no download.

    python -m lalign.main --config=configs/demo.py --workdir=/tmp/demo          # full demo (see README)
    python -m lalign.main --config=configs/demo.py:smoke --workdir=/tmp/smoke   # < 2 minutes
    configs/demo.py:tiny                                                          # seconds: the tests' size

Stages: pre-train a small ViT teacher (MAP head) on image-level labels; MaskEmbed; patch probe and image probe on
held-out scenes for the teacher and the aligned student. Result: `DIR/summary.json` and a printed table.
"""
from lalign import config


def get_config(arg: str = "full"):
    arg = arg or "full"
    if arg not in ("full", "smoke", "tiny"):
        raise ValueError(f"configs/demo.py takes 'full', 'smoke' or 'tiny', got {arg!r}.")
    # lalign's defaults (lalign/config.py: the reference's recipe, and the demo teacher's pre-training recipe in
    # `pretrain`); what follows is what the demo changes. `python -m lalign.config configs/demo.py` lists all.
    c = config.defaults(stages=("pretrain", "maskembed", "probe"))
    # init_from: the teacher when "pretrain" is not a stage (orbax, big_vision npz, HF dir, timm; "random")

    c.data = dict(name="scenes", image_size=48, patch_size=8, min_objects=1, max_objects=4, digit_size=(12, 20),
                  num_colours=1, min_patch_pixels=4, max_overlap=0.2)
    # Teacher architecture (the student copies it): a small big_vision ViT with a MAP head, like SigLIP.
    c.model = dict(variant=None, width=64, depth=4, mlp_dim=256, num_heads=4, patch_size=8, pool_type="map",
                   posemb="learn", attention_impl="xla")  # "fused": jax.nn.dot_product_attention
    # pretrain: 4,000 steps at lr 3e-3: at 1,500 steps lr 3e-3 reached BCE 0.39 vs 0.42 for 1e-3 (docs/results.md).

    # Deviation from the paper's default ('penultimate'): with a 4-block teacher, skipping a block removes a
    # quarter of the network; the last block measured better here (docs/results.md, "Target layer").
    c.maskembed.target_layer = "last"
    c.maskembed.teacher_dtype = ""  # float32 on CPU; e.g. 'bfloat16' on accelerators
    c.maskembed.student_dtype = ""
    c.total_steps = 2000
    c.batch_size = 32
    # lr 3e-4 is the demo's at its batch 32; another batch scales it (lr_scale_rule sqrt | linear | none).
    c.optimizer.update(lr=3e-4, lr_base_batch=32)
    # The locality meter at each validation (lalign/watch.py): a ridge patch probe of the student and the teacher
    # on 256 scenes of probe_val (fitted on half, read on the rest) beside val_loss; a warning when the student's
    # macro recall falls more than `margin` below its teacher's.
    c.watch.source = "scenes"
    c.log_every = 100
    c.eval_every = 500
    c.checkpoint_every = 0
    c.val_batches = 4

    # The paper's probe, scaled down. Deviation: lr 3e-3 (not 1e-3) and 30 epochs of 4,000 scenes (~3,750 steps,
    # the paper's probe takes ~18,000): with 1e-3 and 10 epochs the probe had not left its "predict nothing"
    # phase and the best epoch was the degenerate first one (docs/results.md, "Probe convergence"). Epochs are
    # chosen by validation recall, the paper's rule, as every documented demo result was (the probe configs choose
    # by mIoU, which a probe predicting every class cannot win: lalign/probe/metrics.py, SELECT_BY).
    c.probe.update(epochs=30, lr=3e-3, warmup_steps=100, wd=1e-4, seeds=(0, 1, 2), select_by="recall")

    if arg in ("smoke", "tiny"):  # every stage, briefly: under two minutes on 2 slow cores
        c.pretrain.steps = 150
        c.total_steps = 100
        c.eval_every = 50
        c.log_every = 25
        c.val_batches = 2
        c.probe.update(num_train=400, num_val=100, num_test=200, epochs=3, seeds=(0,))
    if arg == "tiny":  # 16px scenes, 4px patches, a 2-block width-16 ViT: every stage in seconds
        c.data.update(image_size=16, patch_size=4, digit_size=(6, 8), max_objects=2)
        c.model.update(width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=4)
        c.pretrain.update(steps=4, batch_size=8)
        c.update(total_steps=6, batch_size=8, log_every=2, eval_every=3, val_batches=1, async_checkpointing=False,
                 quiet=True)
        c.maskembed.target_std_batches = 1
        c.optimizer.lr_base_batch = 8  # the tests' model trains at lr 3e-4 at its batch 8 (what they were set for)
        c.watch.update(num_images=16, batch_size=8)
        c.probe.update(num_train=16, num_val=8, num_test=8, epochs=1, batch_size=8, warmup_steps=1)
    return c
