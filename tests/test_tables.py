"""Printed tables line up in terminal cells, whatever script the names are written in."""
from __future__ import annotations

from src.tables import counted, display_width, format_rows


def test_wide_characters_take_two_cells_and_combining_accents_none():
    assert display_width("Kofi") == 4
    assert display_width("アイ") == 4  # Ai, of Kyoto's Primate Research Institute
    assert display_width("\uff2b\uff4f\uff46\uff49") == 8  # full-width "Kofi", as a CJK keyboard types it
    assert display_width("Zoe\u0301") == display_width("Zo\u00e9") == 3


def test_columns_line_up_in_cells_and_lines_end_without_padding():
    rows = [("individual", "images", "note"), ("アイ", "12", "x"), ("Zoe\u0301", "3", ""), ("Kofi", "100", "long")]
    lines = format_rows(rows, "<>").splitlines()
    # The third column starts at the same terminal cell on every line.
    starts = [display_width(line[:len(line) - len(row[2])]) for line, row in zip(lines, rows)]
    assert len(set(starts)) == 1 and starts[0] == len("individual  images  ")
    assert lines[1] == "アイ" + " " * 6 + "  " + "    12" + "  x"  # 4 of the 10 cells "individual" takes
    assert lines[2].endswith("3  ")  # the last column is not padded; its empty cell stays empty


def test_counts_take_the_noun_in_their_number():
    assert [counted(n, "image") for n in (0, 1, 2, 1234)] == ["0 images", "1 image", "2 images", "1,234 images"]
