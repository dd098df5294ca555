"""The live admin page in a real headless Chromium (Debian's `chromium` and `chromium-driver`,
installed by `make test`): it opens, receives live updates while a load generator runs, draws
its charts as SVG, lists the registered policies, and the operator actions work from the page.
A screenshot is saved to tests/artifacts/dashboard.png."""
from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import requests

from engines.base import StepCost
from engines.loader import load_engine
from engines.manifest import read_manifest
from engines.torch.attention import ATTENTION_PATHS
from engines.torch.step_cost import write_step_costs
from orchestrator.config import ServeConfig
from orchestrator.core import RequestRejected
from orchestrator.policies import REGISTRY, unavailable
from orchestrator.service import Orchestrator
from serving.admin import AdminServer

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
TOKEN = "test-token-123"


@pytest.fixture(scope="module")
def served(demo_engine_dir, tmp_path_factory):
    """An orchestrator (aligned, host pool) with its run loop thread and the admin server, and a
    load generator thread submitting requests until the module's tests are done. The engine
    directory carries a step cost (as `bench.step_cost_profile` writes one), so the policy
    predicts each decode step."""
    engine_dir = tmp_path_factory.mktemp("costed") / "demo"
    shutil.copytree(demo_engine_dir, engine_dir)
    write_step_costs(engine_dir, "cpu", read_manifest(engine_dir).dtype,
                     [StepCost(path, fixed=1e-3, per_seq=1e-4, padded_kv=0.0, kv=1e-7) for path in ATTENTION_PATHS])
    engine = load_engine(engine_dir, device="cpu", kv_blocks=48, host_kv_blocks=200)
    orch = Orchestrator(engine, ServeConfig(policy="aligned", max_batch_size=6, kmin=2, admin_token=TOKEN)).start()
    server = AdminServer(orch, host="127.0.0.1", port=0, token=TOKEN)
    server.start()
    stop = threading.Event()

    def load():
        i = 0
        while not stop.is_set():
            i += 1
            try:
                orch.submit([1] + [40 + (i * 7 + k) % 60 for k in range(5 + (i * 13) % 90)], max_tokens=8 + i % 24,
                            end_id=0)
            except RequestRejected:
                pass  # draining, or the queue is full: the generator keeps trying
            time.sleep(0.05)

    generator = threading.Thread(target=load, daemon=True)
    generator.start()
    yield orch, server
    stop.set()
    generator.join(5)
    server.stop()
    orch.stop()
    engine.close()


