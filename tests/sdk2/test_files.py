"""The real e2b 2.x SDK's `sbx.files` against burrow: write, read, list, make_dir, exists,
rename, remove, get_info, and a missing file raising the SDK's NotFoundException."""

from __future__ import annotations

import datetime
import io

import pytest
from e2b import FilesystemEventType, FileType, NotFoundException, Sandbox
from e2b.sandbox.filesystem.filesystem import WriteEntry

from burrow_harness import wait_until


def test_write_read_list_and_info(sandboxes):
    sbx = sandboxes(Sandbox.create())

    info = sbx.files.write("notes/a.txt", "hello files")
    assert (info.path, info.name) == ("/home/user/notes/a.txt", "a.txt")
    assert info.type == FileType.FILE
    assert sbx.files.read("notes/a.txt") == "hello files"
    assert sbx.files.read("/home/user/notes/a.txt", format="bytes") == b"hello files"
    # The file and the directory made for it are the sandbox user's, as a command sees them.
    owners = sbx.commands.run("stat -c %U:%G notes notes/a.txt").stdout.split()
    assert owners == ["user:user", "user:user"]

    # Writing again replaces the contents.
    sbx.files.write("notes/a.txt", b"\x00\x01binary")
    assert sbx.files.read("notes/a.txt", format="bytes") == b"\x00\x01binary"

    written = sbx.files.write_files(
        [
            WriteEntry(path="/tmp/many/one", data="1"),
            WriteEntry(path="~/many/two", data=b"22"),
        ]
    )
    assert sorted(w.path for w in written) == ["/home/user/many/two", "/tmp/many/one"]
    assert sbx.commands.run("cat /tmp/many/one ~/many/two").stdout == "122"

    # A file-like object goes up as an application/octet-stream body (envd >= 0.5.7).
    streamed = sbx.files.write("streamed/data.bin", io.BytesIO(b"x" * 200_000))
    assert streamed.path == "/home/user/streamed/data.bin"
    assert b"".join(sbx.files.read("streamed/data.bin", format="stream")) == b"x" * 200_000

    # As another user: `username` picks who writes, and who owns what is made.
    sbx.files.write("/opt/rooted/r.txt", "root's", user="root")
    assert sbx.files.read("/opt/rooted/r.txt", user="root") == "root's"
    assert sbx.files.get_info("/opt/rooted/r.txt", user="root").owner == "root"

    entry = sbx.files.get_info("notes/a.txt")
    assert (entry.name, entry.path, entry.type) == ("a.txt", "/home/user/notes/a.txt", FileType.FILE)
    assert entry.size == 8
    assert (entry.owner, entry.group) == ("user", "user")
    assert entry.permissions == "-rw-r--r--"
    assert entry.mode == 0o644
    age = datetime.datetime.now(datetime.timezone.utc) - entry.modified_time
    assert datetime.timedelta(0) <= age < datetime.timedelta(minutes=5)

    sbx.commands.run("ln -s notes/a.txt link")
    link = sbx.files.get_info("link")
    assert link.type == FileType.FILE
    assert link.symlink_target == "notes/a.txt"
    assert link.permissions == "Lrwxrwxrwx"

    names = [e.name for e in sbx.files.list("notes")]
    assert names == ["a.txt"]
    sbx.files.write("notes/sub/deep/b.txt", "b")
    shallow = {e.path: e.type for e in sbx.files.list("notes")}
    assert shallow == {
        "/home/user/notes/a.txt": FileType.FILE,
        "/home/user/notes/sub": FileType.DIR,
    }
    deep = [e.path for e in sbx.files.list("notes", depth=3)]
    assert deep == [
        "/home/user/notes/a.txt",
        "/home/user/notes/sub",
        "/home/user/notes/sub/deep",
        "/home/user/notes/sub/deep/b.txt",
    ]


def test_make_dir_rename_remove_and_exists(sandboxes):
    sbx = sandboxes(Sandbox.create())

    assert sbx.files.make_dir("a/b/c") is True
    # Already there: False, not an error.
    assert sbx.files.make_dir("a/b/c") is False
    assert sbx.files.get_info("a/b").type == FileType.DIR
    assert sbx.commands.run("stat -c %U a a/b a/b/c").stdout.split() == ["user"] * 3

    sbx.files.write("a/b/c/f.txt", "moved")
    moved = sbx.files.rename("a/b/c/f.txt", "x/y/g.txt")
    assert (moved.name, moved.path) == ("g.txt", "/home/user/x/y/g.txt")
    assert sbx.files.read("x/y/g.txt") == "moved"
    assert sbx.files.exists("a/b/c/f.txt") is False
    assert sbx.files.exists("x/y/g.txt") is True

    sbx.files.remove("a")
    assert sbx.files.exists("a") is False
    # Removing what is not there is fine, as `rm -rf`.
    sbx.files.remove("a")


def test_missing_files_raise_not_found(sandboxes):
    sbx = sandboxes(Sandbox.create())

    # The same calls succeed on a file that is there, and fail once it is gone: the error is
    # envd's answer about the file, naming it, not a missing route's.
    sbx.files.write("there.txt", "x")
    assert sbx.files.read("there.txt") == "x"
    sbx.files.remove("there.txt")
    with pytest.raises(NotFoundException, match="there.txt"):
        sbx.files.read("there.txt")
    with pytest.raises(NotFoundException, match="there.txt"):
        sbx.files.get_info("there.txt")
    with pytest.raises(NotFoundException):
        sbx.files.read("no/such/file")
    with pytest.raises(NotFoundException):
        sbx.files.list("no/such/dir")
    with pytest.raises(NotFoundException):
        sbx.files.rename("no/such/file", "elsewhere")


def test_watch_dir_reports_changes(sandboxes):
    sbx = sandboxes(Sandbox.create())
    sbx.files.make_dir("watched/sub")

    handle = sbx.files.watch_dir("watched", recursive=True)
    sbx.files.write("watched/new.txt", "x")
    sbx.files.write("watched/sub/deep.txt", "y")
    sbx.files.remove("watched/new.txt")

    seen = []

    def saw_all():
        seen.extend((e.name, e.type) for e in handle.get_new_events())
        return ("new.txt", FilesystemEventType.REMOVE) in seen

    wait_until(saw_all, timeout=10)
    assert ("new.txt", FilesystemEventType.CREATE) in seen
    assert ("new.txt", FilesystemEventType.WRITE) in seen
    assert ("sub/deep.txt", FilesystemEventType.CREATE) in seen
    handle.stop()

    with pytest.raises(NotFoundException):
        sbx.files.watch_dir("no/such/dir")
