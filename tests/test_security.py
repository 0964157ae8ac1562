"""Two users in one group: nobody else's code runs as you, and their folders are refused.

Set-up (as root): a group `sxproj` with users `sxalice` (2001) and `sxmallory` (2002);
each runs Python through `setpriv`. The system interpreter gets copies of our
dependencies, since the test's own interpreter lives under /root (not readable by them).
"""

from __future__ import annotations

import grp
import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import cluster

import slurmexecutor

REPO = Path(slurmexecutor.__file__).resolve().parent.parent
GROUP, USERS = "sxproj", {"sxalice": 2001, "sxmallory": 2002}
SYSTEM_PYTHON = "/usr/bin/python3"

CLIENT = """
import sys
from slurmexecutor import SlurmExecutor
try:
    with SlurmExecutor(sys.argv[1], backend=sys.argv[2], keep_alive=0,
                       poll_interval=0.1) as ex:
        print("RESULT", ex.submit(abs, -3).result(timeout=120))
except PermissionError as error:
    print("REFUSED", error)
"""
EVIL = "import os\nopen(os.environ['PWNED_AT'] + '/' + str(os.getuid()), 'w').close()\n"


def ensure_user(name: str, uid: int, gid: int) -> None:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-M", "-N", "-u", str(uid), "-g", str(gid),
                        "-s", "/usr/sbin/nologin", name], check=True)
        return
    assert entry.pw_uid == uid and entry.pw_gid == gid, f"user {name} exists otherwise"


@pytest.fixture(scope="module")
def users():
    """Two users in one group, a world-readable base folder, and our dependencies where
    the system Python of those users can import them."""
    if os.getuid() != 0 or not Path(SYSTEM_PYTHON).exists():
        pytest.skip("needs root (useradd, setpriv) and /usr/bin/python3")
    try:
        gid = grp.getgrnam(GROUP).gr_gid
    except KeyError:
        subprocess.run(["groupadd", GROUP], check=True)
        gid = grp.getgrnam(GROUP).gr_gid
    for name, uid in USERS.items():
        ensure_user(name, uid, gid)
    base = Path(tempfile.mkdtemp(prefix="sx-two-users-"))
    base.chmod(0o755)
    site = base / "site"
    for module in ("cloudpickle", "tqdm"):
        source = Path(__import__(module).__file__).parent
        shutil.copytree(source, site / module, ignore=shutil.ignore_patterns("__pycache__"))
    (base / "pwned").mkdir(mode=0o777)
    (base / "pwned").chmod(0o777)
    yield {"base": base, "gid": gid, "site": site}
    shutil.rmtree(base, ignore_errors=True)


