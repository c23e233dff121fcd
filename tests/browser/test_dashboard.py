"""The dashboard driven in headless Chromium against the real server: sign up, create a run through the form,
watch the run page follow reports and receipts live, ban a volunteer and see the join refused; each page is
photographed (test-artifacts/screenshots/) and none logs a console error."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from hivewire_server.client_wheels import ClientWheels
from tests.browser.conftest import LAPTOP, PHONE, LiveServer, needs_browser, screenshot, sign_in, wait_for
from tests.conftest import PASSWORD
from tests.server._accounting import joined, post_receipt, post_reports, receipt
from tests.server.test_join import new_peer_key

pytestmark = [pytest.mark.browser, needs_browser]


def text(driver: webdriver.Chrome, css: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, css).text


def field_error(driver: webdriver.Chrome, name: str) -> str:
    """The error shown next to a field, which the field also names as its description (aria-describedby)."""
    field = driver.find_element(By.ID, f"f-{name}")
    assert field.get_attribute("aria-invalid") == "true"
    return driver.find_element(By.ID, field.get_attribute("aria-describedby") or "").text


def fill(driver: webdriver.Chrome, values: dict[str, str]) -> None:
    for name, value in values.items():
        element = driver.find_element(By.ID, f"f-{name}")
        if element.tag_name == "select":
            Select(element).select_by_visible_text(value)
        else:
            element.clear()
            element.send_keys(value)


def test_sign_up_shows_errors_by_the_fields_then_my_page_and_tokens(
    browser: webdriver.Chrome, live_server: LiveServer
) -> None:
    browser.get(f"{live_server.url}/login")
    browser.find_element(By.LINK_TEXT, "Sign up").click()
    wait_for(browser, lambda d: "/signup" in d.current_url, "the sign-up page")
    screenshot(browser, "signup")
    fill(browser, {"email": "not-an-address", "display_name": "Sam", "password": "short"})
    browser.find_element(By.CSS_SELECTOR, "main form button[type=submit]").click()
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".field-error"), "the field errors")
    assert "email address" in field_error(browser, "email")
    assert "at least 10 characters" in field_error(browser, "password")
    assert browser.find_element(By.ID, "f-display_name").get_attribute("value") == "Sam"  # kept for the retry
    screenshot(browser, "signup-errors")

    fill(browser, {"email": "sam@example.org", "password": PASSWORD})
    browser.find_element(By.CSS_SELECTOR, "main form button[type=submit]").click()
    wait_for(browser, lambda d: d.find_elements(By.LINK_TEXT, "Sam"), "the signed-in header")
    browser.find_element(By.LINK_TEXT, "Sam").click()
    wait_for(browser, lambda d: d.current_url.endswith("/me"), "my page")
    assert "You have not joined a run yet" in text(browser, "main")

    browser.find_element(By.ID, "token-name").clear()
    browser.find_element(By.ID, "token-name").send_keys("laptop")
    browser.find_element(By.XPATH, "//button[text()='Create token']").click()
    wait_for(browser, lambda d: d.find_elements(By.ID, "new-token"), "the new token")
    assert text(browser, "#new-token").startswith("hw_")
    browser.find_element(By.CSS_SELECTOR, "#tokens button.danger").click()
    wait_for(browser, lambda d: "revoked" in text(d, "#tokens"), "the revoked token")
    assert "Token 'laptop' revoked" in text(browser, "[role=status]")
    screenshot(browser, "me")


def test_organizer_creates_and_edits_a_run_through_the_form(browser: webdriver.Chrome, live_server: LiveServer) -> None:
    sign_in(browser, live_server, live_server.organizer)
    browser.find_element(By.LINK_TEXT, "New run").click()
    wait_for(browser, lambda d: d.find_elements(By.ID, "f-slug"), "the run form")
    fill(
        browser,
        {
            "slug": "Bad Slug",
            "name": "Shakespeare LM",
            "description": "A tiny transformer learns to write like the bard.",
            "recipe": "tiny-lm",
            "target_batch_size": "0",
            "group_size": "4",
            "strategy": "diloco",
            "compression": "int8",
        },
    )
    browser.find_element(By.XPATH, "//button[text()='Create run']").click()
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".field-error"), "the field errors")
    assert "lowercase letters, digits and hyphens" in field_error(browser, "slug")
    assert "greater than or equal to 1" in field_error(browser, "target_batch_size")
    assert browser.find_element(By.ID, "f-name").get_attribute("value") == "Shakespeare LM"
    screenshot(browser, "run-form-errors")

    fill(browser, {"slug": "shakespeare", "target_batch_size": "8192"})
    browser.find_element(By.XPATH, "//button[text()='Create run']").click()
    wait_for(browser, lambda d: d.current_url.endswith("/runs/shakespeare/manage"), "the run's manage page")
    assert "Run Shakespeare LM created." in text(browser, "[role=status]")
    run = live_server.http.get("/api/runs/shakespeare").json()
    assert (run["strategy"], run["target_batch_size"], run["group_size"], run["compression"]) == (
        "diloco",
        8192,
        4,
        "int8",
    )
    assert (run["inner_steps"], run["overlap"]) == (500, True), "the form's defaults are the run's"

    browser.find_element(By.LINK_TEXT, "Edit run").click()
    wait_for(browser, lambda d: d.find_elements(By.ID, "f-join_policy"), "the edit form")
    assert browser.find_element(By.ID, "f-slug").get_attribute("readonly") is not None
    fill(browser, {"name": "Shakespeare LM v2", "join_policy": "allowlist", "visibility": "private"})
    fill(browser, {"max_peers": "6", "status": "closed", "inner_steps": "250", "overlap": "no"})
    screenshot(browser, "run-form-edit")
    browser.find_element(By.XPATH, "//button[text()='Save']").click()
    wait_for(browser, lambda d: d.current_url.endswith("/manage"), "the manage page")
    run = live_server.http.get("/api/runs/shakespeare", headers=live_server.organizer.headers).json()
    assert (run["name"], run["join_policy"], run["visibility"]) == ("Shakespeare LM v2", "allowlist", "private")
    assert (run["max_peers"], run["status"]) == (6, "closed")
    assert (run["inner_steps"], run["overlap"]) == (250, False)
    browser.get(f"{live_server.url}/runs/shakespeare")
    assert text(browser, "#diloco-settings") == "averaging every 250 inner steps, training waits for it"
    assert text(browser, "#run-closed") == "Closed to new volunteers"
    assert not browser.find_elements(By.LINK_TEXT, "Join this run")
    browser.get(f"{live_server.url}/runs/shakespeare/join")
    assert "This run is closed" in text(browser, "#join-refused")


def test_run_page_follows_reports_and_receipts_live(browser: webdriver.Chrome, live_server: LiveServer) -> None:
    slug = live_server.create_run("live-demo", name="Live demo", description="Watch it learn.")
    browser.get(live_server.url)
    browser.find_element(By.LINK_TEXT, "Live demo").click()
    wait_for(browser, lambda d: text(d, "#live-status") == "Live updates: on", "the event stream")
    assert "Nobody has contributed yet" in text(browser, "#leaderboard")
    assert browser.find_element(By.ID, "chart-loss").get_attribute("data-points") == "0"
    browser.execute_script("window.sameDocument = true")  # gone if the page reloads

    http, now = live_server.http, time.time()
    victor, olivia = joined(http, live_server.volunteer, slug), joined(http, live_server.organizer, slug)  # type: ignore[arg-type]
    reports = [victor.report(samples=100, loss=3.0 - step * 0.4, time=now - 300 + step * 100) for step in range(3)]
    assert post_reports(http, slug, victor, reports).json()["accepted"]  # type: ignore[arg-type]
    wait_for(browser, lambda d: "victor" in text(d, "#leaderboard"), "victor on the leaderboard")
    wait_for(
        browser, lambda d: d.find_element(By.ID, "chart-loss").get_attribute("data-points") == "3", "3 loss points"
    )
    assert text(browser, "#progress [data-key=reported_samples]") == "300"

    assert post_reports(http, slug, olivia, [olivia.report(samples=40, time=now)]).json()["accepted"]  # type: ignore[arg-type]
    upload = post_receipt(http, slug, victor, receipt(slug, [(victor, 250), (olivia, 40)], epoch=2))  # type: ignore[arg-type]
    assert upload.status_code == 201, upload.text
    wait_for(browser, lambda d: text(d, "#progress [data-key=verified_samples]") == "290", "the verified samples")
    wait_for(
        browser, lambda d: d.find_element(By.ID, "chart-loss").get_attribute("data-points") == "4", "4 loss points"
    )
    first = browser.find_element(By.CSS_SELECTOR, "#leaderboard tbody tr").text
    assert first.startswith("1 victor 250 300 1"), first
    assert text(browser, "#progress [data-key=epoch]") == "2"
    assert text(browser, "#progress [data-key=active_peers]") == "2"
    assert browser.execute_script("return window.sameDocument") is True, "the page reloaded"
    assert int(browser.find_element(By.ID, "main").get_attribute("data-updates") or 0) >= 2
    screenshot(browser, "run-page")
    browser.get(live_server.url)
    screenshot(browser, "index")
    browser.back()

    browser.set_window_size(*PHONE)
    wait_for(
        browser,
        lambda d: d.execute_script("return document.documentElement.scrollWidth") <= PHONE[0],
        "no sideways scroll",
    )
    screenshot(browser, "run-page-phone")


def test_banned_volunteer_is_refused_and_unbanned_may_join_again(
    browser: webdriver.Chrome, live_server: LiveServer
) -> None:
    slug = live_server.create_run("ban-demo", name="Ban demo")
    volunteer = live_server.volunteer
    peer = joined(live_server.http, volunteer, slug)  # type: ignore[arg-type]
    sign_in(browser, live_server, volunteer)
    browser.get(f"{live_server.url}/runs/{slug}")
    browser.find_element(By.LINK_TEXT, "Join this run").click()
    wait_for(browser, lambda d: d.find_elements(By.ID, "cmd-3"), "the join commands")
    assert text(browser, "#cmd-2") == f"hivewire login {live_server.url}"
    assert text(browser, "#cmd-3") == f"hivewire join {live_server.url}/runs/{slug}"
    browser.find_element(By.CSS_SELECTOR, "button[data-copy=cmd-3]").click()
    wait_for(browser, lambda d: text(d, "button[data-copy=cmd-3]") != "Copy", "the copy button's answer")
    screenshot(browser, "join")

    sign_in(browser, live_server, live_server.organizer)
    browser.get(f"{live_server.url}/runs/{slug}/manage")
    assert "victor" in text(browser, "#peers") and "host 1 · reflexive 1" not in text(browser, "#peers")
    links = [{"type": "host", "bytes_per_s": 2.5e7}, {"type": "srflx", "bytes_per_s": 0.0}]
    report = peer.report(links=links)
    assert post_reports(live_server.http, slug, peer, [report]).json()["accepted"]  # type: ignore[arg-type]
    browser.refresh()
    # the measured rate where the report has one; a link not measured yet shows none
    assert "host 1 (25.0 MB/s) · reflexive 1" in text(browser, "#peers") and "0.1.0" in text(browser, "#peers")
    forged = peer.report(samples_per_second=1e9)
    assert post_reports(live_server.http, slug, peer, [forged]).json()["refused"]  # type: ignore[arg-type]
    browser.refresh()
    wait_for(browser, lambda d: "implausible_rate" in text(d, "#failures"), "the verification failure")

    row = f"#members tr[data-user='{volunteer.id}']"
    browser.find_element(By.CSS_SELECTOR, f"{row} input[name=reason]").send_keys("spam reports")
    browser.find_element(By.CSS_SELECTOR, f"{row} button.danger").click()
    wait_for(browser, lambda d: "banned" in text(d, row), "the ban")
    assert "spam reports" in text(browser, row)
    screenshot(browser, "manage")
    browser.set_window_size(*PHONE)
    assert browser.execute_script("return document.documentElement.scrollWidth") <= PHONE[0]
    screenshot(browser, "manage-phone")
    browser.set_window_size(*LAPTOP)

    join = {"peer_key": new_peer_key()[1]}
    again = live_server.http.post(f"/api/runs/{slug}/join", json=join, headers=volunteer.headers)
    assert again.status_code == 403 and again.json()["code"] == "banned", again.text
    sign_in(browser, live_server, volunteer)
    browser.get(f"{live_server.url}/runs/{slug}/join")
    assert "You are banned from this run: spam reports" in text(browser, "#join-refused")
    assert not browser.find_elements(By.ID, "cmd-3")
    screenshot(browser, "join-refused")

    sign_in(browser, live_server, live_server.organizer)
    browser.get(f"{live_server.url}/runs/{slug}/manage")
    browser.find_element(By.CSS_SELECTOR, f"{row} button").click()
    wait_for(browser, lambda d: "may join again" in text(d, "[role=status]"), "the unban")
    assert joined(live_server.http, volunteer, slug).peer_id  # type: ignore[arg-type]


def test_join_page_offers_the_wheel_this_server_serves(
    browser: webdriver.Chrome, live_server: LiveServer, tmp_path: Path
) -> None:
    """With CLIENT_WHEEL_DIR set, step 1 installs from this server, pinned by hash, and the link downloads it."""
    wheel = tmp_path / "hivewire-0.7.0-py3-none-any.whl"
    wheel.write_bytes(b"a stand-in wheel; tests/server/test_downloads.py builds and installs a real one")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    slug = live_server.create_run("wheel-demo", name="Wheel demo")
    served_before = live_server.app.state.client_wheels
    live_server.app.state.client_wheels = ClientWheels(tmp_path)  # what CLIENT_WHEEL_DIR=tmp_path gives
    try:
        sign_in(browser, live_server, live_server.volunteer)
        browser.get(f"{live_server.url}/runs/{slug}/join")
        wait_for(browser, lambda d: d.find_elements(By.ID, "cmd-1"), "the join commands")
        url = f"{live_server.url}/downloads/{wheel.name}"
        assert text(browser, "#cmd-1") == f'pip install "{url}#sha256={digest}"'
        assert digest in text(browser, "#client-wheel")
        link = browser.find_element(By.CSS_SELECTOR, "#client-wheel a").get_attribute("href")
        assert link == url
        assert live_server.http.get(link).content == wheel.read_bytes()
        browser.find_element(By.CSS_SELECTOR, "button[data-copy=cmd-1]").click()
        wait_for(browser, lambda d: text(d, "button[data-copy=cmd-1]") != "Copy", "the copy button's answer")
        browser.set_window_size(*PHONE)
        assert browser.execute_script("return document.documentElement.scrollWidth") <= PHONE[0]
        screenshot(browser, "join-served-wheel-phone")
        browser.set_window_size(*LAPTOP)
    finally:
        live_server.app.state.client_wheels = served_before


def test_device_approval_page_still_works(browser: webdriver.Chrome, live_server: LiveServer) -> None:
    code = live_server.http.post("/api/device/code", data={"client_id": "hivewire-cli"}).json()
    browser.get(code["verification_uri_complete"])
    wait_for(browser, lambda d: "/login" in d.current_url, "the sign-in redirect")
    screenshot(browser, "login")
    browser.find_element(By.NAME, "email").send_keys(live_server.volunteer.email)
    browser.find_element(By.NAME, "password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "main form button[type=submit]").click()
    wait_for(browser, lambda d: d.find_elements(By.NAME, "user_code"), "the device page")
    assert browser.find_element(By.NAME, "user_code").get_attribute("value") == code["user_code"]
    screenshot(browser, "device")
    browser.find_element(By.XPATH, "//button[text()='Approve']").click()
    wait_for(browser, lambda d: "Device approved" in text(d, "main"), "the approval")
