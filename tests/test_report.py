"""`python -m lalign.report` on a tiny pipeline run (and edited copies of it), and `python -m lalign.probe`
reproducing that run's probe results from its saved checkpoints alone."""
import json
import os
import shutil

import numpy as np
import pytest

from conftest import load_config
from lalign import pipeline, report

PNG = b"\x89PNG\r\n\x1a\n"


def _tiny_config():
    """conftest's `tiny_config` (a module-scoped run cannot use that function-scoped fixture)."""
    c = load_config()
    c.data.update(image_size=16, patch_size=4, digit_size=(6, 8), max_objects=2)
    c.model.update(width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=4)
    c.pretrain.steps = 4
    c.pretrain.batch_size = 8
    c.total_steps = 6
    c.batch_size = 8
    c.log_every = 2
    c.eval_every = 3
    c.val_batches = 1
    c.async_checkpointing = False
    c.quiet = True
    c.maskembed.target_std_batches = 1
    c.probe.update(num_train=16, num_val=8, num_test=8, epochs=1, batch_size=8, warmup_steps=1, seeds=(0,))
    return c


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("runs") / "last_s0")
    pipeline.run(_tiny_config(), workdir)
    return workdir


def _edit(src, dst, seed=None, target_layer=None, shift=0.0):
    """A copy of a run with another seed / target layer in its config and its metrics shifted by `shift`."""
    shutil.copytree(src, dst)
    cfg = json.load(open(os.path.join(dst, "config.json")))
    if seed is not None:
        cfg["seed"] = seed
    if target_layer is not None:
        cfg["maskembed"]["target_layer"] = target_layer
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    summary = json.load(open(os.path.join(dst, "summary.json")))
    summary["probe"]["aligned"]["macro_recall"] += shift
    summary["image"]["aligned"]["map"] -= shift / 2
    json.dump(summary, open(os.path.join(dst, "summary.json"), "w"))
    return dst


def _snapshot(root):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(root) for f in fs}


