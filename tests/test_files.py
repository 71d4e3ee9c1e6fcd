"""The file-trust rules (ondemand.host.files) that the runtime directory, the embedded PostgreSQL and the
SQLite file share: on real files, links and FIFOs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ondemand.host import files

NOBODY = 65534


def test_a_file_of_ours_passes_and_everything_else_is_named(tmp_path: Path) -> None:
    ours = tmp_path / "ours"
    assert files.create_private(ours) and not files.create_private(ours)
    assert oct(ours.stat().st_mode & 0o777) == "0o600"
    assert files.lstat_private(ours) and not files.lstat_private(tmp_path / "absent")
    cases = {
        "link": ("is a symbolic link", lambda p: p.symlink_to(ours)),
        "fifo": ("is a FIFO, not a regular file", lambda p: os.mkfifo(p)),
        "dir": ("is a directory, not a regular file", lambda p: p.mkdir()),
        "hard": ("has 2 hard links", lambda p: os.link(ours, p)),
        "open": ("is writable by group or others (mode 0666)", lambda p: (p.touch(), p.chmod(0o666))),
    }
    for name, (reason, make) in cases.items():
        make(tmp_path / name)
        with pytest.raises(files.Untrusted) as caught:
            files.lstat_private(tmp_path / name)
        assert caught.value.reason == reason and caught.value.path == tmp_path / name
        if name == "hard":
            os.unlink(tmp_path / name)  # `ours` has one link again


def test_open_never_follows_a_link_and_never_blocks_on_a_fifo(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "link").symlink_to(victim)
    os.mkfifo(tmp_path / "fifo")
    for name in ("link", "fifo"):
        with pytest.raises(files.Untrusted):
            files.open_private(tmp_path / name, os.O_WRONLY | os.O_CREAT)
    with pytest.raises(files.Untrusted):
        files.replace_private(tmp_path / "link", "x")
    assert victim.read_text() == "keep"
    files.replace_private(tmp_path / "link", "x", refuse_planted=False)  # replaced by a rename, not written through
    assert victim.read_text() == "keep" and (tmp_path / "link").read_text() == "x"
    assert not (tmp_path / "link").is_symlink()


def test_directories_are_made_0700_and_untrusted_parents_are_named(tmp_path: Path) -> None:
    deep = tmp_path / "a" / "b" / "c"
    files.make_private_dirs(deep, check_parents=True)
    assert all(oct(d.stat().st_mode & 0o777) == "0o700" for d in (tmp_path / "a", tmp_path / "a" / "b", deep))
    files.check_dir(deep)
    open_parent = tmp_path / "open"
    open_parent.mkdir()
    open_parent.chmod(0o777)
    with pytest.raises(files.Untrusted, match="writable by group or others \\(mode 0777, not sticky\\)") as caught:
        files.make_private_dirs(open_parent / "x", check_parents=True)
    assert caught.value.path == open_parent
    open_parent.chmod(0o1777)  # sticky, like /tmp: trusted as a parent
    files.make_private_dirs(open_parent / "x", check_parents=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
def test_another_users_entry_is_named_with_its_owner(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(files.Untrusted, match=r"is owned by nobody \(uid 65534\), not by root \(uid 0\)"):
        files.check_dir(theirs)
    files.check_dir(theirs, owners={NOBODY})
