"""The ``distill`` dispatcher: its table of commands, lazy imports, and how errors reach the user (one line for
bad input, the full traceback for a bug of ours)."""

import argparse
import importlib
import os
import subprocess
import sys
import types

import pytest

import distill.cli as cli
from distill.errors import MissingPathError, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
# the command words of the command line before it became a package: they must all still work
WORDS = {"zoo", "train", "eval", "predict", "export", "grid", "collect", "calibrate", "data check", "data synth",
         "data show", "teacher show", "viz pca", "viz curves", "bench data", "bench step", "bench teacher",
         "bench infer"}  # fmt: skip


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})  # fmt: skip


def test_every_command_follows_the_module_convention():
    assert WORDS <= set(cli.COMMANDS)
    for key, (module_name, name, help_text) in cli.COMMANDS.items():
        # one module per command group, the function named by the last word
        assert (module_name, name) == (f"distill.cli.{key.split()[0]}", key.split()[-1]) and help_text, key
        module = importlib.import_module(module_name)
        assert callable(getattr(module, name)) and callable(getattr(module, f"{name}_arguments")), key
        parser, run = cli.parser_for(key)
        assert parser.prog == f"distill {key}" and run is getattr(module, name)


def test_help_imports_no_command_and_no_torch():
    code = ("import sys\nfrom distill.cli import main\nassert main(['--help']) == 0\n"
            "heavy = [m for m in sys.modules if m == 'torch' or m.startswith('distill.cli.')]\n"
            "assert not heavy, heavy\n")  # fmt: skip
    result = _run("-c", code)
    assert result.returncode == 0, result.stderr
    assert "distill bench infer" in result.stdout


def test_python_dash_m_runs_the_dispatcher():
    result = _run("-m", "distill.cli", "data", "synth", "--help")
    assert result.returncode == 0 and "usage: distill data synth" in result.stdout


def test_unknown_command_hints_at_the_group(capsys):
    assert cli.main(["bench", "nothing"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'bench nothing'" in err and "bench step" in err


@pytest.fixture
def fake_command(monkeypatch):
    """A command ``distill fake`` whose function raises the exception ``args.error`` names."""
    module = types.ModuleType("fake_command_module")
    errors = {"user": UserError("config.yaml: data.img_size must be a multiple of 32"),
              "missing": MissingPathError("runs/x/best.pt: no such file"),
              "bug": KeyError("model"), "oserror": OSError("disk on fire"), "valueerror": ValueError("bad math")}

    def fake_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("error", choices=sorted(errors))

    def fake(args: argparse.Namespace) -> int:
        raise errors[args.error]

    module.fake_arguments, module.fake = fake_arguments, fake
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.COMMANDS, "fake", (module.__name__, "fake", "raises"))
    monkeypatch.delenv("DISTILL_DEBUG", raising=False)
    return errors


@pytest.mark.parametrize("kind", ["user", "missing"])
def test_user_errors_are_one_line(fake_command, kind, capsys):
    assert cli.main(["fake", kind]) == 2
    err = capsys.readouterr().err
    assert err == f"distill fake: error: {fake_command[kind]}\n"


@pytest.mark.parametrize("kind", ["bug", "oserror", "valueerror"])
def test_anything_else_keeps_its_traceback(fake_command, kind):
    # a bug of ours is not disguised as bad input: the exception leaves main() and Python prints its traceback
    with pytest.raises(type(fake_command[kind])) as info:
        cli.main(["fake", kind])
    assert info.value is fake_command[kind]


def test_debug_shows_the_traceback_of_a_user_error(fake_command, monkeypatch):
    monkeypatch.setenv("DISTILL_DEBUG", "1")
    with pytest.raises(UserError):
        cli.main(["fake", "user"])


def test_a_path_the_user_gave_that_does_not_exist_is_one_line():
    result = _run("-m", "distill.cli", "data", "check", "no/such/dataset")
    assert result.returncode == 2
    assert result.stderr == "distill data check: error: no/such/dataset: no such dataset directory or config file\n"


def test_a_bug_prints_the_traceback_in_a_real_process():
    code = ("import sys, types\nimport distill.cli as cli\n"
            "m = types.ModuleType('boom')\nm.boom_arguments = lambda parser: None\n"
            "def boom(args):\n    return {}['missing key']\n"
            "m.boom = boom\nsys.modules['boom'] = m\ncli.COMMANDS['boom'] = ('boom', 'boom', 'a bug')\n"
            "sys.exit(cli.main(['boom']))\n")  # fmt: skip
    result = _run("-c", code)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "KeyError: 'missing key'" in result.stderr
