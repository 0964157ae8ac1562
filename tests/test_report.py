"""The run report (report.py): its numbers checked against the run's own data, the page
checked in a real browser (headless Chromium), the live page (--serve), following a
call's output (logs --follow, future.log(follow=True)), and the Jupyter summary."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import wait_until

from slurmexecutor.folder import spool
from slurmexecutor.reports import report
from slurmexecutor.reports.report_html import render

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def square(x):
    return x * x


def fail_loudly(message):
    print(f"about to fail: {message}", flush=True)
    raise ValueError(message)


def kill_own_task_once(once, value):
    """SIGKILL the whole array task the first time (it ends FAILED); later: `value`."""
    if not Path(once).exists():
        Path(once).write_text("killed")
        os.killpg(0, signal.SIGKILL)
        time.sleep(60)  # not reached
    return value


def chatty(go, lines):
    for i in range(lines):
        print(f"line {i}", flush=True)
        if i == 0:  # wait for the test to start following
            deadline = time.monotonic() + 60
            while not Path(go).exists() and time.monotonic() < deadline:
                time.sleep(0.02)
    return lines


def wait_for(go, value):
    deadline = time.monotonic() + 120
    while not Path(go).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


def slow(x, seconds):
    time.sleep(seconds)
    return x


def browser(url: str, tmp_path: Path, name: str) -> tuple[str, str]:
    """Open `url` in headless Chromium: (the DOM after its scripts ran, console output);
    a screenshot is saved as tmp_path/NAME.png."""
    assert CHROMIUM, "chromium is not installed (bash scripts/bootstrap.sh test installs it)"
    runs = []
    for extra in (["--dump-dom", "--enable-logging=stderr", "--v=0"],
                  [f"--screenshot={tmp_path / (name + '.png')}", "--window-size=1400,1000"]):
        profile = tmp_path / f"chromium-{name}-{len(runs)}"  # a new, empty profile
        done = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                               *extra, url], capture_output=True, text=True, timeout=120,
                              check=False, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(done)
    assert (tmp_path / f"{name}.png").stat().st_size > 10_000
    return runs[0].stdout, runs[0].stderr


def dump_after(url: str, tmp_path: Path, seconds: float) -> tuple[str, str]:
    """The DOM of `url` after `seconds` of the page's (virtual) time, and the console."""
    done = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'later'}",
                           f"--virtual-time-budget={int(seconds * 1000)}", "--dump-dom",
                           "--enable-logging=stderr", "--v=0", url], capture_output=True,
                          text=True, timeout=120, check=False, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, done.stderr


#: appended to a page by the tests only: per uPlot canvas, "chart-id:WxH:painted pixels"
PROBE = """<script>(function(){var out=[];document.querySelectorAll('.chart canvas')
.forEach(function(c){var d=c.getContext('2d').getImageData(0,0,c.width,c.height).data,n=0;
for(var i=3;i<d.length;i+=4){if(d[i])n++;}out.push(c.closest('.chart').id+':'+c.width+'x'
+c.height+':'+n);});var p=document.createElement('pre');p.id='probe';
p.textContent=out.join(' ');document.body.appendChild(p);})();</script>"""


def drawn_charts(dom: str) -> dict[str, tuple[int, int, int]]:
    """What PROBE found: chart id -> (canvas width, height, painted pixels)."""
    found = re.search(r'<pre id="probe">([^<]*)</pre>', dom)
    assert found, "the probe did not run"
    return {name: (int(w), int(h), int(n)) for name, w, h, n in
            re.findall(r"(\S+):(\d+)x(\d+):(\d+)", found.group(1))}


def assert_self_contained(text: str) -> None:
    """Nothing is fetched when the page is viewed: no external script, style or image."""
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert not re.search(r"@import|url\(\s*['\"]?(https?:)?//|fetch\(['\"]http", text)
    assert "<script src" not in text and "<link" not in text


