"""`distill data show` and `distill bench data` on a tiny synthetic dataset."""

from PIL import Image

from distill.cli import main as cli
from distill.data.synth import make_synth


def test_show_and_bench(tmp_path, capsys):
    make_synth(str(tmp_path / "d"), train=6, val=1, size=64, seed=0)
    out = tmp_path / "grid.png"
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(f"data:\n  synth: {tmp_path / 'd'}\n  img_size: 64\n  policy_epochs: [1, 2, 3]\n"
                   "  mosaic: {prob: 1.0, output_size: 32}\n")
    assert cli(["data", "show", str(cfg), "--epoch", "1", "--out", str(out), "-n", "6"]) == 0
    assert "stage 'mosaic'" in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.size == (4 * 64, 2 * 64 + 16)  # 6 tiles of 64 px, 4 per row, a caption strip
    assert cli(["data", "show", "--data", str(tmp_path / "d"), "--img-size", "64", "--out", str(out), "-n", "2"]) == 0
    with Image.open(out) as im:
        assert im.size == (2 * 64, 64 + 16)
    assert cli(["bench", "data", str(cfg), "-n", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[0] in
            ("warmup", "mosaic", "plain", "noaug")}
    assert list(rows) == ["warmup", "mosaic", "plain", "noaug"]
    assert [int(r[1]) for r in rows.values()] == [0, 1, 2, 3]  # one epoch inside each stage
    assert all(float(r[2]) > 0 for r in rows.values())  # images/s
