"""The dashboard in a real browser: the app under uvicorn on a free loopback port (SQLite: one backend is
enough here, the pages' queries are covered on both by the server tests), and Debian's headless Chromium
driven by Selenium through Debian's chromedriver (never Selenium Manager, which would go online)."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from hivewire_server.main import create_app
from tests.conftest import PASSWORD, RUN, Account, make_settings, new_user
from tests.support import LOOPBACK, free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
WAIT_S = 10.0  # a page condition: the live stream polls every 2 s, so updates show within about 4 s
LAPTOP = (1280, 900)
PHONE = (390, 844)
# From shared/notes/real-test-parts.md: no traffic to Google's services, no first-run UI, root needs no sandbox.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    f"--window-size={LAPTOP[0]},{LAPTOP[1]}",
)

missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
needs_browser = pytest.mark.skipif(
    bool(missing),
    reason=f"{' and '.join(missing)} missing: `scripts/setup.sh --test` installs chromium and chromium-driver",
)


@dataclass
class LiveServer:
    url: str
    app: FastAPI
    http: httpx.Client  # the API, as a volunteer's client would call it
    organizer: Account
    volunteer: Account

    def create_run(self, slug: str, **fields: object) -> str:
        response = self.http.post("/api/runs", json={**RUN, "slug": slug, **fields}, headers=self.organizer.headers)
        assert response.status_code == 201, response.text
        return slug


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path) -> Iterator[LiveServer]:
    """One server per module with an organizer (the first account) and a volunteer, made through the API."""
    database = tmp_path_factory.mktemp("browser") / "hivewire.db"
    shutil.copy(sqlite_template, database)
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    app = create_app(make_settings(f"sqlite:///{database}", public_url=url))
    # Open event streams end when the browser goes; the grace period only bounds a test that failed midway.
    config = uvicorn.Config(app, host=LOOPBACK, port=port, log_level="warning", timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}")
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, f"uvicorn did not start on {url}"
        time.sleep(0.02)
    try:
        with httpx.Client(base_url=url, timeout=10.0) as http:
            organizer = new_user(http, "olivia")  # type: ignore[arg-type]  # has the calls new_user makes
            volunteer = new_user(http, "victor")  # type: ignore[arg-type]
            assert organizer.is_organizer and not volunteer.is_organizer
            yield LiveServer(url=url, app=app, http=http, organizer=organizer, volunteer=volunteer)
    finally:
        server.should_exit = True
        thread.join(STOP_TIMEOUT_S)


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    """One headless Chromium per module, with a throwaway profile and the console log kept for checks."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture
def browser(driver: webdriver.Chrome) -> Iterator[webdriver.Chrome]:
    """The module's browser, signed out and at laptop size; fails the test on any console error it caused."""
    sign_out(driver)
    driver.set_window_size(*LAPTOP)
    driver.get_log("browser")  # drop what earlier tests left
    yield driver
    driver.get("about:blank")  # ends the page's event stream before the log is read
    errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, f"console errors: {errors}"


def wait_for(driver: webdriver.Chrome, condition: Callable[[webdriver.Chrome], object], what: str) -> None:
    """Polls `condition`; elements that vanish while the page navigates count as "not yet"."""
    retry = (NoSuchElementException, StaleElementReferenceException)
    wait = WebDriverWait(driver, WAIT_S, poll_frequency=0.1, ignored_exceptions=retry)
    wait.until(condition, message=f"waited {WAIT_S} s for {what}")


def sign_out(driver: webdriver.Chrome) -> None:
    """Every cookie of every site: WebDriver's delete_all_cookies() reaches only the current page's site."""
    driver.execute_cdp_cmd("Network.clearBrowserCookies", {})


def sign_in(driver: webdriver.Chrome, server: LiveServer, account: Account) -> None:
    sign_out(driver)
    driver.get(f"{server.url}/login")
    driver.find_element(By.NAME, "email").send_keys(account.email)
    driver.find_element(By.NAME, "password").send_keys(PASSWORD)
    driver.find_element(By.CSS_SELECTOR, "main form button[type=submit]").click()
    wait_for(driver, lambda d: "/login" not in d.current_url, "the sign-in to finish")


def screenshot(driver: webdriver.Chrome, name: str) -> Path:
    """The whole page, not just the window: the window grows to the page's height for the picture."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    width, height = driver.get_window_size()["width"], driver.get_window_size()["height"]
    page_height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.set_window_size(width, min(max(height, page_height + 140), 6000))
    path = SCREENSHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    driver.set_window_size(width, height)
    return path