def test_report_tables_plots_and_pca_maps(tiny_run, tmp_path):
    runs = tmp_path / "runs"
    a = _edit(tiny_run, str(runs / "last_s1"), seed=1, shift=0.02)
    b = _edit(tiny_run, str(runs / "pen_s0"), target_layer="penultimate", shift=-0.01)
    unfinished = runs / "pen_s1"
    unfinished.mkdir()
    shutil.copy(os.path.join(tiny_run, "config.json"), unfinished / "config.json")
    before = {d: _snapshot(d) for d in (tiny_run, a, b)}
    out = tmp_path / "report"
    assert report.main(["--workdirs", tiny_run, a, b, str(unfinished), "--out", str(out), "--pca-images", "2",
                        "--pca-fit", "8"]) == 0
    assert {d: _snapshot(d) for d in before} == before  # the workdirs are only read

    data = json.loads((out / "report.json").read_text())
    assert data["group_keys"] == ["maskembed.target_layer"]  # the seed is a replicate, not a group
    groups = {g["group"]: g for g in data["groups"]}
    assert set(groups) == {"maskembed.target_layer=last", "maskembed.target_layer=penultimate"}
    last = groups["maskembed.target_layer=last"]
    summary = json.load(open(os.path.join(tiny_run, "summary.json")))
    t, al = (100 * summary["probe"][w]["macro_recall"] for w in ("teacher", "aligned"))
    assert last["n"] == 2 and last["teacher_patch"]["mean"] == pytest.approx(t)
    assert last["teacher_patch"]["std"] == pytest.approx(0.0, abs=1e-9)
    assert last["aligned_patch"]["mean"] == pytest.approx(al + 1.0)  # runs at al and al + 2 points
    assert last["aligned_patch"]["std"] == pytest.approx(np.std([al, al + 2], ddof=1))
    assert last["delta_patch"]["mean"] == pytest.approx(al + 1.0 - t)
    assert groups["maskembed.target_layer=penultimate"]["n"] == 1
    assert data["unfinished"] == [str(unfinished)]

    md = (out / "report.md").read_text()
    assert "| maskembed.target_layer=last | 2 |" in md and "pen_s1" in md and "Not finished" in md
    assert "Globalness: image labels from one background token" in md
    # The tiny run's one-epoch probes peak at their last epoch: the report says their comparison is suspect.
    assert "**Probe convergence:**" in md and "`last_s0` (teacher, aligned)" in md
    assert data["runs"][0]["probes_best_at_last_epoch"] == {"teacher": [0], "aligned": [0]}
    for name in ("patch_macro_recall.png", "image_map.png", "delta.png", "pca_last_s0.png", "pca_pen_s0.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
        assert f"({name})" in md
    assert data["figures"]["pca"] == ["pca_last_s0.png", "pca_pen_s0.png"]


def test_report_pairs_settings_on_the_seeds_they_share(tiny_run, tmp_path):
    """Two settings over the same two seeds: the report's paired table gives, per setting against the first, the
    mean per-seed difference of Δ patch and of the aligned image mAP with their intervals and p-values."""
    runs = tmp_path / "runs"
    last = [tiny_run, _edit(tiny_run, str(runs / "last_s1"), seed=1, shift=0.02)]
    pen = [_edit(tiny_run, str(runs / "pen_s0"), target_layer="penultimate", shift=-0.01),
           _edit(tiny_run, str(runs / "pen_s1"), seed=1, target_layer="penultimate", shift=0.05)]
    out = tmp_path / "report"
    assert report.main(["--workdirs", *last, *pen, "--out", str(out), "--no-pca"]) == 0
    data = json.loads((out / "report.json").read_text())
    paired = data["paired_against_first_group"]["maskembed.target_layer=penultimate"]
    diffs = [-1.0, 3.0]  # per seed, points: seed 0 -1 - 0, seed 1 +5 - 2
    assert paired["delta_patch"]["seeds"] == [0, 1] and paired["delta_patch"]["ahead"] == 1
    assert paired["delta_patch"]["mean"] == pytest.approx(np.mean(diffs))
    assert paired["delta_map"]["mean"] == pytest.approx(-np.mean(diffs) / 2)  # _edit moves mAP by -shift / 2
    md = (out / "report.md").read_text()
    assert "### Paired against `maskembed.target_layer=last`" in md
    row = next(line for line in md.splitlines()
               if line.startswith("| maskembed.target_layer=penultimate | 2 | +1.00 ["))
    assert row.count("|") == 8 and "1 of 2" in row


def test_grouping_rules():
    def run(name, **flat):
        return {"name": name, "flat": flat}

    runs = [run("a", seed=0, lr=1.0, quiet=True), run("b", seed=1, lr=1.0, quiet=False),
            run("c", seed=0, lr=2.0, **{"mesh.data": 4}), run("d", seed=0, lr=2.0, extra=3)]
    assert report.differing_keys(runs) == ["lr"]  # seed/quiet/mesh ignored; 'extra' is in one run only
    keys, groups = report.group_runs(runs)
    assert {k: [r["name"] for r in v] for k, v in groups.items()} == {"lr=1.0": ["a", "b"], "lr=2.0": ["c", "d"]}
    keys, groups = report.group_runs(runs, ["seed"])
    assert list(groups) == ["seed=0", "seed=1"]
    assert report.stats([1.0, None, 3.0]) == (2.0, pytest.approx(np.sqrt(2)), 2)
    assert report.stats([None]) == (None, None, 0)


def test_statistics_over_seeds_against_hand_computed_values():
    """The paired Δ's mean and 95% t-interval, the count ahead, and the paired test between two settings that
    share teachers (matched by seed), against scipy's t distribution and a hand computation."""
    from scipy import stats as st

    deltas = [1.2, -0.4, 0.9, 0.5]
    c = report.t_interval(deltas)
    m, sd = np.mean(deltas), np.std(deltas, ddof=1)
    half = st.t.ppf(0.975, 3) * sd / 2  # sqrt(4) = 2
    assert (c["n"], c["mean"], c["sd"]) == (4, pytest.approx(m), pytest.approx(sd))
    assert (c["low"], c["high"]) == (pytest.approx(m - half), pytest.approx(m + half))
    assert abs(half - 3.182446305 * sd / 2) < 1e-8  # t_{0.975, 3}
    assert report.t_interval([2.0])["low"] is None and report.t_interval([])["mean"] is None

    def run(seed, delta):
        return {"config": {"seed": seed}, "metrics": {"delta_patch": delta, "delta_map": -delta / 2}}

    mse = [run(s, d) for s, d in zip(range(10, 15), [0.2, -0.5, 0.4, 0.1, -0.2])]
    white = [run(s, d) for s, d in zip(range(10, 16), [0.9, 0.3, 1.0, 0.6, 0.5, 2.0])]  # seed 15: no MSE run
    pd = report.paired_delta(white)
    assert pd["ahead"] == 6 and pd["n"] == 6
    t = report.paired_test(white, mse)
    diffs = [0.7, 0.8, 0.6, 0.5, 0.7]
    ref = st.ttest_rel([0.9, 0.3, 1.0, 0.6, 0.5], [0.2, -0.5, 0.4, 0.1, -0.2])
    assert t["seeds"] == [10, 11, 12, 13, 14] and t["ahead"] == 5
    assert t["mean"] == pytest.approx(np.mean(diffs)) and t["p"] == pytest.approx(ref.pvalue)
    assert t["low"] > 0  # the interval of whitened - MSE excludes 0
    assert report.paired_test(white[:1], mse) is None  # one shared seed: no test
    groups = {"baseline": mse, "whiten": white}
    comparisons = report.paired_comparisons(groups)
    assert list(comparisons) == ["whiten"]
    assert comparisons["whiten"]["delta_patch"] == t
    image = comparisons["whiten"]["delta_map"]  # the side condition: image mAP of whitened - MSE, paired
    assert image["mean"] == pytest.approx(-np.mean(diffs) / 2) and image["p"] == pytest.approx(ref.pvalue)


def test_probe_cli_reproduces_the_pipeline_probe_from_saved_checkpoints(tiny_run, tmp_path):
    from lalign import probe

    summary = json.load(open(os.path.join(tiny_run, "summary.json")))
    cfg = load_config("configs/probe/scenes.py", tiny_run)  # the run's scenes, probe settings and seed
    for who, backbone in (("teacher", os.path.join(tiny_run, "teacher", "params")), ("aligned", tiny_run)):
        cfg.backbone = backbone  # a workdir means its aligned student (best checkpoint)
        res = probe.run(cfg, str(tmp_path / who))
        assert res["patch"]["macro_recall"] == pytest.approx(summary["probe"][who]["macro_recall"], abs=1e-6), who
        assert res["patch"]["miou"] == pytest.approx(summary["probe"][who]["miou"], abs=1e-6), who
        assert res["image"]["map"] == pytest.approx(summary["image"][who]["map"], abs=1e-4), who
    assert res["backbone"]["path"].startswith(os.path.join(tiny_run, "checkpoints", "best"))


# ------------------------------------------------------------------------------------------------ golden report
GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "report")


