"""The dashboard in headless Chromium (Debian's chromium + chromium-driver, driven by Selenium)
against a real broker: every page loads, and its buttons change the broker's state.

Screenshots go to a temporary directory, or to $TQ_SCREENSHOTS_DIR (docs/screenshots/ for the README).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import wait_for
from tests.rest_helpers import rest_broker
from transport.messages import TaskSpec

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
INSTALL = "apt-get install -y chromium chromium-driver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1200,900")

if not (shutil.which(CHROMIUM) and shutil.which(DRIVER)):
    pytest.skip(f"BROWSER TESTS SKIPPED: {CHROMIUM} or {DRIVER} is missing; install them with `{INSTALL}`",
                allow_module_level=True)

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is missing: pip install -e '.[test]'")
By = pytest.importorskip("selenium.webdriver.common.by").By
_exceptions = pytest.importorskip("selenium.common.exceptions")
Stale, NoSuchElement = _exceptions.StaleElementReferenceException, _exceptions.NoSuchElementException


@pytest.fixture
def browser(tmp_path: Path):  # type: ignore[no-untyped-def]
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    target = Path(os.environ.get("TQ_SCREENSHOTS_DIR") or tmp_path / "screenshots")
    target.mkdir(parents=True, exist_ok=True)
    return target


def _seed(broker) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """Some history (completed and failed runs of three kinds), a running task and a pending one."""
    client = broker.client()
    client.register(worker_id="worker-a", name="thumbnailer", hostname="host-1", pid=4242,
                    queues=["media", "mail"], concurrency=4)
    for i in range(24):
        kind = ("media.resize", "mail.send", "report.build")[i % 3]
        queue = "media" if kind == "media.resize" else "mail"
        client.submit(kind, b"{}", queue=queue, max_retries=0)
        [job] = client.claim("worker-a", [queue], max_tasks=1, wait_ms=0)
        if i % 5:
            client.complete("worker-a", job.task_id, result=b'"ok"')
        else:
            client.fail("worker-a", job.task_id, error="timeout talking to smtp", retry=False)
    client.submit("media.resize", b"{}", queue="media", priority="high")
    [running] = client.claim("worker-a", ["media"], max_tasks=1, wait_ms=0)
    for priority in ("high", "normal", "low"):
        client.submit("mail.send", b"{}", queue="mail", priority=priority)
    pending = client.submit("report.build", b'{"month": 11}', queue="reports").task_id
    client.schedule_add("monthly-report", "0 3 1 * *", TaskSpec(kind="report.build", payload=b"{}", queue="reports"),
                        tz="Europe/Berlin")
    client.rate_limit("mail", 20)
    return running.task_id, pending


def test_every_page_loads_in_chromium_and_the_cancel_button_cancels(make_broker, browser, shots) -> None:
    broker, port = rest_broker(make_broker)
    running, pending = _seed(broker)
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: broker.client().query("SELECT count(*) FROM task_history")[1][0][0] >= 24)
    for path, name, marker in (("/", "overview", "stat-pending"), ("/queues", "queues", "queue-media"),
                               ("/tasks", "tasks", "task_id"), ("/running", "running", "live"),
                               ("/workers", "workers", "live"), ("/sql", "sql", "sql"),
                               ("/dead", "dead", "dead-list"), ("/schedules", "schedules", "schedule-list")):
        browser.get(base + path)
        assert browser.find_element(By.ID, marker), path
        browser.save_screenshot(str(shots / f"{name}.png"))
    browser.get(base + "/running")
    assert running in browser.find_element(By.ID, "live").text
    browser.get(base + "/sql")
    browser.find_element(By.ID, "run").click()
    wait_for(lambda: browser.find_elements(By.ID, "result"))
    browser.save_screenshot(str(shots / "sql-result.png"))
    browser.get(f"{base}/tasks/{pending}")
    assert browser.find_element(By.ID, "task-state").text == "pending"
    browser.find_element(By.ID, "cancel").click()
    wait_for(lambda: browser.find_element(By.ID, "task-state").text == "cancelled")
    browser.save_screenshot(str(shots / "task.png"))
    assert broker.client().status(pending).state == "cancelled"


def _click(browser, element_id: str) -> bool:  # type: ignore[no-untyped-def]
    """Clicks the element; False if the page's 3 s refresh replaced it between finding and clicking."""
    try:
        browser.find_element(By.ID, element_id).click()
        return True
    except Stale:
        return False


def _text(browser, element_id: str) -> str:  # type: ignore[no-untyped-def]
    """The element's text; empty while the page is being replaced."""
    try:
        return browser.find_element(By.ID, element_id).text
    except (Stale, NoSuchElement):
        return ""


def test_the_pause_button_pauses_the_queue_and_requeue_makes_a_dead_task_pending(make_broker, browser, shots) -> None:
    broker, port = rest_broker(make_broker)
    client = broker.client()
    client.submit("media.resize", b"{}", queue="media")
    dead = client.submit("mail.send", b"{}", queue="mail", max_retries=0).task_id
    [job] = client.claim("worker-a", ["mail"], max_tasks=1, wait_ms=0)
    client.fail("worker-a", job.task_id, error="smtp refused the message", retry=False)
    base = f"http://127.0.0.1:{port}"
    browser.get(base + "/queues")
    wait_for(lambda: _click(browser, "pause-media"))
    wait_for(lambda: browser.find_elements(By.ID, "resume-media"))
    assert [q.paused for q in broker.client().queues() if q.name == "media"] == [True]
    assert broker.client().claim("worker-b", ["media"], max_tasks=1, wait_ms=0) == []
    browser.save_screenshot(str(shots / "queues-paused.png"))
    browser.get(base + "/dead")
    wait_for(lambda: _click(browser, f"requeue-{dead}"))
    wait_for(lambda: "the dead set is empty" in _text(browser, "dead-list"))
    assert broker.client().status(dead).state == "pending"


def test_the_login_page_admits_a_key_and_the_pages_follow(make_broker, browser, shots) -> None:
    broker, port = rest_broker(make_broker, TQ_AUTH__ENABLED="true", TQ_AUTH__API_KEYS="browser-key")
    base = f"http://127.0.0.1:{port}"
    browser.get(base + "/")
    assert browser.current_url.endswith("/login")
    browser.save_screenshot(str(shots / "login.png"))
    browser.find_element(By.ID, "api_key").send_keys("browser-key")
    browser.find_element(By.ID, "login").click()
    wait_for(lambda: browser.find_elements(By.ID, "stat-pending"))
    task_id = broker.client(api_key="browser-key").submit("k", b"x").task_id
    browser.get(f"{base}/tasks/{task_id}")
    browser.find_element(By.ID, "cancel").click()
    wait_for(lambda: broker.client(api_key="browser-key").status(task_id).state == "cancelled")