@pytest.fixture(scope="module")
def browser():
    for path in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(path):
            pytest.fail(f"{path} is missing: `make test` installs Debian's chromium and chromium-driver "
                        "(apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_the_page_shows_live_data(served, browser, wait_for):
    from selenium.webdriver.common.by import By

    _, server = served
    browser.get(server.url)
    # Live updates arrive over server-sent events, one a second: wait for several.
    wait_for(lambda: int(browser.find_element(By.TAG_NAME, "body").get_attribute("data-updates") or 0) >= 3,
             what="three live updates")
    assert browser.find_element(By.ID, "status").text == "live"
    assert browser.find_element(By.ID, "policy").text == "aligned"
    # The KV-length histogram has bars for the requests holding KV.
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#kv-histogram svg rect.bar"), what="histogram bars")
    # Time-series charts have drawn lines from the points so far.
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#ts-throughput svg path.line"), what="throughput line")
    assert browser.find_elements(By.CSS_SELECTOR, "#ts-kv svg path.line")
    # Tier occupancy: the decode device and the host pool.
    tiers = {e.get_attribute("data-tier") for e in browser.find_elements(By.CSS_SELECTOR, "#tiers .tier-bar")}
    assert tiers == {"cpu", "host"}
    # The request table fills from /api/requests; the GPU panel says there is no driver here.
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#requests-table tbody tr"), what="request rows")
    gpu = wait_for(lambda: browser.find_element(By.ID, "gpu-panel").get_attribute("data-available"), what="gpu panel")
    assert gpu == "false" and "NVIDIA" in browser.find_element(By.ID, "gpu-panel").text
    # The scheduler's last decision, why, and its predicted decode step beside the measured one.
    # The panel is redrawn on every update: read it in one script, not through stale elements.
    read = ("const s = document.getElementById('decision-step'), r = document.getElementById('decision-reason');"
            "return s && r ? [document.getElementById('decision').dataset.kind, r.textContent,"
            " s.dataset.predicted, s.dataset.measured] : null;")
    kind, reason, predicted, measured = wait_for(
        lambda: (lambda v: v if v and v[2] and v[3] else None)(browser.execute_script(read)),
        what="a decision with a predicted and a measured step")
    assert kind in {"filled", "grouped", "switched", "preempted", "waiting"} and reason.strip()
    assert float(predicted) > 0 and float(measured) > 0
    counts = {e.get_attribute("data-state") for e in browser.find_elements(By.CSS_SELECTOR, "#counts .count")}
    assert {"waiting", "running", "parked", "refused"} <= counts
    orch, _ = served  # a refused request shows in the refused count, its reason in the tooltip
    with pytest.raises(RequestRejected):
        orch.submit([1, 2], max_tokens=0)
    read = ("const e = document.querySelector('#counts .count[data-state=refused]');"
            "return e ? [e.querySelector('b').textContent, e.title] : null;")
    number, why = wait_for(lambda: (lambda v: v if v and int(v[0]) >= 1 else None)(browser.execute_script(read)),
                           what="the refused count")
    assert "max_tokens" in why
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000


def test_operator_actions_from_the_page(served, browser, wait_for):
    from selenium.webdriver.common.by import By

    orch, server = served
    browser.get(server.url)
    wait_for(lambda: browser.find_element(By.ID, "status").text == "live", what="live status")
    result = browser.find_element(By.ID, "action-result")

    def click(button_id):
        browser.execute_script("arguments[0].textContent = ''; delete arguments[0].dataset.status;", result)
        browser.find_element(By.ID, button_id).click()
        return wait_for(lambda: result.get_attribute("data-status"), what=f"an answer to {button_id}")

    # Without the token the server refuses, and the page says so.
    assert click("drain") == "401"
    assert not orch.draining
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    assert click("drain") == "200"
    wait_for(lambda: orch.draining, what="draining")
    wait_for(lambda: browser.find_element(By.ID, "draining").is_displayed(), what="the draining badge")
    assert click("resume") == "200"
    wait_for(lambda: not orch.draining, what="resumed")
    # The policy list is the registry: every policy, the one in force selected, and those this
    # engine cannot run disabled, with the reason on hover.
    from selenium.webdriver.support.ui import Select
    wait_for(lambda: browser.find_element(By.ID, "policy-select").get_attribute("data-loaded"), what="the policies")
    select = Select(browser.find_element(By.ID, "policy-select"))
    assert [o.text for o in select.options] == list(REGISTRY)
    assert select.first_selected_option.text == orch.policy.name == "aligned"
    for option in select.options:
        reason = unavailable(option.text, orch.info)
        assert option.is_enabled() is (reason is None), option.text
        assert option.get_attribute("title") == (reason or REGISTRY[option.text].summary)
    assert not all(o.is_enabled() for o in select.options)  # one device: no disaggregated prefill
    assert browser.find_element(By.ID, "policy-summary").text == REGISTRY["aligned"].summary
    # Switch the policy from the page; the header follows the live state.
    select.select_by_visible_text("fcfs-offload")
    assert browser.find_element(By.ID, "policy-summary").text == REGISTRY["fcfs-offload"].summary
    assert click("switch-policy") == "200"
    wait_for(lambda: browser.find_element(By.ID, "policy").text == "fcfs-offload", what="the new policy shown")


def test_the_api_docs_render_from_local_files(served, browser, wait_for):
    """/docs is Swagger UI from the swagger-ui-bundle package's files, not a CDN: it renders with
    no internet. Every script and stylesheet the page loads is this server's; the favicon exists."""
    from selenium.webdriver.common.by import By

    _, server = served
    browser.get(f"{server.url.rstrip('/')}/docs")
    ops = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"), what="rendered operations")
    assert "/api/state" in {o.text.replace("\u200b", "") for o in ops}
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    origin = server.url.rstrip("/")
    assert loaded and all(url.startswith(origin) for url in loaded), loaded
    assert requests.get(f"{origin}/favicon.ico", timeout=10).status_code == 200
