"""The atomic writer under faults: a full disk, a read-only or unwritable folder and a killed writer each leave the
old file as it was, no temporary file behind (or one the next run removes), and one line naming the path and
the cause. Real faults where the machine allows them (a 64 KiB tmpfs, a read-only remount, in a private mount
namespace); where it does not, and for what root cannot be stopped from (permission bits), the system call
fails through a monkeypatched `os` function instead."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT

from landscape import files
from landscape.files import WriteError, check_writable, remove_stale_temporaries, write_atomic, write_bytes_atomic


def listing(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, hidden ones included, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(err: Exception) -> str:
    message = str(err)
    assert "\n" not in message and message.startswith("cannot write ")
    return message


def can_mount_private_tmpfs() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


needs_tmpfs = pytest.mark.skipif(not can_mount_private_tmpfs(),
                                 reason="a real full or read-only file system needs a private mount namespace "
                                        "(root and unshare -m), which this machine does not allow")


TMPFS_SCRIPT = """
import os, subprocess, sys
sys.path.insert(0, {root!r})
from pathlib import Path
from landscape.files import WriteError, check_writable, write_bytes_atomic
folder = Path({folder!r})
write_bytes_atomic(folder / {name!r}, b"old")
if {read_only!r}:
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
for attempt in {attempts!r}:
    try:
        eval(attempt)
        print("no error")
    except WriteError as err:
        print(err, err.errno)
print(sorted(os.listdir(folder)), (folder / {name!r}).read_bytes())
"""


def on_small_tmpfs(folder: Path, name: str, attempts: list[str], *, read_only: bool = False) -> list[str]:
    """With a 64 KiB tmpfs on `folder` in a private mount namespace (nothing outside the process sees it): write
    b"old" to `name`, remount read-only when asked, then run each attempt; one line per attempt (its error and
    errno), then what the folder holds and the file's bytes."""
    script = TMPFS_SCRIPT.format(root=str(ROOT), folder=str(folder), name=name, read_only=read_only,
                                 attempts=attempts)
    mount = f"mount -t tmpfs -o size=64k tmpfs {folder} && exec {sys.executable} -c \"$0\""
    done = subprocess.run(["unshare", "-m", "sh", "-c", mount, script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()


@needs_tmpfs
def test_a_full_disk_raises_one_line_naming_the_file_and_leaves_the_old_file_and_no_temporary(tmp_path):
    written, left = on_small_tmpfs(tmp_path, "metrics.json",
                                   ["write_bytes_atomic(folder / 'metrics.json', b'x' * 100_000)"])  # > 64 KiB
    words = "the disk is full: free some space and run again"
    assert written == f"cannot write {tmp_path / 'metrics.json'}: {words} {errno.ENOSPC}"
    assert left == "['metrics.json'] b'old'"


@needs_tmpfs
def test_a_read_only_file_system_raises_one_line_and_check_writable_says_so_first(tmp_path):
    checked, written, left = on_small_tmpfs(tmp_path, "model.pt", ["check_writable(folder / 'runs')",
                                                                   "write_bytes_atomic(folder / 'model.pt', b'new')"],
                                            read_only=True)
    words = f"the file system is read-only: choose a writable folder {errno.EROFS}"
    assert checked == f"cannot write {tmp_path / 'runs'}: {words}"
    assert written == f"cannot write {tmp_path / 'model.pt'}: {words}"
    assert left == "['model.pt'] b'old'"


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "the disk is full"), (errno.EACCES, "permission denied"),
                                         (errno.EROFS, "the file system is read-only")])
def test_an_os_error_at_any_step_of_a_write_names_the_path_and_cause_and_changes_nothing(tmp_path, monkeypatch,
                                                                                        where, code, words):
    """The system refusing the data (write), the flush to the disk (fsync: delayed allocation reports a full
    disk there) or the rename: the old file stays, no temporary file is left, the error is an OSError."""
    target = tmp_path / "flatness.json"
    write_bytes_atomic(target, b"old contents")
    before = listing(tmp_path)

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    def write(f):
        f.write(b"half of it")
        if where == "write":
            refuse()
        f.write(b" and the rest")

    if where != "write":
        monkeypatch.setattr(files.os, where, refuse)
    with pytest.raises(WriteError) as info:
        write_atomic(target, write)
    assert isinstance(info.value, OSError) and info.value.errno == code and info.value.filename == str(target)
    assert one_line(info.value).startswith(f"cannot write {target}: {words}")
    assert listing(tmp_path) == before


def test_an_error_that_is_not_the_systems_passes_through_and_leaves_nothing(tmp_path):
    target = tmp_path / "figure.png"
    with pytest.raises(ZeroDivisionError):
        write_atomic(target, lambda f: (f.write(b"partial"), 1 / 0))
    assert listing(tmp_path) == {}


