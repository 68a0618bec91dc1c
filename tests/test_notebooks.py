"""The notebooks run headless (nbclient, kernel 'python3') against tiny artefacts made here, and are committed
with their outputs stripped. A failing cell fails the test; every picture a notebook writes is checked for size
and non-constant content.

Artefacts: random DEIM-D-FINE-N students saved as a plain run (best.pt) and a distillation run (best.pt + last.pt
with the DSI projector), a tiny DINOv3 teacher, synthetic scenes, runs' metrics.jsonl / config.yaml and a grid's
output directory. The notebooks read their paths from VIZ_* environment variables, which the kernel inherits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
import yaml
from nbclient import NotebookClient
from PIL import Image

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ("pca_features", "training_dynamics", "ablation_results")
SIZE = 128


def _checkpoints(run_dir: Path, teacher_dir: str, distill: bool, seed: int) -> None:
    import students
    from distill.config import TrainConfig, to_dict
    from distill.dsi import DistillConfig, Injectors, resolve_injections
    from distill.engine import TrainModel

    torch.manual_seed(seed)
    student = students.build_student("deim_dfine_n", num_classes=2, input_size=(SIZE, SIZE))
    cfg = to_dict(TrainConfig())
    cfg["model"]["student"], cfg["data"]["img_size"] = "deim_dfine_n", SIZE
    (run_dir / "checkpoints").mkdir(parents=True)
    base = {"version": 1, "student": "deim_dfine_n", "num_classes": 2, "class_names": ["x", "y"], "epoch": 1,
            "metrics": {}}
    if distill:
        cfg["distill"]["teachers"] = {"main": {"weights": teacher_dir}}
        injectors = Injectors(resolve_injections(DistillConfig.from_dict(cfg["distill"])), student.taps, {"main": [32]})
        torch.save({**base, "config": cfg, "model": student.state_dict(), "ema": {"module": student.state_dict()},
                    "train_model": TrainModel(student, injectors).state_dict()}, run_dir / "checkpoints" / "last.pt")
    torch.save({**base, "config": cfg, "model": student.state_dict()}, run_dir / "checkpoints" / "best.pt")


def _run(run_dir: Path, epochs: int, weight: float | None, gam: bool) -> None:
    run_dir.mkdir(parents=True)
    distill = {"teachers": {"main": {"preset": "dinov3_vits16"}}, "gam": {"enabled": gam, "rho": 0.11, "delta": 0.01}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"distill": distill if weight else {}}))
    with open(run_dir / "metrics.jsonl", "w") as f:
        for e in range(epochs):
            rec = {"epoch": e, "loss": 20.0 / (e + 1), "loss_mal": 1.0 / (e + 1), "loss_bbox_aux_0": 0.1,
                   "AP": 0.05 * e + (0.02 if weight else 0.0)}
            if weight:
                rec.update({"distill_weight": weight + (e if gam else 0), "aifi_grad_ratio": 0.09 + 0.005 * e,
                            "loss_distill": 0.2})
            f.write(json.dumps(rec) + "\n")
    (run_dir / "summary.json").write_text(json.dumps({"best_AP": 0.05 * (epochs - 1), "best_epoch": epochs - 1}))


def _grid(out: Path) -> None:
    """A finished grid (GAM off / on x two seeds) written by the grid runner: manifest.jsonl, grid.json, runs."""
    from distill.grid import load_grid, run_grid

    (out.parent / "base.yaml").write_text("seed: 0\n")
    axes = [{"key": "distill.gam.enabled", "name": "gam", "values": [False, True]}]
    spec = {"base": "base.yaml", "output_dir": out.name, "axes": axes, "seeds": [0, 1]}
    (out.parent / "grid.yaml").write_text(yaml.safe_dump(spec))

    def fake_training(config: str, overrides: list[str], output_dir: str) -> None:
        gam = "distill.gam.enabled=true" in overrides
        _run(Path(output_dir), 4 + overrides.count("seed=1"), 5.0 if gam else None, gam)

    run_grid(load_grid(out.parent / "grid.yaml"), runner=fake_training)


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    import transformers as T

    from distill.data.synth import render_scene

    root = tmp_path_factory.mktemp("nb")
    teacher = str(root / "teacher")
    T.DINOv3ViTModel(T.DINOv3ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, patch_size=16)).save_pretrained(teacher)
    (root / "val").mkdir()
    for i in range(2):
        render_scene(np.random.default_rng([0, 1, i]), SIZE)[0].save(root / "val" / f"{i:06d}.jpg")
    _checkpoints(root / "plain", teacher, False, seed=1)
    _checkpoints(root / "distilled", teacher, True, seed=2)
    _run(root / "runs" / "baseline", 4, None, False)
    _run(root / "runs" / "gam", 4, 5.0, True)
    _grid(root / "grid")
    return {
        "VIZ_PLAIN": str(root / "plain"),
        "VIZ_DISTILLED": str(root / "distilled"),
        "VIZ_IMAGES": str(root / "val"),
        "VIZ_N_IMAGES": "2",
        "VIZ_RUNS": os.pathsep.join(str(root / "runs" / n) for n in ("baseline", "gam")),
        "VIZ_GRID": str(root / "grid"),
        "VIZ_OUT": str(root / "out"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }


@pytest.mark.parametrize("name", NAMES)
def test_notebook_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("name,pictures", [
    ("pca_features", ["pca_features.png", "pca_features_foreground.png"]),
    ("training_dynamics", ["training_dynamics.png"]),
    ("ablation_results", ["ablation_results.png"]),
])
def test_notebook_executes(name, pictures, artefacts, monkeypatch):
    for key, value in artefacts.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    shown = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(shown) == len(pictures)  # every picture is displayed, once
    tables = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert tables and all(t.startswith("| ") for t in tables)
    for picture in pictures:
        with Image.open(Path(artefacts["VIZ_OUT"]) / picture) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float64)
        assert arr.shape[0] > 300 and arr.shape[1] > 600
        assert arr.std() > 10  # not a blank or single-colour picture
