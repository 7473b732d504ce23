"""The project's text inputs: UTF-8 and YAML, with one-line errors naming the file and line."""
from __future__ import annotations

from pathlib import Path

import pytest

from src.data.lists import ListFormatError, read_list, write_list
from src.textfiles import parse_yaml, read_json, read_utf8


class InputError(ValueError):
    pass


def test_yaml_keys_given_twice_are_refused_at_their_line(tmp_path):
    path = tmp_path / "c.yaml"
    with pytest.raises(InputError, match=r"^.*c.yaml:3: not valid YAML \('lr' is given twice\)$"):
        parse_yaml("trainer:\n  lr: 1\n  lr: 2\n", path, InputError)
    # A merge key may be overridden: that is what it is for.
    assert parse_yaml("base: &b {lr: 1}\nrun:\n  <<: *b\n  lr: 2\n", path, InputError)["run"] == {"lr": 2}


def test_huge_values_in_yaml_and_list_files_are_clipped_in_errors(tmp_path):
    """A crafted 1 MB key or line was quoted whole, in a 1 MB error line."""
    key = "x" * 1_000_000
    with pytest.raises(InputError, match=r"xxx\.\.\. is given twice") as exc:
        parse_yaml(f'? "{key}"\n: 1\n? "{key}"\n: 2\n', tmp_path / "c.yaml", InputError)
    assert len(str(exc.value)) < len(str(tmp_path)) + 400, str(exc.value)[:300]
    path = tmp_path / "train.txt"
    path.write_text(key + "\n")
    with pytest.raises(ListFormatError, match=r"got 'xxx.*\.\.\.$") as exc:
        read_list(path)
    assert len(str(exc.value)) < len(str(tmp_path)) + 400, str(exc.value)[:300]


def test_yaml_scalars_stay_strings_when_asked():
    text = "names: [No, null, 007, 1e3]\n"
    assert parse_yaml(text, "f.yaml", InputError) == {"names": [False, None, 7, 1000.0]}
    assert parse_yaml(text, "f.yaml", InputError, strings_only=True) == {"names": ["No", "null", "007", "1e3"]}


def test_yaml_numbers_are_read_as_yaml_1_2_reads_them():
    # PyYAML's YAML 1.1 reads 1:20 as 80 (base 60), 010 as 8 (octal) and 1e-3 as a string.
    text = "[1:20, 010, 0o10, 0x10, 1e-3, 2.5E+2, -7, +3, .5, 1., .inf, -.inf, 1_000, 0b11, 12:30:00]"
    assert parse_yaml(text, "f.yaml", InputError) == [
        "1:20", 10, 8, 16, 0.001, 250.0, -7, 3, 0.5, 1.0, float("inf"), float("-inf"), "1_000", "0b11", "12:30:00"]
    nan = parse_yaml(".nan", "f.yaml", InputError)
    assert nan != nan


def test_yaml_syntax_errors_name_the_file_line_and_problem():
    with pytest.raises(InputError, match=r"^f.yaml:2: not valid YAML \(.+\)$"):
        parse_yaml("a: [1,\nb: }\n", "f.yaml", InputError)


def test_yaml_nested_too_deep_is_one_line_naming_the_file():
    """Before, PyYAML's recursive parser ended a command with a RecursionError traceback."""
    for text in ["[" * 50_000 + "]" * 50_000, "- " * 50_000 + "x"]:
        with pytest.raises(InputError, match=r"^f.yaml: not valid YAML \(nested too deep\)$"):
            parse_yaml(text, "f.yaml", InputError)


def test_text_that_is_not_utf8_names_the_file_and_byte(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("Zoë and Bébé".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1.txt: not UTF-8 text \(invalid continuation byte at byte 2\)"):
        read_utf8(path, InputError)


def test_a_file_that_cannot_be_read_is_one_line_naming_it(tmp_path):
    """Callers check that the file is there; one without read permission (faked here by a folder, as
    root reads anything) was a PermissionError traceback (`train --config` on a chmod 000 file)."""
    unreadable = tmp_path / "folder.yaml"
    unreadable.mkdir()
    with pytest.raises(InputError, match=r"^.*folder.yaml: cannot read it \(Is a directory\)$"):
        read_utf8(unreadable, InputError)


def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path):
    """A list saved by a Windows editor: its first path must read back without an invisible U+FEFF."""
    path = tmp_path / "train.txt"
    path.write_bytes(b"\xef\xbb\xbfCZoo/a.png Zuri\nCZoo/b.png Zuri\n")
    assert read_utf8(path, InputError).splitlines()[0] == "CZoo/a.png Zuri"
    assert read_list(path) == [("CZoo/a.png", "Zuri"), ("CZoo/b.png", "Zuri")]


def test_a_list_line_with_a_nul_character_is_named(tmp_path):
    """Before, the list was read and the NUL reached the image cache's open(): a ValueError traceback."""
    path = tmp_path / "train.txt"
    path.write_bytes(b"CZoo/a.png Zuri\nCZoo/a\x00b.png Zuri\n")
    with pytest.raises(ListFormatError, match=r"train.txt:2: a NUL character in 'CZoo/a\\x00b.png Zuri'$"):
        read_list(path)


def test_json_that_cannot_be_parsed_is_one_line_naming_the_file(tmp_path):
    for text, problem in [("{", "Expecting property name"), ("[" * 100_000, "nested too deep")]:
        path = tmp_path / "x.json"
        path.write_text(text)
        with pytest.raises(ValueError, match=f"x.json: not valid JSON .{problem}") as exc:
            read_json(path, ValueError)
        assert "\n" not in str(exc.value)


def test_yaml_aliases_that_expand_without_end_are_refused_in_one_line(tmp_path):
    """The "billion laughs": 8 lines of nested aliases. Before, validating such a config ran for
    minutes and its error line quoted the whole expansion (72 MB for 6 levels)."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)]
    for text in ["\n".join(lines) + "\ntrainer: {progress: *a7}\n", "a: &a [1, *a]\n"]:  # the second, itself
        with pytest.raises(InputError, match=r"^x.yaml: its aliases expand to over 100,000 values") as exc:
            parse_yaml(text, Path("x.yaml"), InputError)
        assert "\n" not in str(exc.value)
    # Aliases a person writes are fine.
    assert parse_yaml("base: &b {lr: 0.1}\nother: *b\n", Path("x.yaml"), InputError) == {"base": {"lr": 0.1},
                                                                                        "other": {"lr": 0.1}}


def test_comment_lines_are_skipped_even_when_they_split_in_two(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("# path individual\nCZoo/a.png Zuri\n  # a note\n")
    assert read_list(path) == [("CZoo/a.png", "Zuri")]


@pytest.mark.parametrize("name", ["Ko fi", "Ko\tfi", "Ko\u00a0fi", ""])
def test_write_list_refuses_names_that_would_not_read_back(tmp_path, name):
    with pytest.raises(ListFormatError, match="empty or contains whitespace"):
        write_list(tmp_path / "list.txt", [("a.png", name)])
    assert not (tmp_path / "list.txt").exists()
