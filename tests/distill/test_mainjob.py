"""The main job on a tiny budget: teacher, plain and distilled arms trained side by side as subprocesses, the
comparison and the pictures, then a second call that reuses every finished run; a stopped run is resumed and a
changed one retrained."""

import json

import numpy as np
import pytest
from PIL import Image

from distill.cli import main as cli_main
from distill.data.synth import make_synth
from distill.mainjob import MainJob, run_main_job, run_state, tiny_job


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    make_synth(str(root), train=8, val=3, size=160, seed=0)
    return str(root)


def test_whole_flow_then_reuse(tmp_path, synth, capsys):
    out = tmp_path / "main"
    assert cli_main(["quickstart", "--tiny", "--out", str(out), f"data.synth={synth}", "data.val_batch_size=3"]) == 0
    printed = capsys.readouterr().out
    for row in ("| teacher (deimv2_femto) |", "| plain |", "| distilled (DSI at F5, GAM) |"):
        assert row in printed
    assert "distilled − plain:" in printed and "curves:" in printed and "pca:" in printed
    assert "one seed: a paired difference, not an effect size: `distill grid experiments/embedded/grid_5seeds.yaml`" \
        in printed
    comparison = json.loads((out / "comparison.json").read_text())
    arms = comparison["arms"]
    assert set(arms) == {"teacher", "plain", "distilled"} and not any(a["reused"] for a in arms.values())
    assert arms["distilled"]["final_weight"] is not None and arms["plain"]["final_weight"] is None
    assert len(arms["plain"]["curve"]) == len(arms["distilled"]["curve"]) == 2
    assert comparison["epochs_ahead"]["compared"] == 2
    # the teacher ran beside the plain arm: one core each, no data worker (recorded in their launch logs)
    for arm in ("teacher", "plain"):
        assert "data.num_workers=0" in (out / arm / "launch.log").read_text()
    assert "data.num_workers=0" not in (out / "distilled" / "launch.log").read_text()
    for name in ("curves.png", "pca.png"):
        pixels = np.asarray(Image.open(out / name).convert("RGB"), dtype=np.float32)
        assert pixels.std() > 5.0 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10
    assert "mean cos" in (out / "pca.md").read_text()

    # again: all three finished with equal configs (workers aside) -> nothing trained
    job = tiny_job(str(out), synth, pictures=False)
    job.overrides.append("data.val_batch_size=3")
    assert all(run_state(a) == "done" for a in job.arms().values())
    lines = []
    again = run_main_job(job, log=lines.append)
    assert all(r.reused for r in again.arms.values()) and sum("reused" in ln for ln in lines) == 3
    assert again.arms["distilled"].best_AP == arms["distilled"]["best_AP"]
    # a run stopped before its end (last.pt, no summary) is resumed, not restarted
    (out / "plain" / "summary.json").unlink()
    assert run_state(job.arms()["plain"]) == "resume"
    # a changed student config retrains both students and keeps the teacher
    job.student_overrides.append("optim.lr=0.001")
    states = {n: run_state(a) for n, a in job.arms().items()}
    assert states == {"teacher": "done", "plain": "changed", "distilled": "changed"}


def test_inprocess_and_bad_options(tmp_path, synth):
    with pytest.raises(Exception, match="parallel"):
        run_main_job(MainJob(parallel=0))
    job = tiny_job(str(tmp_path / "m"), synth, launcher="inprocess", pictures=False)
    job.overrides += ["data.val_batch_size=3", "schedule.epochs=1", "data.stop_epoch=1"]
    result = run_main_job(job)
    assert result.pictures == {} and result.epochs_ahead[2] == 1
    assert (tmp_path / "m" / "comparison.md").read_text().startswith("| arm | best AP |")
