"""``distill bench infer`` on the smallest scale: both runtimes measured, as JSON and as a table."""

import json

from distill.cli import main as cli


def test_bench_infer_json_and_table(capsys):
    argv = ["bench", "infer", "--scales", "deimv2_atto", "--repeats", "2", "--warmup", "1", "--device", "cpu", "--json"]
    assert cli(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["runtime"], r["device"]) for r in rows] == [
        ("deimv2_atto", "pytorch", "cpu"), ("deimv2_atto", "onnxruntime", "cpu")]
    assert all(r["median_ms"] > 0 and r["p90_ms"] >= r["median_ms"] and r["images_per_s"] > 0 for r in rows)
    assert cli(["bench", "infer", "--scales", "deimv2_atto", "--repeats", "1", "--warmup", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["scale", "input", "device", "runtime"]
    assert lines[2].split()[:4] == ["deimv2_atto", "320x320", "cpu", "pytorch"]


def test_bench_infer_rejects_an_unknown_scale_in_one_line(capsys):
    assert cli(["bench", "infer", "--scales", "deimv2_giant"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distill bench infer: error: unknown scale(s) ['deimv2_giant']") and err.count("\n") == 1
