"""The README's "Bring your own teacher" walk-through, command for command, on what a real user brings: a DINOv2
named by its hub id (a random tiny `Dinov2Model` saved as facebook/dinov2-* are: 518 px, a 37x37 position table,
exact GELU, ImageNet statistics in preprocessor_config.json) in a pre-filled huggingface_hub cache read offline, and
a CamVid-layout folder of PNGs. import -> MaskEmbed at 224 px -> probe teacher and aligned at 224 px -> export to HF
with no model flag -> transformers loads it strictly and gives lalign's tokens."""
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from test_hub import COMMIT, fill_hub_cache
from test_probe_real import write_camvid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUB_ID = "facebook/dinov2-small"
IMAGENET = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])

# What the test adds to the README's commands: its sizes (a few steps, a short probe) and the step it exports.
SIZES = {"lalign.main": ["--config.batch_size=4", "--config.total_steps=4", "--config.eval_every=2",
                         "--config.val_batches=1", "--config.maskembed.target_std_batches=1",
                         "--config.watch.num_images=4", "--config.watch.batch_size=4"],
         "lalign.probe": ["--config.probe.epochs=2"],
         "lalign.export": []}


def readme_commands() -> list[list[str]]:
    """The README's "Bring your own teacher" block as argument lists: line continuations joined and its shell
    variable expanded."""
    text = open(os.path.join(ROOT, "README.md")).read()
    block = text.split("## Bring your own teacher", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    variables, commands = {}, []
    for line in block.replace("\\\n", " ").splitlines():
        if "=" in line.split()[0] and not line.startswith("python"):
            name, value = line.split("=", 1)
            variables[name] = shlex.split(value)[0]
            continue
        for name, value in variables.items():
            line = line.replace(f"${name}", value)
        commands.append(shlex.split(line))
    return commands


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from interop import randomize_torch

    w = tmp_path_factory.mktemp("byo")
    torch.manual_seed(0)
    teacher = randomize_torch(torch, transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4, image_size=518, patch_size=14)))
    snapshot = fill_hub_cache(str(w / "hf_cache"), HUB_ID, {})
    teacher.save_pretrained(snapshot)
    transformers.BitImageProcessor(**IMAGENET).save_pretrained(snapshot)  # as facebook/dinov2-* ship it
    write_camvid(str(w / "camvid"), sizes=(("train", 8), ("val", 4), ("test", 4)), image=(90, 120))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(w / "hf_cache"), PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's machine has (not the suite's 8 fake ones)
    os.symlink(os.path.join(ROOT, "configs"), w / "configs")  # the README's commands run from a checkout
    logs = {}
    for args in readme_commands():
        assert args[:2] == ["python", "-m"], args
        module = args[2]
        if module == "lalign.export":  # the README exports the step its 2,000-step run ends at
            args = [a.replace("best/2000", "best/4") for a in args]
        name = {"lalign.main": "train", "lalign.export": "export"}.get(module) or os.path.basename(
            [a for a in args if a.startswith("--workdir=")][0])
        p = subprocess.run([sys.executable, *args[1:], *SIZES[module]], cwd=w, env=env, capture_output=True,
                           text=True, timeout=900)
        logs[name] = p.stdout + p.stderr
        assert p.returncode == 0, f"{' '.join(args)} failed:\n{logs[name][-3000:]}"
    assert sorted(logs) == ["export", "probe_aligned", "probe_teacher", "train"]
    return w, logs, torch, transformers


def test_the_run_records_the_hub_teacher_its_model_and_normalization(walkthrough):
    w, logs, _, _ = walkthrough
    # init_from as the run was given it
    assert json.loads((w / "runs" / "dinov2" / "config.json").read_text())["init_from"] == HUB_ID
    rec = json.loads((w / "runs" / "dinov2" / "resolved.json").read_text())
    assert rec["init_from"]["source"] == HUB_ID and rec["init_from"]["revision"] == COMMIT
    assert rec["teacher"]["act"] == rec["student"]["act"] == "gelu_exact" and rec["student"]["width"] == 32
    assert rec["data"] == {**rec["data"], "image_size": 224, "normalization": "imagenet"}
    log = logs["train"]
    assert "position table resized 37x37 -> 16x16" in log
    assert "normalization 'imagenet' from" in log and "preprocessor_config.json" in log
    assert "lr 0.0003 is for batch 1024; batch 4" in log  # the recipe's lr follows the batch
    metrics = [json.loads(line) for line in (w / "runs" / "dinov2" / "metrics.jsonl").read_text().splitlines()]
    watched = [m for m in metrics if "val_loss" in m]
    assert len(watched) == 3 and all("watch_recall" in m and "watch_teacher_recall" in m
                                     for m in watched)


def test_both_probes_run_at_224_px_with_the_teachers_normalization(walkthrough):
    w, logs, _, _ = walkthrough
    for name in ("probe_teacher", "probe_aligned"):
        res = json.loads((w / "runs" / name / "results.json").read_text())
        assert res["backbone"]["image_size"] == 224 and res["backbone"]["normalization"] == "imagenet", name
        assert 0 <= res["patch"]["macro_recall"] <= 1
    assert "position table resized 37x37 -> 16x16" in logs["probe_teacher"]


def test_the_export_loads_strictly_in_transformers_and_gives_lalign_tokens(walkthrough):
    w, _, torch, transformers = walkthrough
    from lalign.checkpoints.load import load_any
    from lalign.data.images import normalize

    model, info = transformers.Dinov2Model.from_pretrained(w / "dinov2_aligned", output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    assert model.config.hidden_act == "gelu"  # exact GELU, as the teacher: no flag needed
    student, params = load_any(str(w / "runs" / "dinov2" / "checkpoints" / "best" / "4"))
    image = np.asarray(Image.open(w / "camvid" / "test" / sorted(os.listdir(w / "camvid" / "test"))[0]).convert(
        "RGB").resize((224, 224)), np.float32)[None]
    x = normalize(image, "imagenet")
    ours = np.asarray(student.apply({"params": params}, x)[1]["encoded"])
    with torch.no_grad():
        theirs = model.eval()(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2)).last_hidden_state.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
