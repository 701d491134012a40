"""The cloud cockpit's pages in a real headless Chromium, against a real hub, connector, Dovecot and runtime state:
log in, see subaccounts and connectors, run a connection test in the form (an unknown CA, "add to keystore" with
the fingerprint confirmed, then a passing report), the flows page; screenshots at 1280 px and phone width, and the
basic accessibility check on every page.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select

from postbridge.trust.truststore import TrustStore
from tests.browser import PHONE, browser, check_accessibility, login, screenshot, set_size, wait_for
from tests.harness import Stack, cli
from tests.runtime_lab import fill_folder, write_flows
from tests.servers.dovecot import Dovecot
from tests.servers.pki import TestPki

__all__ = ["browser"]  # the fixture, imported for pytest

pytestmark = pytest.mark.e2e

PASSWORD = "browser-cockpit-pass"
VIRTUAL = "mail.corp.example:143"
PAGES = ("subaccounts", "tokens", "certificates", "keystore", "credentials", "test", "flows")


@dataclass
class Site:
    stack: Stack
    connector_id: str
    folder: str

    @property
    def url(self) -> str:
        return self.stack.api_url


@pytest.fixture
def site(tmp_path: Path, dovecot: Dovecot, test_pki: TestPki) -> Iterator[Site]:
    stack = Stack(tmp_path).init()
    cli(stack.cloud_home, "cloud", "admin", "set-password", "--password-stdin", stdin=PASSWORD + "\n")
    cli(stack.cloud_home, "credentials", "add", "alice-mail", "--user", "alice", "--password-stdin", stdin="secret\n")
    runtime_keystore = TrustStore(tmp_path / "runtime-keystore")
    runtime_keystore.add(test_pki.root_pem.read_bytes(), alias="test-root")
    folder, _ = fill_folder(dovecot, runtime_keystore.directory, 4, tag="browser")
    flows = write_flows(tmp_path / "flows.toml", folder=folder, out=tmp_path / "out",
                        keystore=runtime_keystore.directory, state=f"sqlite:///{tmp_path / 'state.db'}",
                        address=f"{dovecot.host}:{dovecot.imap_port}")  # fmt: skip
    assert "✓ drain" in cli(tmp_path / "runtime-home", "run", str(flows), "--once").stdout
    stack.start_hub("--flows", str(flows))
    try:
        connector = stack.enroll("dc1")
        stack.map(connector, VIRTUAL, f"{dovecot.host}:{dovecot.imap_port}", "--description", "corp IMAP")
        stack.start_connector(connector)
        yield Site(stack, connector.identity["connector_id"], folder)
    finally:
        stack.stop()


def _open(driver: WebDriver, site: Site, page: str) -> str:
    driver.get(f"{site.url}/cockpit/{page}")
    wait_for(driver, lambda d: d.find_elements(By.TAG_NAME, "h1"), what=f"the {page} page")
    return str(driver.find_element(By.TAG_NAME, "main").text)


def _fill_test_form(driver: WebDriver) -> None:
    driver.find_element(By.ID, "address").clear()
    driver.find_element(By.ID, "address").send_keys(VIRTUAL)
    Select(driver.find_element(By.ID, "proxy")).select_by_value("on-premise")
    Select(driver.find_element(By.ID, "subaccount")).select_by_value("acme")
    driver.find_element(By.ID, "location_id").send_keys("dc1")
    Select(driver.find_element(By.ID, "credential")).select_by_value("alice-mail")
    if not driver.find_element(By.ID, "check_auth").is_selected():
        driver.find_element(By.ID, "check_auth").click()
    driver.find_element(By.CSS_SELECTOR, "#test-form button[type=submit]").click()


def _report(driver: WebDriver) -> str:
    wait_for(driver, lambda d: d.find_elements(By.ID, "report-title"), timeout=60, what="the test report")
    return str(driver.find_element(By.CSS_SELECTOR, "section.report").text)


def _fits_the_phone(driver: WebDriver) -> None:
    """Nothing but the tables (which scroll in their own box) may be wider than the phone's screen."""
    width = int(driver.execute_script("return document.documentElement.scrollWidth"))
    assert width <= PHONE[0], f"the page is {width} px wide on a {PHONE[0]} px phone: {driver.current_url}"


