"""The dashboard end to end in a real browser (Debian's headless Chromium, driven by
Playwright): the page loads and shows a finished run's rounds, table and chart, and follows a
job while it runs, round by round, without a reload.

The jobs are the deployed ServerApp's own (`_deployed_run` with the coordinator's state
folder), on the in-process grid of this folder's conftest: they write the real checkpoints,
results and audit entries the dashboard reads. It lives beside the other deployed-ServerApp
tests for that grid and its fixtures. A screenshot of each page is saved under the test's
tmp_path, and also in $CONFIDE_SCREENSHOT_DIR when it is set.

Skipped only where /usr/bin/chromium is missing (`apt-get install chromium`); CI installs it.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from flwr.app import Message, MessageType
from test_server_dashboard import coordinator, serving  # noqa: F401 (a fixture)
from test_server_deployed_results import RUN_CONFIG, PushPull, context

from confide.server.app import Deployment, _deployed_run
from confide.server.settings import StateDir

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TWO_ROUNDS = RUN_CONFIG | {"federation.rounds": 2}
WAIT_MS = 30_000
# The accuracy curve's colour (static/dashboard.js): pixels of it in the chart's canvas are
# the curve itself, drawn from the data (the axes and grid are grey).
ACCURACY_RGB = (31, 119, 180)

pytestmark = [
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing: `apt-get install chromium`"
    ),
    pytest.mark.usefixtures("inside_a_run"),
]


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def complaints() -> list[str]:
    """What the page reported as errors (script errors, CSP violations, failed loads)."""
    return []


@pytest.fixture
def page(browser, complaints: list[str]):  # type: ignore[no-untyped-def]
    """A fresh page, its errors collected in `complaints`."""
    context = browser.new_context(viewport={"width": 1280, "height": 1100})
    opened = context.new_page()
    opened.on("pageerror", lambda error: complaints.append(f"page error: {error}"))
    opened.on(
        "console",
        lambda message: (
            complaints.append(f"console: {message.text}") if message.type == "error" else None
        ),
    )
    yield opened
    context.close()


def closed_without_complaints(page, complaints: list[str]) -> None:  # type: ignore[no-untyped-def]
    """Close the page while the dashboard still serves (its polls would fail after), and
    fail the test on any error it reported."""
    page.close()
    assert complaints == []


def screenshot(page, tmp_path: Path, name: str) -> Path:  # type: ignore[no-untyped-def]
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000  # a page, not a blank
    if os.environ.get("CONFIDE_SCREENSHOT_DIR"):
        folder = Path(os.environ["CONFIDE_SCREENSHOT_DIR"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / name)
    return path


def curve_pixels(page, run: str) -> int:  # type: ignore[no-untyped-def]
    """Pixels of the accuracy curve's colour in run `run`'s metrics chart."""
    return int(
        page.locator(f'article[data-run="{run}"] .chart[data-chart="metrics"] canvas').evaluate(
            """(canvas, rgb) => {
                const context = canvas.getContext("2d");
                const d = context.getImageData(0, 0, canvas.width, canvas.height).data;
                let n = 0;
                for (let i = 0; i < d.length; i += 4)
                    if (d[i] === rgb[0] && d[i + 1] === rgb[1] && d[i + 2] === rgb[2]) n++;
                return n;
            }""",
            list(ACCURACY_RGB),
        )
    )


def deployed(state: StateDir, grid, run_id: int) -> None:  # type: ignore[no-untyped-def]
    deployment = Deployment(state.root)
    try:
        _deployed_run(deployment, grid, context(TWO_ROUNDS, run_id=run_id))
    finally:
        deployment.close()


def test_the_page_shows_a_finished_run(coordinator, federation, page, complaints, tmp_path):  # noqa: F811
    from playwright.sync_api import expect

    grid, _ = federation(state="ledgers")
    deployed(coordinator, PushPull(grid), 7)
    with serving(coordinator, poll_seconds=0.5) as url:
        page.goto(url)
        run = page.locator('article[data-run="7"]')
        expect(page.locator("#live")).to_have_attribute("data-live", "yes", timeout=WAIT_MS)
        expect(run).to_have_attribute("data-status", "finished")
        rows = run.locator("table.rounds tbody tr")
        expect(rows).to_have_count(2)
        expect(rows.nth(0).locator("td").first).to_have_text("1")
        expect(rows.nth(1).locator("td").first).to_have_text("2")
        expect(run.locator('.chart[data-chart="metrics"]')).to_have_attribute("data-points", "2")
        expect(run.locator('.chart[data-chart="epsilon"] canvas')).to_have_count(1)
        assert curve_pixels(page, "7") > 20
        expect(page.locator("#institutions tbody tr")).to_have_count(3)
        expect(page.locator("#audit-status")).to_have_attribute("data-intact", "intact")
        expect(page.locator("#audit tbody tr").first).to_contain_text("run.finished")
        screenshot(page, tmp_path, "dashboard-finished.png")
        closed_without_complaints(page, complaints)


def test_an_infinite_epsilon_stays_unbounded_with_its_delta_once_live(
    coordinator,  # noqa: F811 (the fixture)
    federation,
    page,
    complaints,
    tmp_path,
):
    """results.json writes an infinite central epsilon (no finite guarantee) as null; the page
    says "unbounded", beside its delta, before and after the script's first update."""
    from playwright.sync_api import expect

    grid, _ = federation(state="ledgers")
    deployment = Deployment(coordinator.root)
    central = TWO_ROUNDS | {"central_privacy.enabled": True, "central_privacy.delta": 1e-6}
    try:
        _deployed_run(deployment, PushPull(grid), context(central, run_id=7))
    finally:
        deployment.close()
    path = coordinator.runs / "run-7" / "results.json"
    results = json.loads(path.read_text())
    results["privacy"]["institution_level"]["epsilon"] = None
    for entry in results["rounds"]:
        entry["central_epsilon"] = None
    path.write_text(json.dumps(results))
    with serving(coordinator, poll_seconds=0.5) as url:
        page.goto(url)
        run = page.locator('article[data-run="7"]')
        expect(page.locator("#live")).to_have_attribute("data-live", "yes", timeout=WAIT_MS)
        page.wait_for_function(
            "(before) => document.getElementById('taken-at').textContent !== before",
            arg=page.locator("#taken-at").text_content(),
            timeout=WAIT_MS,
        )  # updated by the script at least once more, whatever the first poll showed
        expect(run.locator(".summary")).to_contain_text(
            "sample-level DP, δ = 1e-05; institution-level DP, ε unbounded (no finite "
            "guarantee), δ = 1e-06"
        )
        headings = run.locator("table.rounds thead th")
        expect(headings.nth(3)).to_have_text("ε max (δ = 1e-05)")
        expect(headings.nth(4)).to_have_text("central ε (δ = 1e-06)")
        rows = run.locator("table.rounds tbody tr")
        expect(rows).to_have_count(2)
        for index in range(2):
            expect(rows.nth(index).locator("td").nth(4)).to_have_text("unbounded")
        expect(run.locator("table.spend thead th").nth(1)).to_have_text("ε (this run, δ = 1e-05)")
        expect(run.locator("table.spend tbody tr").first.locator("td").nth(3)).to_contain_text(
            "(δ = 1e-05)"
        )
        screenshot(page, tmp_path, "dashboard-unbounded.png")
        closed_without_complaints(page, complaints)


