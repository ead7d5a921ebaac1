"""The dashboard in a real headless browser (Debian's chromium, through Selenium), against a
real `ddm-coordinator serve --dashboard` with two real islands training: the experts' progress
advances on the page without a reload, an island whose name is markup is shown as that text
(nothing of it runs or renders), the event log filters, and the sample grid of the published
ensemble appears. The screenshot it takes is the one in docs/ (DDM_DASHBOARD_SCREENSHOT=PATH
writes it there too)."""

import json
import os
import shutil
import urllib.request

import pytest

from tests.browser import chromium, require_chromium

from .conftest import free_port, wait_for

require_chromium()

from selenium.webdriver.common.by import By  # noqa: E402 - after the check that selenium is there

STEPS = 500  # long enough to watch an expert's progress move on the page
MARKUP = '<b>bold</b><img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read()
    except OSError:
        return 0, b""


def page(driver) -> dict:
    """What the page shows now, read in one script (the tables are redrawn at every poll, so
    elements found one call earlier may be gone): per expert (step, state, progress value,
    curve points); the islands' names; the tags inside the tables; the event rows' kinds."""
    return driver.execute_script(
        """
        const rows = (id) => [...document.querySelectorAll(`#${id} tbody tr`)];
        return {
          experts: rows("experts").map((r) => [
            Number(r.dataset.expert), Number(r.dataset.step), r.dataset.state,
            r.querySelector("progress").getAttribute("value"),
            (r.querySelector("svg.curve polyline") || {getAttribute: () => ""}).getAttribute("points"),
          ]),
          names: [...document.querySelectorAll("#islands td.name")].map((td) => td.textContent),
          tags: [...document.querySelectorAll("#islands *, #experts *, #leases *, #events *")].map((e) => e.localName),
          kinds: rows("events").map((r) => r.dataset.kind),
        };
        """
    )


def experts(driver) -> dict[int, tuple]:
    return {e[0]: tuple(e[1:]) for e in page(driver)["experts"]}


@pytest.mark.slow
def test_the_dashboard_shows_two_islands_training_live_in_a_real_browser(coordinator, spawn, tmp_path):
    coord = coordinator(
        "--experts", "2", "--preset", "tiny", "--steps", STEPS, "--router-steps", "30",
        "--heartbeat-seconds", "1", "--lease-seconds", "30",
        serve=False,
    )  # fmt: skip
    coord.port, web = free_port(), free_port()
    url = f"http://127.0.0.1:{web}/"
    coord.proc = spawn(
        "ddm-coordinator", "serve", "--home", coord.home, "--listen", coord.address,
        "--dashboard", f"127.0.0.1:{web}", label="serve",
    )  # fmt: skip
    # serve starts gRPC before the dashboard: once the page answers, islands can join.
    wait_for(lambda: coord.proc.poll() is not None or get(url)[0] == 200, 120, "the dashboard", every=0.2)
    assert coord.proc.poll() is None, coord.log()[-2000:]
    assert f"dashboard at {url}" in coord.log()

    names = ["island-a", MARKUP]
    islands = []
    for k, name in enumerate(names):
        join = ["join", *coord.connect_args, "--token", coord.invite(), "--name", name]
        islands.append(spawn("ddm-client", *join, "--state-dir", tmp_path / f"island-{k}", label=f"island-{k}"))

    with chromium() as driver:
        driver.get(url)
        # Progress advances on the page, with no reload: some expert is seen mid-run, then further on.
        first = wait_for(
            lambda: {e: s for e, s in experts(driver).items() if 0 < s[0] < STEPS},
            240,
            "an expert's progress on the page",
            every=0.2,
        )
        expert, (step, _, bar, _) = next(iter(first.items()))
        assert bar == str(step)  # the progress bar shows the step
        driver.execute_script("window.sameDocument = true")
        wait_for(lambda: experts(driver)[expert][0] > step, 120, "the expert's progress to advance", every=0.2)
        assert driver.execute_script("return window.sameDocument") is True  # updated in place

        # The island named with markup is shown as that text; nothing of it is parsed or run.
        now = wait_for(lambda: (lambda p: p if len(p["names"]) == 2 else None)(page(driver)), 60, "both islands")
        assert sorted(now["names"]) == sorted(names)
        assert not {"b", "img", "script"} & set(now["tags"]), now["tags"]
        assert driver.execute_script("return window.pwned") is None

        # The sample grid of the published ensemble appears, loaded from the dashboard.
        for island in islands:
            assert island.wait(timeout=300) == 0, island.stderr()[-2000:]
        coord.wait_published(timeout=240)
        grid = wait_for(
            lambda: driver.execute_script(
                "const img = document.getElementById('sample-grid');"
                "return img && img.complete && img.naturalWidth > 0 ? img.getAttribute('src') : null;"
            ),
            180,
            "the sample grid on the page",
            every=0.2,
        )
        status = json.loads(get(url + "api/status")[1])
        published = status["ensembles"][0]
        assert published["state"] == "published" and grid == f"/samples/{published['sample_grid']}"
        assert published["manifest_sha256"] in driver.find_element(By.ID, "ensembles").text
        assert {e["state"] for e in status["experts"]} == {"signed"}
        curves = [points for *_, points in experts(driver).values()]
        assert len(curves) == 2 and all(len(points.split()) >= 2 for points in curves), curves
        assert driver.execute_script("return window.pwned") is None

        # The event log filters by kind.
        choose = "const s = document.getElementById('event-kind'); s.value = arguments[0];"
        choose += "s.dispatchEvent(new Event('change'));"  # as picking it does (the options are redrawn)
        driver.execute_script(choose, "signed")
        kinds = wait_for(
            lambda: (lambda k: k if set(k) == {"signed"} else None)(page(driver)["kinds"]),
            30,
            "the event log filtered to signatures",
            every=0.2,
        )
        assert len(kinds) == 2
        driver.execute_script(choose, "")

        shot = tmp_path / "dashboard.png"
        wait_for(lambda: len(set(page(driver)["kinds"])) > 1, 30, "every kind of event again")
        assert driver.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("DDM_DASHBOARD_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["DDM_DASHBOARD_SCREENSHOT"])
