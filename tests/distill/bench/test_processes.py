"""``distill.bench.processes.InTurn``: one process per contender, called one at a time, failures named."""

import os
import textwrap

import pytest

from distill.bench.processes import ContenderError, InTurn

# The contenders live in a module the spawned children can import (the tests are imported by path, not by name)
_MODULE = textwrap.dedent('''
    import os, time

    class Clock:
        def __init__(self, name, log, fail=False):
            if fail:
                raise ValueError(f"bad contender {name}")
            self.name, self.log = name, log
            self.info = {"name": name}

        def work(self):
            with open(self.log, "a") as f:
                f.write(f"start {self.name} {time.monotonic()}\\n")
            time.sleep(0.05)
            with open(self.log, "a") as f:
                f.write(f"end {self.name} {time.monotonic()}\\n")
            return os.getpid()

        def broken(self):
            raise KeyError("no such thing")
''')


@pytest.fixture
def contenders(tmp_path, monkeypatch):
    (tmp_path / "inturn_contenders.py").write_text(_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))  # a spawned child starts with the parent's sys.path
    import inturn_contenders

    return inturn_contenders.Clock, str(tmp_path / "log.txt")


def test_each_contender_runs_in_its_own_process_and_never_beside_another(contenders):
    clock, log = contenders
    with InTurn({"a": (clock, ("a", log)), "b": (clock, ("b", log))}) as turn:
        pids = {name: turn.info[name]["pid"] for name in ("a", "b")}
        assert turn.info["a"]["name"] == "a"
        for _ in range(3):
            for name in ("a", "b"):
                assert turn.call(name, "work") == pids[name]
    assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()
    events = [line.split() for line in open(log)]
    assert [e[:2] for e in events] == [[kind, name] for _ in range(3) for name in "ab" for kind in ("start", "end")]
    times = [float(e[2]) for e in events]
    assert times == sorted(times)  # one contender's work ended before the next one's began


def test_a_failing_contender_is_named_with_its_traceback(contenders):
    clock, log = contenders
    with pytest.raises(ContenderError, match=r"contender 'b' failed in its process:(.|\n)*bad contender b"):
        with InTurn({"a": (clock, ("a", log)), "b": (clock, ("b", log, True))}):
            pass
    with InTurn({"a": (clock, ("a", log))}) as turn:
        with pytest.raises(ContenderError, match=r"contender 'a' failed(.|\n)*KeyError: 'no such thing'"):
            turn.call("a", "broken")
