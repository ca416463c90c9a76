"""fastkd.atomic: a file appears under its final name complete, or not at all; a failed write leaves the old
file as it was and no temporary file behind."""
import json
import os
import stat

import pytest

from fastkd.atomic import TMP_MARK, atomic_dir, atomic_path, atomic_write, write_json


def _leftovers(folder):
    return [n for n in os.listdir(folder) if TMP_MARK in n]


def test_a_write_replaces_the_file_whole(tmp_path):
    target = tmp_path / "sub" / "summary.json"  # the folder is made
    write_json(str(target), {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    with atomic_write(str(target)) as f:
        f.write("second")
    assert target.read_text() == "second" and _leftovers(target.parent) == []
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o666 & ~umask  # as open() makes it, not mkstemp's 0600


@pytest.mark.parametrize("how", ["file", "path"])
def test_a_failing_write_leaves_the_old_file_and_no_temporary(tmp_path, how):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old contents")
    with pytest.raises(RuntimeError, match="disk on fire"):
        if how == "file":
            with atomic_write(str(target), "wb") as f:
                f.write(b"half of the new")
                raise RuntimeError("disk on fire")
        else:
            with atomic_path(str(target)) as tmp:
                assert os.path.dirname(tmp) == str(tmp_path) and TMP_MARK in os.path.basename(tmp)
                with open(tmp, "wb") as f:
                    f.write(b"half of the new")
                raise RuntimeError("disk on fire")
    assert target.read_bytes() == b"old contents"
    assert _leftovers(tmp_path) == []


def test_a_failing_json_dump_leaves_the_old_file(tmp_path):
    target = tmp_path / "records.json"
    write_json(str(target), [1, 2])
    with pytest.raises(TypeError):
        write_json(str(target), {"not serialisable": object()})
    assert json.loads(target.read_text()) == [1, 2] and _leftovers(tmp_path) == []


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    out = tmp_path / "scenes"
    with atomic_dir(str(out)) as tmp:
        open(os.path.join(tmp, "a.txt"), "w").close()
    assert os.listdir(out) == ["a.txt"]
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(str(out)) as tmp:
            open(os.path.join(tmp, "b.txt"), "w").close()
            raise KeyboardInterrupt
    assert os.listdir(out) == ["a.txt"] and _leftovers(tmp_path) == []
    with atomic_dir(str(out)) as tmp:
        open(os.path.join(tmp, "c.txt"), "w").close()
    assert os.listdir(out) == ["c.txt"] and _leftovers(tmp_path) == []


def test_only_text_or_binary_writes(tmp_path):
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb', got 'a'"):
        with atomic_write(str(tmp_path / "x"), "a"):
            pass