def console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines()
            if "Uncaught" in line or ("CONSOLE" in line and "ERROR" in line.upper()
                                      and "source: " in line)]


def test_report_shows_a_failure_a_retried_task_and_warm_joins(make_executor, tmp_path):
    ex = make_executor(keep_alive=60, max_retries=1, retry_on=("FAILED",))
    once = tmp_path / "once"
    retried = ex.submit(kill_own_task_once, str(once), 7)
    assert retried.result(timeout=180) == 7 and retried.attempts == 2
    failed = ex.submit(fail_loudly, "boom")  # joins the warm task of the retry
    assert isinstance(failed.exception(timeout=120), ValueError)
    assert ex.submit(square, 3).result(timeout=120) == 9  # joins it again

    data = report.read_report(ex.run_dir)
    journals = spool.read_journals(ex.run_dir)
    assert data.total == 3 and data.counts["done"] == 2 and data.counts["failed"] == 1
    assert data.retried == 1  # the killed task's call, run again by a retry batch
    assert [b["batch"] for b in data.batches] == [j["batch"] for j in journals]
    assert data.batches[1]["kind"] == "retry" and data.batches[1]["attempt"] == 2
    killed = next(row for row in data.rows if row.label == "0.0")
    assert killed.state in ("FAILED", "lost")
    assert any(span.lost and data.rows[span.row] is killed for span in data.spans)
    assert data.warm_joins == 2 and all(row.warm for row in data.rows[-2:])
    assert sum(row.queued is not None for row in data.rows) == 2  # sbatch'ed tasks only
    assert data.timed_calls == 3  # the killed execution recorded no time
    assert sorted(call for _, call, _, _ in data.slowest) == [0, 1, 2]
    [group] = data.failures
    assert (group.kind, group.count, group.calls) == ("ValueError", 1, [failed.call_id])
    assert "about to fail: boom" in group.tail
    assert group.command == f"slurmexecutor logs {ex.run_id} {failed.call_id}"
    assert sum(node["tasks"] for node in data.nodes) == len(data.rows)
    assert sum(node["failed"] for node in data.nodes) == 1
    assert sum(node["lost"] for node in data.nodes) == 1  # the killed task
    assert data.job_ids == sorted({a["job_id"] for j in journals for a in j["arrays"]},
                                  key=lambda job: (len(job), job))

    from slurmexecutor.reports.callwatch import CallWatch

    for future in (retried, failed):  # logs --follow finds the log of a retry, a warm join
        watch = CallWatch(ex.run_dir, ex.key, future.call_id)
        assert watch.poll() and watch.log_path == future.log_path, (watch.log_path,
                                                                     future.log_path)

    page = tmp_path / "run.html"
    page.write_text(render(data))
    assert_self_contained(page.read_text())
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom, console = browser(probed.as_uri(), tmp_path, "report")
    charts = drawn_charts(dom)  # uPlot drew each chart: a sized canvas with pixels on it
    assert set(charts) == {"chart-progress", "chart-histogram", "chart-batches",
                           "chart-nodes"}, charts
    assert all(w >= 300 and h >= 100 and painted > 1000
               for w, h, painted in charts.values()), charts
    assert dom.count('class="uplot') == 4
    timeline = dom[dom.index("id=\"timeline\""):dom.index("id=\"durations\"")]
    assert timeline.count("<rect") >= len(data.rows) + 3
    assert "waited" in timeline and "ended (" in timeline  # queue wait, the lost chunk
    failures = dom[dom.index("id=\"failures\""):dom.index("id=\"settings\"")]
    assert "ValueError" in failures and "about to fail: boom" in failures
    assert f"slurmexecutor logs {ex.run_id} {failed.call_id}" in failures
    assert not console_errors(console), console


