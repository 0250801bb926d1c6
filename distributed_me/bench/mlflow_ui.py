"""``dme bench mlflow-ui``: is a sweep browsable in the MLflow UI, as a person would browse it? A browser check, not a
speed benchmark: it starts ``dme ui`` on the tracking store (a free port on 127.0.0.1), drives headless Chromium
(Debian's ``chromium`` package) over the DevTools protocol, and for each page waits until the rendered text names
what it should, then takes a screenshot:

1. the experiment's runs list, filtered to the sweep, showing its parent run (``sweep NAME``);
2. the parent run's page, whose description holds the summary table;
3. the parent run's artifacts with the report open (``report.md`` beside ``results.csv`` and ``plots``);
4. a child run's page (its readable name, its factors as params);
5. a child run's per-epoch metric charts;
6. a plot of the report (``report/plots/*.png``) in the artifact viewer.

Screenshots go to ``OUT/mlflow-ui/*.png`` and must not be blank (more than one colour, checked with PIL); what was
checked and how long each page took to show it, to ``OUT/mlflow-ui.json``. The sweep is ``quickstart`` unless
``DME_BENCH_SWEEP`` (or a ``--sweep`` option of ``dme bench``) names another; a sweep recorded before reports were
published to MLflow gets its report published first (recorded as ``published_now``).
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..errors import DmeError
from ..report import ARTIFACT_DIR, publish_report
from ..tracking import tracking_uri
from . import BENCHES, print_table

log = logging.getLogger(__name__)

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
PLOT = "fidelity_vs_budget_by_attack.png"
PAGE_TIMEOUT_S = 90.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
            raise DmeError(f"{what} exited with code {proc.returncode} before answering {url}: {err}")
        with suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        time.sleep(0.3)
    raise DmeError(f"{what} did not answer {url} within {timeout:.0f} s")


@contextmanager
def _ui() -> Any:
    """``dme ui`` on a free port (or the tracking server itself, when the store is one); yields its base URL."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        yield uri.rstrip("/")
        return
    port = _free_port()
    # `dme ui`'s own function in a process of its own (it owns signal handlers, and SIGTERM stops its server)
    code = ("import argparse, sys; from distributed_me.cli import cmd_ui; "
            f"sys.exit(cmd_ui(argparse.Namespace(port={port}, sweep=None)))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/health", 120, "dme ui", proc)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)  # dme ui stops its MLflow server's process group on SIGTERM
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


class Browser:
    """Headless Chromium driven over the DevTools protocol (one page): navigate, wait for text, screenshot, click."""

    def __init__(self, exe: str, size: tuple[int, int] = (1920, 1080)):
        from websockets.sync.client import connect

        self.profile = tempfile.mkdtemp(prefix="dme-chromium-")
        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             f"--window-size={size[0]},{size[1]}", "--remote-debugging-address=127.0.0.1",
             "--remote-debugging-port=0", f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = Path(self.profile) / "DevToolsActivePort"
        t0 = time.monotonic()
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() - t0 > 30:
                self.close()
                raise DmeError(f"{exe} did not start its DevTools endpoint")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
        self.ids = itertools.count(1)
        self.call("Page.enable")

    def call(self, method: str, **params: Any) -> dict:
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == i:
                if "error" in msg:
                    raise DmeError(f"Chromium {method}: {msg['error']}")
                return msg.get("result", {})

    def text(self) -> str:
        r = self.call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                      returnByValue=True)
        return r.get("result", {}).get("value") or ""

    def wait_text(self, needles: list[str], timeout: float = PAGE_TIMEOUT_S) -> float:
        """Seconds until the page's text holds every needle; raises naming the missing ones."""
        t0 = time.monotonic()
        while True:
            text = self.text()
            missing = [n for n in needles if n not in text]
            if not missing:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise DmeError(f"the page never showed {missing} within {timeout:.0f} s; it showed: {text[:600]!r}")
            time.sleep(0.5)

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def scroll_to(self, text: str) -> bool:
        """Scroll the innermost element whose text starts with ``text`` to the top, as a reader would."""
        js = ("(() => { const els = [...document.querySelectorAll('body *')].filter(e => e.children.length === 0 "
              f"&& e.textContent.trim().startsWith({json.dumps(text)})); if (!els.length) return false; "
              "els[0].scrollIntoView({block: 'start'}); return true; })()")
        return bool(self.call("Runtime.evaluate", expression=js, returnByValue=True)["result"].get("value"))

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with suppress(Exception):
            self.ws.close()
        if self.proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)


def not_blank(path: Path) -> dict[str, Any]:
    """How many colours a screenshot has (a blank or error-grey page has one or two) and its size."""
    from PIL import Image

    with Image.open(path) as im:
        rgb = im.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 16)
        n = len(colours) if colours is not None else 1 << 16
        return {"width": rgb.width, "height": rgb.height, "colours": n, "blank": n < 8}


