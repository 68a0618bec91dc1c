"""``distill bench data --step-rate``: the workers a training step needs."""

import pytest

from distill.bench.data import MARGIN, workers_needed
from distill.cli import main as cli
from distill.data.synth import make_synth


def test_workers_needed_keeps_the_margin():
    assert MARGIN == 1.5
    assert workers_needed(30.0, 20.0) == 1  # 30 >= 1.5 * 20
    assert workers_needed(29.9, 20.0) == 2
    assert workers_needed(10.0, 100.0) == 15
    assert workers_needed(1000.0, 0.5) == 1
    with pytest.raises(ValueError):
        workers_needed(0.0, 1.0)


def test_cli_prints_the_workers_per_stage(tmp_path, capsys):
    make_synth(str(tmp_path / "d"), train=6, val=1, size=64, seed=0)
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(f"data:\n  synth: {tmp_path / 'd'}\n  img_size: 64\n  policy_epochs: [1, 2, 3]\n"
                   "  mosaic: {prob: 1.0, output_size: 32}\n")
    assert cli(["bench", "data", str(cfg), "-n", "4", "--step-rate", "1000"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line.split() for line in lines if line.startswith("stage"))
    assert header[:4] == ["stage", "epoch", "img/s", "workers"]
    rows = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[0] in
            ("warmup", "mosaic", "plain", "noaug")}
    for r in rows.values():  # the table rounds the rate to 0.1 img/s; the count comes from the exact rate
        rate = float(r[2])
        assert workers_needed(rate + 0.05, 1000.0) <= int(r[3]) <= workers_needed(max(rate - 0.05, 1e-3), 1000.0)
    summary = lines[-1]
    assert summary.startswith("workers needed per training process to stay 1.5x ahead of a 1000 img/s step: ")
    assert int(summary.split(": ")[1].split()[0]) == max(int(r[3]) for r in rows.values())
    assert cli(["bench", "data", str(cfg), "-n", "2", "--step-rate", "0"]) == 2
