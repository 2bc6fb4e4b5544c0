"""Atomic outputs: a failed write never leaves a half-written result and never loses the old one."""

from __future__ import annotations

import os
import stat

import pytest

from vlmexport.core.atomic import atomic_directory, atomic_file


def leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}"))


def umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_directory_appears_only_on_success(tmp_path):
    out = tmp_path / "sub" / "bundle"
    with atomic_directory(out) as tmp:
        assert tmp.parent == out.parent and tmp != out
        (tmp / "a.txt").write_text("a")
        (tmp / "nested").mkdir()
        (tmp / "nested" / "b.txt").write_text("b")
        assert not out.exists()  # nothing at the final path while writing
    assert (out / "a.txt").read_text() == "a" and (out / "nested" / "b.txt").read_text() == "b"
    assert leftovers(out.parent, "bundle") == []
    # normal permissions, not mkdtemp's 0700
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask()
    assert stat.S_IMODE((out / "a.txt").stat().st_mode) == 0o666 & ~umask()


def test_directory_replaces_an_existing_one(tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_directory(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert leftovers(tmp_path, "bundle") == []


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_keeps_the_previous_directory(tmp_path, exc):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(type(exc)):
        with atomic_directory(out) as tmp:
            (tmp / "half.txt").write_text("half")
            raise exc
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert (out / "old.txt").read_text() == "old"
    assert leftovers(tmp_path, "bundle") == []


def test_failure_without_previous_directory_leaves_nothing(tmp_path):
    out = tmp_path / "bundle"
    with pytest.raises(ValueError):
        with atomic_directory(out):
            raise ValueError
    assert list(tmp_path.iterdir()) == []


def test_file_replaced_only_on_success(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"old")
    with pytest.raises(OSError):
        with atomic_file(path) as tmp:
            tmp.write_bytes(b"half")
            raise OSError("disk full")
    assert path.read_bytes() == b"old"
    assert leftovers(tmp_path, "weights.bin") == []
    with atomic_file(path) as tmp:
        assert tmp != path and tmp.parent == path.parent
        tmp.write_bytes(b"new")
        assert path.read_bytes() == b"old"
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask()
    assert leftovers(tmp_path, "weights.bin") == []


def test_file_in_a_new_directory(tmp_path):
    path = tmp_path / "a" / "b" / "x.json"
    with atomic_file(path) as tmp:
        tmp.write_text("{}")
    assert path.read_text() == "{}"


def test_a_sigterm_whose_exception_python_drops_still_stops_the_publish(tmp_path):
    """A signal handler's exception raised while Python runs a callback (here a weakref's; in CI
    an import lock's) is printed and dropped. The handler also asks for a stop, so the atomic
    output is not published: what was at the path stays, and the job ends as terminated."""
    import gc
    import os
    import signal
    import weakref

    from vlmexport import cli
    from vlmexport.core import atomic

    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("previous")
    previous = signal.signal(signal.SIGTERM, cli._raise_terminated)
    atomic.clear_stop()

    class Victim:
        pass

    v = Victim()
    ref = weakref.ref(v, lambda _: os.kill(os.getpid(), signal.SIGTERM) or sum(range(10**5)))  # noqa: F841
    try:
        with pytest.raises(atomic.Terminated):
            with atomic.atomic_directory(out) as tmp:
                (tmp / "new").write_text("new")
                del v
                gc.collect()  # the callback receives the signal; its Terminated is dropped
                sum(range(10**5))
    finally:
        signal.signal(signal.SIGTERM, previous)
        atomic.clear_stop()
    assert sorted(p.name for p in out.iterdir()) == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_stop_after_the_work_ends_the_command_as_terminated_and_is_cleared(capsys):
    """A dropped SIGTERM noticed only when the command returns: exit 143, saying the output is
    complete; the flag is cleared on the way out, so later atomic writes in the process publish."""
    import typer

    from vlmexport import cli
    from vlmexport.core import atomic

    @cli.friendly_errors
    def command():
        atomic.request_stop()  # as the handler does when Python drops its exception
        return "done"

    with pytest.raises(typer.Exit) as e:
        command()
    assert e.value.exit_code == 143 and not atomic.stop_requested()
    assert "its output is complete" in capsys.readouterr().err