def test_a_folder_at_the_files_path_is_named_as_such(tmp_path):
    (tmp_path / "metrics.json").mkdir()
    with pytest.raises(WriteError, match="it is a folder, not a file"):
        write_bytes_atomic(tmp_path / "metrics.json", b"{}")
    assert listing(tmp_path) == {}


def test_check_writable_accepts_a_folder_yet_to_be_made_and_creates_nothing(tmp_path):
    check_writable(tmp_path / "runs" / "deeper")
    check_writable(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_check_writable_refuses_a_file_and_a_path_through_a_file(tmp_path):
    (tmp_path / "runs").write_text("a file")
    for path in (tmp_path / "runs", tmp_path / "runs" / "inside"):
        with pytest.raises(WriteError) as info:
            check_writable(path)
        assert one_line(info.value) == (f"cannot write {path}: {tmp_path / 'runs'} is a file, not a folder: "
                                        "choose another path")
    assert listing(tmp_path) == {"runs": b"a file"}


def test_check_writable_refuses_a_folder_without_write_permission(tmp_path, monkeypatch):
    """Permission bits do not stop root, so as root the refusal comes from the system call itself."""
    folder = tmp_path / "out"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
    else:
        def refuse(*args, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

        monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
    try:
        with pytest.raises(WriteError) as info:
            check_writable(folder)
    finally:
        folder.chmod(0o755)
    assert one_line(info.value) == f"cannot write {folder}: permission denied: choose a folder you can write to"


def test_make_folder_names_a_file_in_the_way(tmp_path):
    (tmp_path / "runs").write_text("a file")
    with pytest.raises(WriteError, match="it is a file, not a folder"):
        files.make_folder(tmp_path / "runs")
    with pytest.raises(WriteError, match="a part of the path is a file"):
        files.make_folder(tmp_path / "runs" / "model")


# ----------------------------------------------------------------------------- temporary files of killed runs
KILLED_WRITER = """
import os, signal, sys
sys.path.insert(0, {root!r})
from landscape.files import write_atomic

def die(f):
    f.write(b"half a figure")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

write_atomic({target!r}, die)
"""


def kill_a_writer(target: Path) -> Path:
    """Run a process that is killed in the middle of writing `target`; returns the temporary file it left."""
    before = set(target.parent.iterdir())
    done = subprocess.run([sys.executable, "-c", KILLED_WRITER.format(root=str(ROOT), target=str(target))],
                          capture_output=True, timeout=60)
    assert done.returncode == -signal.SIGKILL
    (left,) = set(target.parent.iterdir()) - before
    return left


def test_the_temporary_file_of_a_killed_writer_is_removed_at_once_and_nothing_else(tmp_path):
    figures = tmp_path / "out" / "figures"
    figures.mkdir(parents=True)
    write_bytes_atomic(figures / "flatness_stem.pdf", b"the old figure")
    mine = [figures / ".notes.tmp", figures / "draft.tmp", figures / ".flatness_stem.pdf.tmp"]  # not the writer's
    for path in mine:
        path.write_bytes(b"keep me")
    left = kill_a_writer(figures / "flatness_stem.pdf")
    assert left.name.startswith(".flatness_stem.pdf.") and left.read_bytes() == b"half a figure"
    assert remove_stale_temporaries(tmp_path / "out") == [left]
    assert listing(figures) == {"flatness_stem.pdf": b"the old figure", **{p.name: b"keep me" for p in mine}}


def test_a_live_writers_temporary_file_is_left_alone(tmp_path):
    """Another process of this machine, still running, writing into the same folder."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tmp = tmp_path / f".metrics.json.{files._host_tag()}-{live.pid}.abcd1234.tmp"
        tmp.write_bytes(b"being written")
        assert remove_stale_temporaries(tmp_path) == [] and tmp.exists()
    finally:
        live.kill()
        live.wait()
    assert remove_stale_temporaries(tmp_path) == [tmp] and not tmp.exists()


@pytest.mark.parametrize("name", [".figure.png.abcd1234.tmp", ".figure.png.fedcba-12345.abcd1234.tmp"])
def test_a_temporary_file_whose_writer_cannot_be_checked_is_removed_only_after_a_day(tmp_path, name):
    """Named before names held a process id, or by another machine sharing the folder (another host tag)."""
    tmp = tmp_path / name
    tmp.write_bytes(b"half")
    assert files._host_tag() != "fedcba"
    assert remove_stale_temporaries(tmp_path) == [] and tmp.exists()
    hour = 3600
    os.utime(tmp, (time.time() - 23 * hour, time.time() - 23 * hour))
    assert remove_stale_temporaries(tmp_path) == [] and tmp.exists()
    os.utime(tmp, (time.time() - 25 * hour, time.time() - 25 * hour))
    assert remove_stale_temporaries(tmp_path) == [tmp] and not tmp.exists()


def test_removing_temporaries_from_a_missing_folder_does_nothing(tmp_path):
    assert remove_stale_temporaries(tmp_path / "never made") == []
