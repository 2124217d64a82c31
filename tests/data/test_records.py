import json
from pathlib import Path

import pytest

from distill.data.records import read_examples
from distill.errors import InputError
from distill.io import write_jsonl_atomic


def test_generated_rows_round_trip_with_the_finished_flag(tmp_path: Path) -> None:
    path = tmp_path / "gen.jsonl"
    rows = [
        {
            "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
            "finished": False,
        },
        {"prompt": "Q", "completion": "A"},
    ]
    write_jsonl_atomic(path, rows)
    a, b = read_examples(str(path))
    assert (a.prompt, a.completion, a.finished) == ([{"role": "user", "content": "Hi"}], "Hello", False)
    assert (b.completion, b.finished) == ("A", True)
    assert not list(tmp_path.glob(".gen.jsonl.*")), "no temp file left"


def test_bad_rows_name_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "no prompt"}) + "\n")
    with pytest.raises(InputError, match="bad.jsonl line 2"):
        read_examples(str(path))
