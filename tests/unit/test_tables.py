"""The one table printer (kokoa health, kokoa-dns list, kokoa lab status)."""

from kokoa_infra.tables import format_table


def test_columns_align_two_spaces_apart_without_trailing_blanks():
    assert format_table(("NAME", "IP", "NOTE"), [("blog", "198.51.100.7", ""), ("edge-tokyo-1", "10.0.0.1", "x")]) == (
        "NAME          IP            NOTE\n"
        "blog          198.51.100.7\n"
        "edge-tokyo-1  10.0.0.1      x")


def test_a_table_without_rows_is_its_header():
    assert format_table(("A", "B"), []) == "A  B"