def test_report_command_writes_one_file(make_executor, tmp_path, capsys):
    from slurmexecutor.apps.cli import main

    ex = make_executor()
    assert list(ex.map(square, range(20))) == [x * x for x in range(20)]
    out = tmp_path / "r.html"
    assert main(["--folder", str(ex.folder), "report", ex.run_id[:12], "-o", str(out)]) == 0
    assert f"-> {out}" in capsys.readouterr().out
    text = out.read_text()
    assert "id='timeline-svg'" in text and "class='chart'" in text
    assert_self_contained(text)
    assert re.search(r"id='done'>20<", text)


def read_done(url: str) -> int:
    with urllib.request.urlopen(url, timeout=30) as answer:
        page = answer.read().decode()
    found = re.search(r"id='done'>(\d+)<", page)
    return int(found.group(1)) if found else -1


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_serve_answers_on_localhost_and_the_done_count_grows(make_executor, tmp_path):
    ex = make_executor(chunksize=1)
    futures = [ex.submit(slow, i, 0.3) for i in range(40)]
    server = subprocess.Popen(
        [sys.executable, "-m", "slurmexecutor", "--folder", str(ex.folder), "report",
         ex.run_id, "--serve", "--port", "0"], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    try:
        line = server.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", line).group(0)
        assert "ssh -L" in line
        first = read_done(url)
        assert first >= 0
        assert wait_until(lambda: read_done(url) > first, timeout=120, interval=0.5)
        dom, console = browser(url, tmp_path, "live")
        assert "id=\"timeline\"" in dom and not console_errors(console), console
        assert dom.count('class="uplot') >= 2  # the progress and batches charts at least
        assert ex.report_url().startswith("http://127.0.0.1:")
        assert read_done(ex.report_url()) >= 0
        served = []  # the live page reloads its report in place and redraws its charts
        page = ex._report_server.page
        ex._report_server.page = lambda: served.append(1) or page()
        dom, console = dump_after(ex.report_url(), tmp_path, 5)
        assert len(served) >= 2 and dom.count('class="uplot') >= 2, (len(served), dom[-3000:])
        assert dom.count('id="report"') == 1 and not console_errors(console), console
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
    assert [f.result(timeout=120) for f in futures] == list(range(40))
    assert "done" in ex._repr_html_() and "40" in ex._repr_html_()


def test_a_calls_output_can_be_followed(make_executor, tmp_path, capsys):
    from slurmexecutor.apps.cli import main

    ex = make_executor()
    go = tmp_path / "go"
    future = ex.submit(chatty, str(go), 5)
    lines = future.log(follow=True)
    assert next(lines) == "line 0\n"  # printed while the call waits for `go`
    assert not future.done()
    go.touch()
    assert list(lines) == [f"line {i}\n" for i in range(1, 5)]
    assert future.result(timeout=60) == 5
    assert main(["--folder", str(ex.folder), "logs", ex.run_id, str(future.call_id),
                 "--follow"]) == 0
    assert capsys.readouterr().out == "".join(f"line {i}\n" for i in range(5))


def test_uplot_is_vendored_pinned_and_shipped():
    """The report's plotting library is the pinned uPlot release (scripts/vendor_uplot.py
    checks the tarball's and each file's sha256), shipped as package data."""
    import configparser
    import hashlib
    import importlib.util

    from slurmexecutor.reports import report_charts

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("vendor_uplot", root / "scripts" /
                                                  "vendor_uplot.py")
    assert spec and spec.loader
    vendor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vendor)
    for name, digest in vendor.FILE_SHA256.items():
        assert hashlib.sha256((report_charts.VENDOR / name).read_bytes()).hexdigest() == digest
    assert (report_charts.VENDOR / "VERSION").read_text().strip() == vendor.VERSION
    assert "MIT" in (report_charts.VENDOR / "LICENSE").read_text()
    setup = configparser.ConfigParser()
    setup.read(root / "setup.cfg")
    assert "reports/vendor/*" in setup["options.package_data"]["slurmexecutor"]
    script, style = report_charts.assets()
    assert f"(v{vendor.VERSION})" in script and ".uplot" in style
    head = report_charts.head()
    assert head.count("<script>") == 1 and "</script" not in script


