"""The one text-table formatter of the commands."""

from distill.tables import cell, format_table


def test_columns_align_with_a_rule_and_no_trailing_blanks():
    text = format_table([["a", 1], ["long name", None]], ["name", "n"])
    assert text.splitlines() == ["name       n", "---------  ----", "a          1", "long name  None"]
    assert format_table([["x", "y"]], ["h1", "h2"], rule=False).splitlines() == ["h1  h2", "x   y"]


def test_a_short_row_runs_on_without_widening_its_last_column():
    text = format_table([["ok", "fam", "1", "2"], ["bad", "fam", "error: a long message"]], ["n", "f", "a", "b"])
    lines = text.splitlines()
    assert lines[0] == "n    f    a  b"
    assert lines[3] == "bad  fam  error: a long message"


def test_cell():
    assert (cell(None), cell(0.5), cell(2.0), cell(3), cell("s")) == ("-", "0.5", "2", "3", "s")
