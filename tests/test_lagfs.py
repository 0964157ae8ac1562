"""scripts/lagfs.py, the login node's lagging view of a shared folder, alone and in a cluster.

Others' changes to REAL show through MNT only LAG seconds later; the client's own writes
through MNT reach REAL and show through MNT at once. The last test starts the whole topology
with `slurm_cluster.py up --shared/--mount/--lag`: jobs write REAL at MNT in their nodes' mount
namespaces, and this process sees their files at MNT only after the lag. Every mount and
daemon is stopped after use, even when a test fails.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAGFS = REPO / "scripts" / "lagfs.py"
CLUSTER_SCRIPT = REPO / "scripts" / "slurm_cluster.py"
LAG = 2.0
#: How much later than LAG a change may show (polling, process start-up on a busy host).
SLACK = 2.5


def mounted(path: Path) -> bool:
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return str(path) in points


def force_unmount(path: Path) -> None:
    for command in (["fusermount3", "-u", "-z"], ["umount", "-l"]):
        if mounted(path) and shutil.which(command[0]):
            subprocess.run([*command, str(path)], capture_output=True, check=False, timeout=30)


def require_fuse() -> None:
    """FUSE is part of the test setup (scripts/bootstrap.sh test): fail loudly without it."""
    missing = []
    if not Path("/dev/fuse").exists():
        missing.append("/dev/fuse")
    if importlib.util.find_spec("mfusepy") is None:
        missing.append("the mfusepy package")
    if missing:
        pytest.fail(f"lagfs needs {' and '.join(missing)}: run `bash scripts/bootstrap.sh test`",
                    pytrace=False)


def wait_for(predicate, timeout: float) -> float | None:
    """Poll `predicate`; the monotonic time it first held, or None after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(0.02)
    return None


def write_as_other(path: Path, data: str, mode: str = "w") -> tuple[float, float]:
    """Write REAL from another process (a compute node): the times before and after."""
    before = time.monotonic()
    subprocess.run([sys.executable, "-c", f"open({str(path)!r}, {mode!r}).write({data!r})"],
                   check=True, timeout=30)
    return before, time.monotonic()


def check_lag(shown: float | None, before: float, after: float) -> None:
    """A change made between `before` and `after` showed at `shown`: LAG later, not much more."""
    assert shown is not None, "the change never showed"
    assert shown - before >= LAG, f"shown {shown - before:.2f} s after the write began"
    assert shown - after <= LAG + SLACK, f"shown {shown - after:.2f} s after the write"


