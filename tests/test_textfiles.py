"""The project's text inputs: UTF-8 and YAML, with one-line errors naming the file and line."""
from __future__ import annotations

import pytest

from src.data.lists import read_list
from src.textfiles import parse_yaml, read_utf8


class InputError(ValueError):
    pass


def test_yaml_keys_given_twice_are_refused_at_their_line(tmp_path):
    path = tmp_path / "c.yaml"
    with pytest.raises(InputError, match=r"^.*c.yaml:3: not valid YAML \('lr' is given twice\)$"):
        parse_yaml("trainer:\n  lr: 1\n  lr: 2\n", path, InputError)
    # A merge key may be overridden: that is what it is for.
    assert parse_yaml("base: &b {lr: 1}\nrun:\n  <<: *b\n  lr: 2\n", path, InputError)["run"] == {"lr": 2}


def test_yaml_scalars_stay_strings_when_asked():
    text = "names: [No, null, 007, 1e3]\n"
    assert parse_yaml(text, "f.yaml", InputError) == {"names": [False, None, 7, "1e3"]}
    assert parse_yaml(text, "f.yaml", InputError, strings_only=True) == {"names": ["No", "null", "007", "1e3"]}


def test_yaml_syntax_errors_name_the_file_line_and_problem():
    with pytest.raises(InputError, match=r"^f.yaml:2: not valid YAML \(.+\)$"):
        parse_yaml("a: [1,\nb: }\n", "f.yaml", InputError)


def test_text_that_is_not_utf8_names_the_file_and_byte(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("Zoë and Bébé".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1.txt: not UTF-8 text \(invalid continuation byte at byte 2\)"):
        read_utf8(path, InputError)


def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path):
    """A list saved by a Windows editor: its first path must read back without an invisible U+FEFF."""
    path = tmp_path / "train.txt"
    path.write_bytes(b"\xef\xbb\xbfCZoo/a.png Zuri\nCZoo/b.png Zuri\n")
    assert read_utf8(path, InputError).splitlines()[0] == "CZoo/a.png Zuri"
    assert read_list(path) == [("CZoo/a.png", "Zuri"), ("CZoo/b.png", "Zuri")]
