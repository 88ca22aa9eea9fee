"""The CLI turns this package's ValueErrors into one-line errors, but not a library's."""

from __future__ import annotations

import json

import pytest

import magic3d.export
from magic3d.cli import main
from magic3d.distributed import per_rank_batch_size


def test_our_value_errors_are_one_line_and_library_ones_keep_their_traceback(monkeypatch, tmp_path, capsys) -> None:
    def ours(*args, **kwargs):
        per_rank_batch_size(3, 2)  # raises inside magic3d with a message that names the fix

    monkeypatch.setattr(magic3d.export, "export_stage", ours)
    assert main(["export", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("[magic3d] error:") and "Traceback" not in err

    def library(*args, **kwargs):
        json.loads("{not json")  # raises json.JSONDecodeError, a ValueError, inside the stdlib

    monkeypatch.setattr(magic3d.export, "export_stage", library)
    with pytest.raises(json.JSONDecodeError):
        main(["export", str(tmp_path)])