def _sweep_runs(sweep: str) -> tuple[Any, Any, bool]:
    """The newest parent run of ``sweep`` with a finished trial (a newer attempt may have failed or still run), its
    report published now if it has none, and its first finished child run."""
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri())
    ids = [e.experiment_id for e in c.search_experiments()]
    parents = c.search_runs(ids, f"tags.`dme.sweep` = '{sweep}' and tags.`dme.kind` = 'sweep'",
                            order_by=["attributes.start_time DESC"], max_results=50) if ids else []
    for parent in parents:
        rid = parent.info.run_id
        children = c.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{rid}' and "
                                 "attributes.status = 'FINISHED'", order_by=["attributes.start_time ASC"],
                                 max_results=1)
        if children:
            break
    else:
        raise DmeError(f"no sweep {sweep!r} with a finished trial in the MLflow store {tracking_uri()}: run "
                       "`bash scripts/quickstart.sh` first (or set DME_BENCH_SWEEP to a sweep that exists)")
    published = False
    if f"{ARTIFACT_DIR}/report.md" not in {a.path for a in c.list_artifacts(rid, ARTIFACT_DIR)}:
        log.warning("sweep %r has no report in MLflow (recorded before reports were published): publishing it", sweep)
        if publish_report(sweep, rid) is None:
            raise DmeError(f"could not publish the report of sweep {sweep!r} to its run {rid}")
        published = True
    return c.get_run(rid), children[0], published


@BENCHES.register("mlflow-ui")
def bench_mlflow_ui(args: argparse.Namespace) -> dict:
    sweep = getattr(args, "sweep", None) or os.environ.get("DME_BENCH_SWEEP") or "quickstart"
    exe = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if exe is None:
        raise DmeError("the mlflow-ui bench needs a headless Chromium: `sudo apt-get install chromium`")
    parent, child, published = _sweep_runs(sweep)
    exp, rid, cid = parent.info.experiment_id, parent.info.run_id, child.info.run_id
    metric = "fidelity" if "fidelity" in child.data.metrics else sorted(child.data.metrics)[0]
    shots = Path(args.out) / "mlflow-ui"
    shots.mkdir(parents=True, exist_ok=True)
    sweep_filter = quote(f"tags.`dme.sweep` = '{sweep}'")
    checks: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with _ui() as base:
        ui_seconds = time.perf_counter() - t0
        pages = [
            ("runs_list", f"{base}/#/experiments/{exp}/runs?searchFilter={sweep_filter}",
             [parent.info.run_name], None),
            ("parent_overview", f"{base}/#/experiments/{exp}/runs/{rid}",
             [parent.info.run_name, "Summary", "fidelity"], "Description"),
            ("parent_report", f"{base}/#/experiments/{exp}/runs/{rid}/artifactPath/{ARTIFACT_DIR}/report.md",
             ["report.md", "results.csv", "plots", "finished trials"], None),
            ("child_run", f"{base}/#/experiments/{exp}/runs/{cid}",
             [child.info.run_name, "strategy", str(child.data.params.get("strategy", ""))], None),
            ("child_metrics", f"{base}/#/experiments/{exp}/runs/{cid}/model-metrics", [metric], None),
            ("plot", f"{base}/#/experiments/{exp}/runs/{rid}/artifactPath/{ARTIFACT_DIR}/plots/{PLOT}",
             [PLOT], None),
        ]
        browser = Browser(exe)
        try:
            for name, url, needles, scroll in pages:
                browser.goto(url)
                start = time.perf_counter()
                row: dict[str, Any] = {"page": name, "url": url, "expects": needles}
                try:
                    browser.wait_text(needles)
                    row["seconds_to_text"] = time.perf_counter() - start
                    if scroll:
                        browser.scroll_to(scroll)
                    time.sleep(2.0)  # charts and images draw after the text is there
                    row["ok"] = True
                except DmeError as e:
                    row.update(ok=False, error=str(e))
                path = browser.screenshot(shots / f"{name}.png")
                row.update(screenshot=str(path), **not_blank(path))
                row["ok"] = row["ok"] and not row["blank"]
                checks.append(row)
        finally:
            browser.close()
    print_table(checks, ["page", "ok", "seconds_to_text", "colours", "screenshot"],
                f"MLflow UI of sweep {sweep!r} in headless Chromium ({base if checks else ''})")
    failed = [c["page"] for c in checks if not c["ok"]]
    result = {"sweep": sweep, "parent_run": rid, "child_run": cid, "published_now": published, "browser": exe,
              "seconds_ui_start": ui_seconds, "checks": checks, "ok": not failed}
    if failed:
        (Path(args.out) / "mlflow-ui.json").write_text(json.dumps(result, indent=2))
        raise DmeError(f"the MLflow UI check failed on {', '.join(failed)}; see {shots} and "
                       f"{Path(args.out) / 'mlflow-ui.json'}")
    return result