def test_a_run_shows_a_summary_with_its_progress(make_executor, tmp_path):
    from slurmexecutor.reports import runs

    ex = make_executor()
    assert [f.result(timeout=120) for f in [ex.submit(square, i) for i in range(3)]] == [
        0, 1, 4]
    assert isinstance(ex.submit(fail_loudly, "x").exception(timeout=120), ValueError)
    go = tmp_path / "go"
    blocked = ex.submit(wait_for, str(go), 5)
    assert wait_until(blocked.running, timeout=120)
    page = runs.read_run(ex.run_dir, ex.key)._repr_html_()
    assert "3 done, 1 failed, 1 in flight of 5 calls (80% finished)" in page, page
    assert "live" in page and "width:80.0%" in page and "#d62728" in page  # red: a failure
    go.touch()
    assert blocked.result(timeout=120) == 5
    ex.shutdown()
    page = runs.read_run(ex.run_dir, ex.key)._repr_html_()
    assert "4 done, 1 failed of 5 calls (100% finished)" in page, page
    assert "finished)" in page and "live" not in page and "width:100.0%" in page
    assert "4 done, 1 failed of 5 calls" in ex._repr_html_()


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_report_url_is_served_until_the_executor_shuts_down(make_executor):
    ex = make_executor()
    assert ex.submit(square, 2).result(timeout=60) == 4
    url = ex.report_url()
    assert ex.report_url() == url  # one server per executor, started by the first call
    assert read_done(url) == 1
    ex.shutdown()
    with pytest.raises(OSError):  # URLError: nothing listens on its port any more
        urllib.request.urlopen(url, timeout=10)
    with pytest.raises(RuntimeError, match="shut down"):
        ex.report_url()


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_following_a_call_reads_the_run_incrementally(make_executor, tmp_path, monkeypatch):
    """`logs RUN CALL --follow` never reads the run whole (runs.read_run) while it polls:
    only what was appended to the streams of the call's batch, each byte once."""
    import io
    import threading

    from slurmexecutor.apps.cli import main
    from slurmexecutor.reports import callwatch, runs

    ex = make_executor(chunksize=1)
    assert list(ex.map(square, range(50))) == [x * x for x in range(50)]  # another batch
    go = tmp_path / "go"
    future = ex.submit(chatty, str(go), 5)
    assert wait_until(future.running, timeout=120)  # in a batch: its journal names it
    watches = []

    class Counted(callwatch.CallWatch):
        def __init__(self, *args) -> None:
            super().__init__(*args)
            self.polls = 0
            watches.append(self)

        def poll(self) -> bool:
            self.polls += 1
            return super().poll()

    def whole_run(*args, **kwargs):
        raise AssertionError("logs --follow read the whole run")

    monkeypatch.setattr(callwatch, "CallWatch", Counted)
    monkeypatch.setattr(runs, "read_run", whole_run)
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    codes = []
    follower = threading.Thread(target=lambda: codes.append(main([
        "--folder", str(ex.folder), "logs", ex.run_id, str(future.call_id), "--follow"])))
    follower.start()
    assert wait_until(lambda: "line 0\n" in out.getvalue(), timeout=120)
    go.touch()
    follower.join(timeout=120)
    assert codes == [0] and out.getvalue() == "".join(f"line {i}\n" for i in range(5))
    assert future.result(timeout=60) == 5
    [watch] = watches
    assert watch.finished and watch.polls >= 2
    batch = future.chunk[0]
    streams = list(spool.batch_dir(ex.run_dir, batch).glob("t*.out"))
    assert {path.parent for path in watch._cursors} == {spool.batch_dir(ex.run_dir, batch)}
    assert 0 < watch.bytes_read <= sum(path.stat().st_size for path in streams)