def test_cockpit_pages_connection_test_and_flows_in_chromium(browser: WebDriver, site: Site) -> None:
    # the hub's certificate comes from its own CA, which this throwaway browser profile does not know
    browser.execute_cdp_cmd("Security.setIgnoreCertificateErrors", {"ignore": True})
    browser.get(f"{site.url}/login")
    check_accessibility(browser)
    screenshot(browser, "cockpit-login-desktop")
    login(browser, site.url, PASSWORD)
    assert browser.current_url.endswith("/cockpit/subaccounts")
    text = str(browser.find_element(By.TAG_NAME, "main").text)
    assert site.connector_id in text and VIRTUAL in text and "corp IMAP" in text and "dc1" in text
    check_accessibility(browser)
    screenshot(browser, "cockpit-subaccounts-desktop")

    # a connection test through the hub: the keystore is empty, so the chain is not trusted ...
    _open(browser, site, "test")
    _fill_test_form(browser)
    failed = _report(browser)
    assert "the test failed" in failed and "Cause:" in failed and "Fix:" in failed
    assert "not trusted" in failed
    check_accessibility(browser)
    screenshot(browser, "cockpit-test-unknown-ca-desktop")
    # ... "Add to keystore" shows the fingerprint and asks once more before trusting it
    fingerprint = browser.find_element(By.CSS_SELECTOR, "form.add-anchor code.fingerprint").text
    browser.find_element(By.CSS_SELECTOR, "form.add-anchor button[type=submit]").click()
    wait_for(browser, lambda d: d.title.startswith("Add to keystore?"), what="the confirmation page")
    assert fingerprint in browser.find_element(By.TAG_NAME, "main").text
    check_accessibility(browser)
    screenshot(browser, "cockpit-test-confirm-desktop")
    browser.find_element(By.XPATH, "//button[normalize-space()='Yes, trust this certificate']").click()
    passed = _report(browser)
    assert "passed" in passed and "all " in passed and "steps passed" in passed, passed
    assert "login" in passed and "STARTTLS" in passed and "SOCKS5 via the hub" in passed
    assert "added to the keystore" in browser.find_element(By.TAG_NAME, "main").text
    check_accessibility(browser)
    screenshot(browser, "cockpit-test-passed-desktop")

    for page in PAGES:
        text = _open(browser, site, page)
        if page == "flows":
            assert "drain" in text and "healthy" in text and f"{site.folder} #2" in text
        if page == "keystore":
            assert fingerprint in text  # what the test added
        if page == "credentials":
            assert "alice-mail" in text and "secret" not in browser.page_source.replace("Secrets are", "")
        check_accessibility(browser)
        screenshot(browser, f"cockpit-{page}-desktop")
    browser.find_element(By.PARTIAL_LINK_TEXT, f"{site.folder} #2").click()
    wait_for(browser, lambda d: "/cockpit/messages/" in d.current_url, what="the message page")
    detail = str(browser.find_element(By.TAG_NAME, "main").text)
    assert "post-processed" in detail and "delivered" in detail
    check_accessibility(browser)
    screenshot(browser, "cockpit-message-desktop")

    set_size(browser, PHONE)
    for page in PAGES:
        _open(browser, site, page)
        _fits_the_phone(browser)
        check_accessibility(browser)
        screenshot(browser, f"cockpit-{page}-phone")
    _open(browser, site, "test")
    _fill_test_form(browser)
    assert "steps passed" in _report(browser)
    _fits_the_phone(browser)
    check_accessibility(browser)
    screenshot(browser, "cockpit-test-passed-phone")
