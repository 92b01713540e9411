"""``mmrec.atomic.replacing``: a file or folder is replaced whole, or left as it was."""

import pytest

from mmrec import atomic


def test_a_file_is_replaced_whole(tmp_path):
    final = tmp_path / "log.jsonl"
    final.write_text("old\n")
    with atomic.replacing(final) as tmp:
        assert tmp.parent == tmp_path and tmp != final
        tmp.write_text("new\n")
        assert final.read_text() == "old\n"  # untouched until the block ends
    assert final.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]


def test_a_folder_is_replaced_whole(tmp_path):
    final = tmp_path / "step_000001"
    final.mkdir()
    (final / "a").write_text("old")
    (final / "gone").write_text("old")
    with atomic.replacing(final, tmp_path / "step_000001.tmp") as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("new")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b").write_text("new")
    assert sorted(p.relative_to(final).as_posix() for p in final.rglob("*")) == ["a", "sub", "sub/b"]
    assert (final / "a").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001"]  # no .tmp, no .old


def test_replacing_a_folder_leaves_the_user_s_own_files_beside_it(tmp_path):
    final, backup = tmp_path / "texts", tmp_path / "texts.old"
    final.mkdir()
    backup.mkdir()
    (backup / "keep").write_text("the user's backup")
    with atomic.replacing(final) as tmp:
        tmp.mkdir()
    assert (backup / "keep").read_text() == "the user's backup"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["texts", "texts.old"]


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_failed_write_leaves_the_old_content_and_no_temporary(tmp_path, kind):
    final = tmp_path / "out"
    if kind == "file":
        final.write_text("old")
    else:
        final.mkdir()
        (final / "a").write_text("old")
    with pytest.raises(OSError, match="disk full"), atomic.replacing(final) as tmp:
        if kind == "file":
            tmp.write_text("half")
        else:
            tmp.mkdir()
            (tmp / "a").write_text("half")
        raise OSError("disk full")
    assert (final.read_text() if kind == "file" else (final / "a").read_text()) == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_what_an_interrupted_write_left_is_cleared_first(tmp_path):
    final, stale = tmp_path / "shards", tmp_path / ".shards.partial"
    stale.mkdir()
    (stale / "leftover").write_text("x")
    with atomic.replacing(final, stale) as tmp:
        assert not tmp.exists()
        tmp.mkdir()
        (tmp / "index.json").write_text("{}")
    assert sorted(p.name for p in final.iterdir()) == ["index.json"] and not stale.exists()


def test_without_durable_the_content_is_the_same(tmp_path):
    final = tmp_path / "f"
    with atomic.replacing(final, durable=False) as tmp:
        tmp.write_bytes(b"\x00\x01")
    assert final.read_bytes() == b"\x00\x01"