@pytest.fixture(scope="module")
def view(tmp_path_factory):
    """(REAL, MNT): lagfs mounted with LAG for this module, unmounted at its end."""
    require_fuse()
    base = tmp_path_factory.mktemp("lagfs")
    real, mnt = base / "real", base / "mnt"
    real.mkdir()
    mnt.mkdir()
    with open(base / "lagfs.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(LAGFS), str(real), str(mnt), "--lag", str(LAG)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    try:
        if wait_for(lambda: mounted(mnt) or proc.poll() is not None, 20) is None or \
                not mounted(mnt):
            pytest.fail(f"lagfs did not mount:\n{(base / 'lagfs.log').read_text()}")
        yield real, mnt
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # lagfs unmounts MNT and exits
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        force_unmount(mnt)
        assert not mounted(mnt), f"{mnt} is still mounted"
    assert proc.returncode == 0, (base / "lagfs.log").read_text()


def test_a_file_that_others_create_shows_only_after_the_lag(view):
    real, mnt = view
    before, after = write_as_other(real / "new", "from a node\n")
    assert (real / "new").exists()
    assert "new" not in os.listdir(mnt)
    with pytest.raises(FileNotFoundError):
        os.stat(mnt / "new")
    check_lag(wait_for(lambda: "new" in os.listdir(mnt), LAG + SLACK + 2), before, after)
    assert (mnt / "new").read_text() == "from a node\n"
    assert os.stat(mnt / "new").st_ino == os.stat(real / "new").st_ino


def test_bytes_that_others_append_show_only_after_the_lag(view):
    real, mnt = view
    (real / "stream").write_text("one\n")
    assert wait_for(lambda: (mnt / "stream").exists(), LAG + SLACK + 2) is not None
    with open(mnt / "stream", "rb") as reader:  # a reader that keeps its file open
        assert reader.read() == b"one\n"
        before, after = write_as_other(real / "stream", "two\n", "a")
        assert (real / "stream").read_text() == "one\ntwo\n"
        assert os.stat(mnt / "stream").st_size == 4  # attributes lag
        assert reader.read() == b""  # a file open since before is not revalidated
        shown = wait_for(lambda: os.stat(mnt / "stream").st_size == 8, LAG + SLACK + 2)
        check_lag(shown, before, after)
        assert reader.read() == b"two\n"
    assert (mnt / "stream").read_text() == "one\ntwo\n"


def test_a_file_its_writer_closed_shows_whole_when_opened(view):
    """NFS's close-to-open consistency: attributes and listings lag, but an open after
    the writer closed the file shows all it wrote (`--strict` turns this off)."""
    real, mnt = view
    (real / "closed").write_text("one\n")
    assert wait_for(lambda: (mnt / "closed").exists(), LAG + SLACK + 2) is not None
    write_as_other(real / "closed", "two\n", "a")  # appended, then closed
    assert os.stat(mnt / "closed").st_size == 4  # a stat does not revalidate
    assert (mnt / "closed").read_text() == "one\ntwo\n"  # an open does


def test_what_the_client_writes_through_the_view_shows_at_once(view):
    real, mnt = view
    run = mnt / "run"
    os.mkdir(run, 0o700)
    os.chmod(run, 0o700)
    info = os.stat(run)
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
    assert stat.S_IMODE(os.stat(real / "run").st_mode) == 0o700

    fd = os.open(run / "tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(b"whole\n")
    os.link(run / "tmp", run / "spec")  # appears whole, or not at all
    os.unlink(run / "tmp")
    assert sorted(entry.name for entry in os.scandir(run)) == ["spec"]
    assert (run / "spec").read_bytes() == b"whole\n"
    info = os.stat(run / "spec")
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.getuid()

    (run / "next").write_bytes(b"replaced\n")
    os.replace(run / "next", run / "spec")
    assert os.listdir(run) == ["spec"] and (run / "spec").read_bytes() == b"replaced\n"
    assert sorted(os.listdir(real / "run")) == ["spec"]

    fd = os.open(run / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, b"a\n")
        write_as_other(real / "run" / "log", "b\n", "a")  # another writer appends too
        os.write(fd, b"c\n")
    finally:
        os.close(fd)
    assert (real / "run" / "log").read_bytes() == b"a\nb\nc\n"  # O_APPEND: nothing lost
    assert (run / "log").read_bytes() == b"a\nb\nc\n"  # the client's write shows the file


def test_exclusive_create_is_decided_by_the_shared_folder(view):
    real, mnt = view
    fd = os.open(mnt / "claim", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    with pytest.raises(FileExistsError):
        os.open(mnt / "claim", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    # A name that another writer just created: not shown yet, but not free either.
    write_as_other(real / "taken", "")
    assert not (mnt / "taken").exists()
    with pytest.raises(FileExistsError):
        os.open(mnt / "taken", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_jobs_write_the_shared_folder_and_the_login_node_sees_it_late(tmp_path):
    require_fuse()
    if not shutil.which("sbatch") or not Path("/usr/sbin/slurmctld").exists():
        pytest.fail("Slurm is not installed (apt-get install -y slurm-wlm munge)", pytrace=False)
    directory, real, mnt = tmp_path / "c", tmp_path / "real", tmp_path / "mnt"
    env = {**os.environ, "SLURM_CONF": str(directory / "slurm.conf")}

    def cluster(*args: str) -> None:
        done = subprocess.run([sys.executable, str(CLUSTER_SCRIPT), *args],
                              capture_output=True, text=True, timeout=120, check=False,
                              stdin=subprocess.DEVNULL)
        assert done.returncode == 0, f"slurm_cluster.py {args[0]} failed:\n{done.stderr}"

    try:
        cluster("up", str(directory), "--nodes", "1", "--cpus", "2", "--shared", str(real),
                "--mount", str(mnt), "--lag", str(LAG))
        assert mounted(mnt)
        (mnt / "in").write_text("ping\n")  # the client's write reaches REAL at once
        assert (real / "in").read_text() == "ping\n"
        script = f"cat {mnt}/in > {mnt}/out.tmp && mv {mnt}/out.tmp {mnt}/out"
        subprocess.run(["sbatch", "--parsable", "-o", str(tmp_path / "job.out"), "--wrap", script],
                       env=env, check=True, capture_output=True, timeout=60)
        in_real = wait_for(lambda: (real / "out").exists(), 60)
        assert in_real is not None, f"the job wrote nothing: {list(real.iterdir())}"
        assert "out" not in os.listdir(mnt)
        shown = wait_for(lambda: "out" in os.listdir(mnt), LAG + SLACK + 2)
        assert shown is not None, "the job's file never showed at the login node"
        assert LAG - 0.2 <= shown - in_real <= LAG + SLACK, f"shown after {shown - in_real:.2f} s"
        assert (mnt / "out").read_text() == "ping\n"  # the job read what the client wrote
    finally:
        done = subprocess.run([sys.executable, str(CLUSTER_SCRIPT), "down", str(directory)],
                              capture_output=True, text=True, timeout=120, check=False,
                              stdin=subprocess.DEVNULL)
        force_unmount(mnt)
    assert done.returncode == 0, done.stderr
    assert not mounted(mnt), f"{mnt} is still mounted after down"