class GatedGrid(PushPull):
    """The in-process grid, holding each round's training messages until the test allows
    that round: the page can then be watched between rounds, however fast they run."""

    def __init__(self, grid) -> None:  # type: ignore[no-untyped-def]
        super().__init__(grid)
        self.allowed = 0
        self.turn = threading.Condition()

    def allow(self, server_round: int) -> None:
        with self.turn:
            self.allowed = server_round
            self.turn.notify_all()

    def _wait(self, server_round: int) -> None:
        with self.turn:
            if not self.turn.wait_for(lambda: self.allowed >= server_round, timeout=120):
                raise TimeoutError(f"round {server_round} was never allowed")

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        for message in messages:
            if message.metadata.message_type == MessageType.TRAIN:
                self._wait(int(message.content["config"]["server-round"]))  # type: ignore[arg-type]
        return super().push_messages(messages)


def test_the_page_follows_a_running_job_round_by_round(
    coordinator,  # noqa: F811 (the fixture)
    federation,
    page,
    complaints,
    tmp_path,
):
    from playwright.sync_api import expect

    grid, _ = federation(state="ledgers")
    gated = GatedGrid(grid)
    failures: list[BaseException] = []

    def job() -> None:
        try:
            deployed(coordinator, gated, 8)
        except BaseException as error:  # reported by the test, not lost in the thread
            failures.append(error)

    with serving(coordinator, poll_seconds=0.5) as url:
        page.goto(url)
        expect(page.locator("#live")).to_have_attribute("data-live", "yes", timeout=WAIT_MS)
        expect(page.locator("#runs p.empty")).to_be_visible()
        page.evaluate("window.confideNotReloaded = true")
        running = threading.Thread(target=job, daemon=True)
        gated.allow(1)
        running.start()
        try:
            run = page.locator('article[data-run="8"]')
            rows = run.locator("table.rounds tbody tr")
            expect(run).to_have_attribute("data-status", "running", timeout=WAIT_MS)
            expect(rows).to_have_count(1)
            expect(rows.first.locator("td").first).to_have_text("1")
            expect(run.locator(".summary")).to_contain_text("1 of 2 rounds")
            screenshot(page, tmp_path, "dashboard-running.png")

            gated.allow(2)
            expect(rows).to_have_count(2, timeout=WAIT_MS)
            expect(rows.nth(1).locator("td").first).to_have_text("2")
            expect(run).to_have_attribute("data-status", "finished", timeout=WAIT_MS)
            expect(run.locator('.chart[data-chart="metrics"]')).to_have_attribute(
                "data-points", "2"
            )
        finally:
            gated.allow(1_000)
            running.join(timeout=60)
        assert failures == [] and not running.is_alive()
        assert page.evaluate("window.confideNotReloaded") is True  # updated in place
        screenshot(page, tmp_path, "dashboard-after-run.png")
        closed_without_complaints(page, complaints)
