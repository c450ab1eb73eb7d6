"""The MLflow UI over a real sweep: a real `mlflow server` on 127.0.0.1, viewed in headless Chromium.

Needs Debian's `chromium` at /usr/bin/chromium and the `playwright` Python package (its driver only;
no `playwright install`). Screenshots are kept in <repo>/test-artifacts/.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, tiny_overrides
from conftest import mlflow_server as start_mlflow_server

CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags Chromium keeps opening outbound connections, which
# sandboxed CI machines refuse.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = REPO / "test-artifacts"
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.e2e, pytest.mark.needs("chromium", "playwright")]
sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install -e '.[ui]')")
expect = sync_api.expect
# Playwright's assertions give up after 5 s by default; a loaded 2-core machine needs longer to
# render MLflow's runs table (one column per param), so allow what the page loads need.
expect.set_options(timeout=60_000)


def api(base_url: str, endpoint: str, body: dict | None = None) -> dict:
    """Call the tracking server's REST API: GET without a body, POST (JSON) with one."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{base_url}/api/2.0/mlflow/{endpoint}", data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def sweep_store(tiny_dataset, tmp_path_factory) -> tuple[str, Path]:
    """A SQLite store holding a finished two-job sweep, made by the real CLI; (uri, workdir)."""
    workdir = tmp_path_factory.mktemp("ui-sweep")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")} | {"MLFLOW_TRACKING_URI": uri}
    cmd = [sys.executable, "-m", "cnnlab.train", "-m", "model=cnn,cnn_sigmoid", *tiny_overrides(tiny_dataset, workdir)]
    result = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"sweep failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return uri, workdir


@pytest.fixture(scope="module")
def mlflow_server(sweep_store):
    """`mlflow server` over the sweep's store on a free port; yields its base URL, stops it after."""
    uri, workdir = sweep_store
    with start_mlflow_server(uri, workdir) as (base_url, _):
        yield base_url


@pytest.fixture(scope="module")
def sweep(mlflow_server) -> dict:
    """The sweep as the server reports it: experiment id, parent run and child runs."""
    experiment = api(mlflow_server, "experiments/get-by-name?experiment_name=cnnlab")["experiment"]
    ids = [experiment["experiment_id"]]
    parents = api(mlflow_server, "runs/search", {"experiment_ids": ids, "filter": "tags.`cnnlab.role` = 'sweep'"})
    (parent,) = parents["runs"]
    parent_id = parent["info"]["run_id"]
    children = api(mlflow_server, "runs/search",
                   {"experiment_ids": ids, "filter": f"tags.mlflow.parentRunId = '{parent_id}'"})["runs"]
    return {"experiment_id": experiment["experiment_id"], "parent": parent, "children": children,
            "runs_url": f"{mlflow_server}/#/experiments/{experiment['experiment_id']}/runs"
                        "?workflowType=machine_learning"}


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium, driven by Playwright."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A fresh browser context (no stored UI state), so the sweep's row starts collapsed."""
    context = browser.new_context(viewport={"width": 1600, "height": 900})
    context.set_default_timeout(30_000)
    yield context.new_page()
    context.close()


def open_sweep(page, sweep: dict):
    """Open the experiment's runs table in the Model training view; return the parent run's link."""
    page.goto(sweep["runs_url"])
    parent_link = page.get_by_role("link", name=sweep["parent"]["info"]["run_name"], exact=True)
    expect(parent_link).to_be_visible()
    return parent_link


def expand(page, parent_link) -> None:
    """Click the expand toggle in the parent's row (the row's only button)."""
    page.get_by_role("row").filter(has=parent_link).get_by_role("button").click()


def test_sweep_children_grouped_under_parent_in_runs_table(page, sweep):
    """The runs table nests both jobs under the sweep's parent run; the screenshot is kept."""
    children = sorted(run["info"]["run_name"] for run in sweep["children"])
    assert children == ["cnn", "cnn_sigmoid"]
    assert sweep["parent"]["info"]["status"] == "FINISHED"
    parent_link = open_sweep(page, sweep)
    # The Model training view (MLflow 3 opens experiments in its GenAI view unless told otherwise).
    expect(page).to_have_url(re.compile(r"workflowType=machine_learning"))
    expect(page.get_by_role("heading", name="Runs", exact=True)).to_be_visible()
    child_links = [page.get_by_role("link", name=name, exact=True) for name in children]
    for link in child_links:  # grouped: hidden inside the collapsed parent row
        expect(link).to_have_count(0)

    expand(page, parent_link)
    parent_box = parent_link.bounding_box()
    for link in child_links:
        expect(link).to_be_visible()
        box = link.bounding_box()
        assert box["y"] > parent_box["y"], "child row should come below its parent"
        assert box["x"] > parent_box["x"], "child run name should be indented under the parent"

    close_assistant = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
    if close_assistant.is_visible():  # MLflow's chat panel would take a third of the screenshot
        close_assistant.click()
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "mlflow-ui-sweep.png"
    page.screenshot(path=str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_child_run_page_shows_metrics_and_parent(page, sweep):
    """A child's run page, opened from the table, shows its logged test accuracy and its parent."""
    child = next(run for run in sweep["children"] if run["info"]["run_name"] == "cnn")
    logged = {m["key"]: m["value"] for m in child["data"]["metrics"]}
    expand(page, open_sweep(page, sweep))
    page.get_by_role("link", name="cnn", exact=True).click()

    expect(page).to_have_url(re.compile(rf"#/experiments/{sweep['experiment_id']}/runs/{child['info']['run_id']}\b"))
    metric_row = page.get_by_role("row").filter(has=page.get_by_role("cell", name="test/acc", exact=True))
    expect(metric_row).to_be_visible()
    shown = float(metric_row.get_by_role("cell").nth(1).inner_text())
    assert shown == pytest.approx(logged["test/acc"])
    expect(page.get_by_role("link", name=sweep["parent"]["info"]["run_name"], exact=True)).to_be_visible()
