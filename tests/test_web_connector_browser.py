"""The connector UI in a real headless Chromium against a real connector, hub and Dovecot.

Logs in, adds a mapping to Dovecot with the form, checks its availability and reads "Reachable" in the row, sends a
SOCKS5 request for an unmapped host and finds its Access Denied entry on the audit page, then visits every page at
1280 px and at phone width: screenshots (artifacts, see tests/browser.py) and the basic accessibility check.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select

from tests.browser import DESKTOP, PHONE, browser, check_accessibility, screenshot, set_size, wait_for
from tests.harness import Stack, cli, socks_connect
from tests.servers import LOOPBACK, free_port, wait_for_port
from tests.servers.dovecot import Dovecot

__all__ = ["browser"]  # the fixture, used by the test below

pytestmark = pytest.mark.e2e

PASSWORD = "browser test password"
PAGES = ("/", "/mappings", "/truststore", "/audit", "/monitoring", "/settings")


def test_connector_ui_in_chromium(browser: WebDriver, stack: Stack, dovecot: Dovecot) -> None:
    connector = stack.enroll("dc1")
    cli(connector.home, "connector", "admin", "set-password", "--password-stdin", stdin=PASSWORD + "\n")
    port = free_port()
    process = stack.start_connector(connector, "--ui-listen", f"{LOOPBACK}:{port}")
    wait_for_port(port, alive=process.alive)
    url = f"http://{LOOPBACK}:{port}"

    browser.get(f"{url}/mappings")
    assert "/login" in browser.current_url  # not logged in yet
    check_accessibility(browser)
    shots = [screenshot(browser, "connector-login-desktop")]
    browser.find_element(By.ID, "password").send_keys("a wrong password")
    browser.find_element(By.CSS_SELECTOR, "main form button[type=submit]").click()
    alert = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "[role=alert]"), what="the login error")
    assert "wrong password" in alert[0].text
    browser.find_element(By.ID, "password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "main form button[type=submit]").click()
    wait_for(browser, lambda d: d.current_url == f"{url}/mappings", what="the page asked for before logging in")

    # add a mapping to the real Dovecot with the form (a wrong one first: the message, the input kept)
    virtual = "mail.corp.example:143"
    _fill_mapping(browser, virtual, f"{dovecot.host}:no-port")
    alert = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "[role=alert]"), what="the error box")
    assert "has port 'no-port' that is not a number" in alert[0].text
    assert browser.find_element(By.ID, "virtual").get_attribute("value") == virtual
    check_accessibility(browser)
    shots.append(screenshot(browser, "connector-mappings-error-desktop"))
    _fill_mapping(browser, virtual, f"{dovecot.host}:{dovecot.imap_port}")
    wait_for(browser, lambda d: f"mapped {virtual}" in d.find_element(By.TAG_NAME, "main").text, what="the flash")

    # check availability: the result appears inline in the mapping's row
    browser.find_element(By.CSS_SELECTOR, f"button[aria-label='Check {virtual}']").click()
    row = wait_for(
        browser,
        lambda d: [
            r for r in d.find_elements(By.CSS_SELECTOR, f"tr[data-virtual='{virtual}']") if "Reachable" in r.text
        ],
        what="the check result",
    )[0]
    result = row.find_element(By.CLASS_NAME, "check-result").text
    assert "Reachable" in result and f"IMAP greeting from {dovecot.host}:{dovecot.imap_port}" in result
    shots.append(screenshot(browser, "connector-mappings-checked-desktop"))

    # a denied SOCKS5 request shows up in the audit log as Access Denied
    reply, sock = socks_connect(stack.socks_port, "unmapped.corp.example", 143, "acme/dc1", stack.secret)
    sock.close()
    assert reply == 0x02
    browser.get(f"{url}/audit")
    Select(browser.find_element(By.ID, "kind")).select_by_value("denied")
    browser.find_element(By.CSS_SELECTOR, "form[aria-label=Filters] button[type=submit]").click()
    first = wait_for(  # the old page has an audit table too: wait for the filtered page, then read its first row
        browser,
        lambda d: "kind=denied" in d.current_url and d.find_element(By.CSS_SELECTOR, "#audit-table tbody tr").text,
        what="the filtered audit table",
    )
    assert "Access Denied" in first and "unmapped.corp.example:143" in first and "no mapping" in first

    # every page, desktop and phone: screenshots, accessibility, nothing wider than the screen
    for label, size in (("desktop", DESKTOP), ("phone", PHONE)):
        set_size(browser, size)
        for path in PAGES:
            browser.get(f"{url}{path}")
            assert browser.find_elements(By.TAG_NAME, "h1"), path
            check_accessibility(browser)
            overflow = browser.execute_script(
                "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
            )
            assert overflow <= 0, f"{path} is {overflow} px wider than the {label} screen"
            name = "overview" if path == "/" else path.strip("/")
            shots.append(screenshot(browser, f"connector-{name}-{label}"))
    assert all(Path(shot).stat().st_size > 5000 for shot in shots)


def _fill_mapping(driver: WebDriver, virtual: str, internal: str) -> None:
    for field, value in (("virtual", virtual), ("internal", internal)):
        element = driver.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    Select(driver.find_element(By.ID, "protocol")).select_by_value("tcp")
    driver.find_element(By.XPATH, "//button[normalize-space()='Add mapping']").click()