def _probe(recall, seeds=(0, 1), last_epoch=False):
    """A `probe/<who>` summary entry: macro recall over probe seeds, and each probe run's history."""
    per_seed = [recall + 0.01 * (s - (len(seeds) - 1) / 2) for s in range(len(seeds))]
    runs = [{"best_epoch": 3 if last_epoch else 2, "history": [{}, {}, {}]} for _ in seeds]
    return {"macro_recall": recall, "macro_recall_std": float(np.std(per_seed)), "macro_recall_per_seed": per_seed,
            "miou": recall / 2, "runs": runs}


def _fake_run(root, name, seed, layer, teacher, aligned, image=True, loss=0.25, probe_seeds=(0, 1),
              last_epoch=False):
    """A finished workdir (config.json, summary.json) with the given numbers; no model is trained."""
    os.makedirs(root / name)
    cfg = {"seed": seed, "quiet": True, "total_steps": 10, "maskembed": {"target_layer": layer, "mask": [1, 2]},
           "data": {"name": "digits"}}
    summary = {"probe": {"teacher": _probe(teacher, probe_seeds, last_epoch), "aligned": _probe(aligned, probe_seeds)}}
    if image:
        summary["image"] = {"teacher": {"map": teacher - 0.1, "background_token_map": teacher - 0.3},
                            "aligned": {"map": aligned - 0.12, "background_token_map": aligned - 0.4}}
    if loss is not None:
        summary["maskembed"] = {"best_val_loss": loss}
    (root / name / "config.json").write_text(json.dumps(cfg))
    (root / name / "summary.json").write_text(json.dumps(summary))
    return str(root / name)


def _fake_pca_figure(run, path, num_images, num_fit):
    if run["name"].startswith("pen"):
        raise FileNotFoundError(f"{run['path']}/teacher/params is missing")
    with open(path, "wb") as f:
        f.write(PNG)


@pytest.mark.parametrize("case", ["default", "by_seed"])
def test_report_text_is_the_golden_one(case, tmp_path, monkeypatch):
    """report.md and report.json of fixed runs (unfinished, colliding names, a run without image probes, a
    probe that peaked at its last epoch, a PCA map that fails) are byte for byte the files in tests/golden/report.
    To pin new output: LALIGN_WRITE_GOLDEN=1."""
    from lalign.report import render

    monkeypatch.setattr(render, "pca_figure", _fake_pca_figure)
    root = tmp_path / "runs"
    workdirs = [_fake_run(root, "last_s0", 0, "last", 0.50, 0.55, last_epoch=True),
                _fake_run(root, "last_s1", 1, "last", 0.52, 0.56, loss=None),
                _fake_run(root / "sweep", "pen_s0", 0, "penultimate", 0.50, 0.58, probe_seeds=(0,)),
                _fake_run(root / "sweep", "pen_s1", 1, "penultimate", 0.52, 0.61),
                _fake_run(root / "rerun", "pen_s1", 2, "penultimate", 0.49, 0.57, image=False),
                _fake_run(root, "first_s0", 0, "first", 0.50, 0.49, image=False),
                _fake_run(root, "first_s1", 1, "first", 0.52, 0.50, image=False, last_epoch=True)]
    os.makedirs(root / "pen_s2")
    (root / "pen_s2" / "config.json").write_text("{}")
    workdirs.append(str(root / "pen_s2"))
    out = tmp_path / "report"
    if case == "default":
        render.write_report(workdirs, str(out), pca_images=2, pca_fit=8)
    else:
        render.write_report(workdirs, str(out), group_by=["seed"], pca=False, title="by seed")
    for name in ("report.md", "report.json"):
        got = (out / name).read_text().replace(str(tmp_path), "TMP")
        path = os.path.join(GOLDEN, f"{case}_{name}")
        if os.environ.get("LALIGN_WRITE_GOLDEN"):
            os.makedirs(GOLDEN, exist_ok=True)
            with open(path, "w") as f:
                f.write(got)
        with open(path) as f:
            assert got == f.read(), name
