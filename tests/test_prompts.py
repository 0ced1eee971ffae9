"""Prompt files: every format, skipped-row reporting and one-line errors for every kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffmem.errors import InputError
from diffmem.io.prompts import PromptFile, read_prompts, read_records


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def input_error(path: Path, column: str | None = None) -> str:
    """The message of the InputError that reading ``path`` raises, checked to be one line naming the file."""
    with pytest.raises(InputError) as info:
        read_prompts(path, column)
    message = str(info.value)
    assert "\n" not in message
    assert path.name in message
    return message


def test_txt_keeps_lines_and_reports_skipped_blank_ones(tmp_path: Path) -> None:
    raw = "\ufeffa photo of a cat\r\n\n  two  spaces inside  \n   \nlast line without newline"
    pf = read_prompts(write(tmp_path, "p.txt", raw))
    assert pf.prompts == ["a photo of a cat", "  two  spaces inside  ", "last line without newline"]
    assert pf.skipped == ["line 2: empty prompt", "line 4: empty prompt"]
    summary = pf.skipped_summary()
    assert summary is not None and "skipped 2" in summary and "line 4" in summary
    assert pf.records[0] == {"prompt": "a photo of a cat"}
    # A PromptFile is a sequence of its prompts.
    assert isinstance(pf, PromptFile) and len(pf) == 3 and pf[0] == "a photo of a cat"
    assert list(pf) == pf.prompts and pf[1:] == pf.prompts[1:]


def test_txt_keeps_duplicates_and_unicode_line_separators(tmp_path: Path) -> None:
    pf = read_prompts(write(tmp_path, "p.txt", "a\u2028b\nx\nx\n"))
    assert pf.prompts == ["a\u2028b", "x", "x"] and pf.skipped_summary() is None


def test_undecodable_bytes_name_offset_and_line(tmp_path: Path) -> None:
    message = input_error(write(tmp_path, "bad.txt", b"fine\nbad \xff here\n"))
    assert "offset 9" in message and "line 2" in message and "0xff" in message


def test_jsonl_prefers_prompt_then_caption_and_keeps_row_fields(tmp_path: Path) -> None:
    rows = [{"caption": "c1", "index": 7, "label": 1}, {"caption": None, "index": 8}, {"caption": "c3"}]
    path = write(tmp_path, "p.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    pf = read_prompts(path)
    assert pf.column == "caption" and pf.prompts == ["c1", "c3"]
    assert pf.records[0] == {"caption": "c1", "index": 7, "label": 1, "prompt": "c1"}
    assert pf.skipped == ["line 2: empty prompt", "line 4: blank line"]
    assert read_records(path)[1] == {"caption": "c3", "prompt": "c3"}
    both = write(tmp_path, "both.jsonl", json.dumps({"caption": "c", "prompt": "p", "alt": "a"}))
    assert read_prompts(both).prompts == ["p"]
    assert read_prompts(both, column="alt").records == [{"caption": "c", "prompt": "a", "alt": "a"}]


@pytest.mark.parametrize(
    ("content", "column", "expected"),
    [
        ('{"prompt": "a"}\n{"prompt": "b"\n', None, "line 2: invalid JSON"),
        ('{"prompt": "a"}\n["b"]\n', None, "line 2: expected a JSON object, got list"),
        ('{"prompt": "a"}\n{"prompt": 5}\n', None, "line 2: 'prompt' is a int, expected text"),
        ('{"prompt": "a"}\n{"text": "b"}\n', None, "line 2: no 'prompt' field"),
        ('{"text": "a", "id": 1}\n', None, "a 'caption' column; available columns: text, id; name one"),
        ('{"prompt": "a"}\n', "caption", "no column 'caption'; available columns: prompt"),
        ('{"prompt": ""}\n\n', None, "holds no prompts (2 empty rows skipped)"),
    ],
)
def test_jsonl_errors(tmp_path: Path, content: str, column: str | None, expected: str) -> None:
    assert expected in input_error(write(tmp_path, "p.jsonl", content), column)


def test_csv_with_quotes_multiline_fields_and_extra_columns(tmp_path: Path) -> None:
    content = 'id,prompt,label\n1,"a, quoted ""cat""",1\n2,,0\n3,"two\nlines",0\n'
    pf = read_prompts(write(tmp_path, "p.csv", content))
    assert pf.prompts == ['a, quoted "cat"', "two\nlines"]
    assert pf.records[0] == {"id": "1", "prompt": 'a, quoted "cat"', "label": "1"}
    assert pf.skipped == ["line 3: empty prompt"]


@pytest.mark.parametrize(
    ("content", "column", "expected"),
    [
        ("prompt,label\na,1\nb,0,extra\n", None, "line 3: more fields than the header's 2"),
        ("text,label\na,1\n", None, "available columns: text, label"),
        ("prompt\na\n", "caption", "no column 'caption'; available columns: prompt"),
        ("", None, "is empty"),
        ("prompt\n", None, "holds no prompts"),
        ('prompt\nok\n"unterminated\nmore\n', None, "line 4: malformed CSV (unexpected end of data)"),
        ('prompt\n"a"b\n', None, "line 2: malformed CSV"),
    ],
)
def test_csv_errors(tmp_path: Path, content: str, column: str | None, expected: str) -> None:
    assert expected in input_error(write(tmp_path, "p.csv", content), column)


def test_parquet(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    table = pa.table({"caption": ["x", None, "z"], "index": [1, 2, 3], "n": [0.5, 1.5, 2.5]})
    pq.write_table(table, path)
    pf = read_prompts(path)
    assert pf.prompts == ["x", "z"] and pf.skipped == ["row 2: empty prompt"]
    assert pf.records[1] == {"caption": "z", "index": 3, "n": 2.5, "prompt": "z"}
    assert "available columns: caption, index, n" in input_error(path, "prompt")
    assert "row 1: 'n' is a float, expected text" in input_error(path, "n")
    broken = write(tmp_path, "broken.parquet", b"PAR1 this is not parquet")
    assert "not a readable Parquet file" in input_error(broken)


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("p.txt", "", "holds no prompts"),
        ("p.txt", "\n \n", "holds no prompts (2 empty rows skipped)"),
        ("p.docx", "a", "unknown prompt file type '.docx'"),
        ("prompts", "a", "unknown prompt file type '(no extension)'"),
    ],
)
def test_empty_and_unknown_files(tmp_path: Path, name: str, content: str, expected: str) -> None:
    assert expected in input_error(write(tmp_path, name, content))


def test_missing_file_folder_and_column_on_txt(tmp_path: Path) -> None:
    assert "not found" in input_error(tmp_path / "missing.txt")
    folder = tmp_path / "dir.txt"
    folder.mkdir()
    assert "is a folder" in input_error(folder)
    assert "--column does not apply" in input_error(write(tmp_path, "p.txt", "a\n"), "caption")
    assert read_prompts(tmp_path / "p.txt", "prompt").prompts == ["a"]