def run_as(users: dict, name: str, *args: str, code: str = CLIENT) -> str:
    env = {"PATH": os.environ["PATH"], "HOME": str(users["base"]),
           "PYTHONPATH": f"{REPO}:{users['site']}", "PWNED_AT": str(users["base"] / "pwned")}
    if "SLURM_CONF" in users:
        env["SLURM_CONF"] = users["SLURM_CONF"]
    done = subprocess.run(
        ["setpriv", f"--reuid={USERS[name]}", f"--regid={users['gid']}", "--init-groups",
         SYSTEM_PYTHON, "-c", code, *args], env=env, capture_output=True, text=True,
        timeout=300, cwd=users["base"], check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def as_user(path: Path, name: str, mode: int) -> Path:
    os.chown(path, USERS[name], -1, follow_symlinks=False)
    if not path.is_symlink():
        path.chmod(mode)
    return path


@pytest.fixture(scope="module")
def their_cluster(users):
    """A Slurm cluster of its own whose configuration and munge socket the two users can
    reach (the session cluster's folder is root's only)."""
    directory = users["base"] / "cluster"
    cluster("up", directory)
    yield directory / "slurm.conf"
    cluster("down", directory)


@pytest.mark.parametrize("backend", ["local", pytest.param("slurm", marks=pytest.mark.slurm)])
def test_a_planted_package_link_never_runs(users, backend, request):
    """Alice's folder was group-writable (umask 002); Mallory planted the package link of
    an old layout. Refused until Alice fixes the mode; then her calls run her package."""
    if backend == "slurm":
        users = {**users, "SLURM_CONF": str(request.getfixturevalue("their_cluster"))}
    base = users["base"]
    folder = as_user(Path(tempfile.mkdtemp(dir=base, prefix="alice-")), "sxalice", 0o2770)
    os.chown(folder, USERS["sxalice"], users["gid"])
    evil = base / f"evil-{folder.name}" / "slurmexecutor"
    evil.mkdir(parents=True)
    (evil / "__init__.py").write_text(EVIL)
    (evil / "worker.py").write_text(EVIL)
    # where releases up to 0.x linked the package: <folder>/.pythonpath/<tag>/
    tag = hashlib.sha256(str(REPO / "slurmexecutor").encode()).hexdigest()[:12]
    planted = folder / ".pythonpath" / tag
    planted.mkdir(parents=True)
    (planted / "slurmexecutor").symlink_to(evil)
    for path in (planted.parent, planted, planted / "slurmexecutor"):
        as_user(path, "sxmallory", 0o2775)
    out = run_as(users, "sxalice", str(folder), backend)
    assert out.startswith("REFUSED") and str(folder) in out, out
    assert "writable by group or others" in out and "chmod go-w" in out, out
    assert folder.stat().st_mode & 0o777 == 0o770  # refused, not chmodded
    assert sorted(path.name for path in folder.iterdir()) == [".pythonpath"]
    folder.chmod(0o2750)  # the fix the error names
    out = run_as(users, "sxalice", str(folder), backend)
    assert out.strip() == "RESULT 3", out
    [meta] = [json.loads(p.read_text()) for p in folder.glob("*/run.json")]
    assert meta["backend"] == backend
    assert not list((base / "pwned").iterdir())  # Mallory's package never ran


def test_a_symlinked_folder_of_another_user_is_refused(users):
    base = users["base"]
    sticky = Path(tempfile.mkdtemp(dir=base, prefix="tmp-"))
    sticky.chmod(0o1777)  # like /tmp
    (sticky / "mallory-runs").mkdir()
    theirs = as_user(sticky / "mallory-runs", "sxmallory", 0o777)
    link = sticky / "alice-runs"
    link.symlink_to(theirs)
    as_user(link, "sxmallory", 0)
    out = run_as(users, "sxalice", str(link), "local")
    assert out.startswith("REFUSED") and str(link) in out and "symbolic link" in out, out
    out = run_as(users, "sxalice", str(theirs / "alice"), "local")
    assert out.startswith("REFUSED") and str(theirs) in out, out
    assert "belongs to another user" in out, out
    assert not list(theirs.iterdir())  # nothing of Alice's in Mallory's folder
    assert theirs.stat().st_mode & 0o777 == 0o777


def test_another_users_folder_and_runs_are_refused(users):
    base = users["base"]
    home = as_user(Path(tempfile.mkdtemp(dir=base, prefix="alice-home-")), "sxalice", 0o755)
    out = run_as(users, "sxalice", str(home / "runs"), "local")
    assert out.strip() == "RESULT 3", out
    runs = home / "runs"
    assert runs.stat().st_mode & 0o777 == 0o700
    out = run_as(users, "sxmallory", str(runs), "local")
    assert out.startswith("REFUSED") and str(runs) in out, out
    listing = run_as(users, "sxmallory", str(runs), code=(
        "import sys, os\ntry:\n    print(os.listdir(sys.argv[1]))\n"
        "except PermissionError:\n    print('DENIED')\n"))
    assert listing.strip() == "DENIED"


def test_a_group_writable_parent_is_refused(users):
    base = users["base"]
    project = Path(tempfile.mkdtemp(dir=base, prefix="project-"))
    os.chown(project, 0, users["gid"])
    project.chmod(0o2775)  # a setgid project folder: Mallory may rename what is in it
    out = run_as(users, "sxalice", str(project / "alice" / "runs"), "local")
    assert out.startswith("REFUSED") and str(project) in out, out
    assert "writable by group or others" in out, out
    assert not list(project.iterdir())


def test_a_link_in_a_group_writable_folder_is_refused(users):
    """Alice's own link to her own folder, but in a folder Mallory may write: Mallory
    could replace the link (and the path stays in use as given), so it is refused."""
    base = users["base"]
    project = Path(tempfile.mkdtemp(dir=base, prefix="project-"))
    os.chown(project, 0, users["gid"])
    project.chmod(0o2775)
    home = as_user(Path(tempfile.mkdtemp(dir=base, prefix="alice-home-")), "sxalice", 0o700)
    link = project / "alice"
    link.symlink_to(home)
    as_user(link, "sxalice", 0)
    out = run_as(users, "sxalice", str(link / "runs"), "local")
    assert out.startswith("REFUSED") and str(project) in out, out
    assert "writable by group or others" in out, out
    assert not list(home.iterdir())
    out = run_as(users, "sxalice", str(home / "runs"), "local")  # the real path is fine
    assert out.strip() == "RESULT 3", out


def test_a_link_held_by_a_group_writable_folder_reached_through_a_link_is_refused(
        tmp_path):
    """`home -> real` and `real/scr -> target`, with `real` group-writable: the path
    `home/scr/...` passes no group-writable folder by name, yet whoever may write `real`
    may replace `scr`."""
    from slurmexecutor.folder.folders import UnsafeFolderError, ensure_private_dir

    real, target = tmp_path / "real", tmp_path / "target"
    real.mkdir()
    real.chmod(0o775)
    target.mkdir(mode=0o700)
    (tmp_path / "home").symlink_to(real)
    (real / "scr").symlink_to(target)
    with pytest.raises(UnsafeFolderError, match=f"{real} is writable by group"):
        ensure_private_dir(tmp_path / "home" / "scr" / "runs")
    assert not (target / "runs").exists()
    real.chmod(0o755)
    assert ensure_private_dir(tmp_path / "home" / "scr" / "runs").is_dir()


def test_the_worker_path_is_verified(tmp_path):
    """A link in the run's package folder that points elsewhere is replaced; anything
    else there is refused."""
    from slurmexecutor.schedulers.script import link_package, python_path_dir

    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    folder = python_path_dir(run)
    folder.mkdir(mode=0o700)
    (folder / "slurmexecutor").symlink_to(tmp_path)
    link_package(run)
    assert (folder / "slurmexecutor").resolve() == REPO / "slurmexecutor"
    (folder / "evil.pth").write_text("import os")
    with pytest.raises(PermissionError, match="must hold only"):
        link_package(run)
    assert sys.modules["slurmexecutor"].__file__ is not None


# -- the client's sys.path on the workers ------------------------------------------------


def test_only_safe_existing_sys_path_entries_are_shipped(tmp_path, monkeypatch, caplog):
    from slurmexecutor.owner import batches

    good, loose = tmp_path / "good", tmp_path / "loose"
    for path in (good, loose):
        path.mkdir(mode=0o700)
    loose.chmod(0o777)
    monkeypatch.setattr(sys, "path", ["", ".", str(tmp_path / "missing"), str(loose),
                                      str(good), "good"])
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("WARNING", logger="slurmexecutor"):
        assert batches.shipped_sys_path() == [str(good), str(good)]
        batches.shipped_sys_path()
    warnings = [r.getMessage() for r in caplog.records if "not shipped" in r.getMessage()]
    assert len(warnings) == 1 and str(loose) in warnings[0]
    assert "writable by group or others" in warnings[0]


def import_helper(name: str) -> int:
    return __import__(name).VALUE


def test_the_working_directory_ships_only_when_asked(make_executor, tmp_path, monkeypatch):
    """A module next to the user (`''` on sys.path, as with `python -c` or a notebook)
    is not importable on the workers until its folder is put on sys.path by name; one in
    a folder others may write is never imported there."""
    here, loose = tmp_path / "here", tmp_path / "loose"
    here.mkdir()
    loose.mkdir(mode=0o777)
    loose.chmod(0o777)
    (here / "next_to_me.py").write_text("VALUE = 7\n")
    (loose / "in_a_loose_folder.py").write_text("VALUE = 8\n")
    monkeypatch.chdir(here)
    monkeypatch.syspath_prepend(str(loose))
    monkeypatch.setattr(sys, "path", ["", *sys.path])
    ex = make_executor()
    error = ex.submit(import_helper, "next_to_me").exception(timeout=120)
    assert isinstance(error, ModuleNotFoundError), error
    error = ex.submit(import_helper, "in_a_loose_folder").exception(timeout=120)
    assert isinstance(error, ModuleNotFoundError), error
    monkeypatch.syspath_prepend(str(here))
    assert ex.submit(import_helper, "next_to_me").result(timeout=120) == 7


def test_the_environments_pythonpath_reaches_the_workers_only_where_safe(
        make_executor, tmp_path, monkeypatch, caplog):
    """PYTHONPATH as the client's environment has it is not passed on as it is: an entry
    others may write, or an empty one (a trailing colon: the job's working directory,
    here a folder others may write), never comes before site-packages on the workers
    (and the client says so); a safe entry still does, also one of another account that
    only it can write (a module's software tree)."""
    mine, loose, software = tmp_path / "mine", tmp_path / "loose", tmp_path / "software"
    mine.mkdir(mode=0o700)
    loose.mkdir(mode=0o777)
    loose.chmod(0o777)
    software.mkdir(mode=0o755)
    (mine / "kept_module.py").write_text("VALUE = 5\n")
    (loose / "planted_module.py").write_text("VALUE = 'planted'\n")
    (software / "site_module.py").write_text("VALUE = 6\n")
    os.chown(software, 65534, 65534)  # nobody's
    monkeypatch.chdir(loose)
    monkeypatch.setenv("PYTHONPATH", f"{mine}:{os.environ.get('PYTHONPATH', '')}:{loose}:"
                                     f"{software}:")
    with caplog.at_level("WARNING", logger="slurmexecutor"):
        ex = make_executor()
        assert ex.submit(import_helper, "kept_module").result(timeout=120) == 5
    assert ex.submit(import_helper, "site_module").result(timeout=120) == 6
    error = ex.submit(import_helper, "planted_module").exception(timeout=120)
    assert isinstance(error, ModuleNotFoundError), error
    [warning] = [r.getMessage() for r in caplog.records if "PYTHONPATH" in r.getMessage()]
    assert f"{loose} (is writable by group or others)" in warning, warning
    assert "an empty entry (the job's working directory)" in warning, warning
