"""Headless Chromium for the web UI tests: the ``browser`` fixture, screenshots and a basic accessibility check.

Owns: starting Debian's ``chromium`` through its ``chromedriver`` (Selenium 4, ``--headless=new``), the two window
sizes the pages must work at (:data:`DESKTOP` 1280x900 and :data:`PHONE` 390x844), saving screenshots as test
artifacts (``$POSTBRIDGE_ARTIFACTS`` or ``<repo>/artifacts/screenshots/``, never committed) and
:func:`check_accessibility`. A missing browser skips the test on a developer machine and fails it in CI, like the
real servers of tests/servers (scripts/setup-dev installs ``chromium chromium-driver``).

Use the fixture in a test module with ``from tests.browser import browser  # noqa: F401`` (or re-export it from a
conftest) and::

    def test_page(browser: WebDriver) -> None:
        login(browser, base_url, password)
        screenshot(browser, "connector-overview")
        check_accessibility(browser)

Must not: reach anything but loopback, or install anything.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from selenium import webdriver
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.servers import find_executable

DESKTOP = (1280, 900)
PHONE = (390, 844)
MIN_CONTRAST = 4.5
REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def artifacts_dir() -> Path:
    """Where screenshots go: ``$POSTBRIDGE_ARTIFACTS`` or ``<repo>/artifacts/screenshots`` (created)."""
    configured = os.environ.get("POSTBRIDGE_ARTIFACTS", "").strip()
    folder = Path(configured) if configured else REPO / "artifacts" / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def start_chromium(size: tuple[int, int] = DESKTOP) -> WebDriver:
    """A headless Chromium of ``size``; skips (fails in CI) when Chromium or its driver is not installed."""
    binary = find_executable("chromium", ["/usr/bin/chromium", "/usr/lib/chromium/chromium"])
    driver_path = find_executable("chromedriver", ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"])
    options = webdriver.ChromeOptions()
    options.binary_location = str(binary)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-sync",
        "--disable-component-update",
        "--hide-scrollbars",
        f"--window-size={size[0]},{size[1]}",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(driver_path)))
    driver.set_window_size(*size)
    driver.set_page_load_timeout(30)
    return driver


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    """A headless Chromium at 1280x900 (resize with ``set_size(driver, PHONE)``); quit after the test."""
    try:
        driver = start_chromium(DESKTOP)
    except WebDriverException as exc:
        pytest.fail(f"chromium is installed but does not start: {exc.msg}", pytrace=False)
    try:
        yield driver
    finally:
        driver.quit()


def set_size(driver: WebDriver, size: tuple[int, int]) -> None:
    """Resize the window so that the page's viewport is ``size[0]`` CSS pixels wide."""
    driver.set_window_size(*size)
    inner = int(driver.execute_script("return window.innerWidth"))
    if inner != size[0]:  # headful-style window decorations: grow the window by the difference
        driver.set_window_size(size[0] + (size[0] - inner), size[1])


def screenshot(driver: WebDriver, name: str, *, full_page: bool = True) -> Path:
    """Save a PNG of the current page as ``<artifacts>/<name>.png`` and return its path.

    With ``full_page`` the window is made as tall as the page for the picture (at most 5000 px), then restored.
    """
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "page"
    path = artifacts_dir() / f"{safe}.png"
    size = driver.get_window_size()
    try:
        if full_page:
            height = int(driver.execute_script("return document.documentElement.scrollHeight"))
            driver.set_window_size(size["width"], max(size["height"], min(height + 20, 5000)))
        if not driver.save_screenshot(str(path)):
            raise AssertionError(f"could not save the screenshot {path}")
    finally:
        if full_page:
            driver.set_window_size(size["width"], size["height"])
    return path


def wait_for(driver: WebDriver, condition: Callable[[WebDriver], T], timeout: float = 10, what: str = "") -> T:
    """Wait until ``condition(driver)`` is truthy and return it; AssertionError naming ``what`` otherwise.

    An element found by ``condition`` may go stale before it is read when the page is replaced in between (a form
    post redirects and the new page loads): that look counts as "not yet", not as a failure."""
    try:
        wait = WebDriverWait(
            driver,
            timeout,
            poll_frequency=0.1,
            ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
        )
        return wait.until(condition)
    except TimeoutException:
        raise AssertionError(
            f"timed out after {timeout:g} s waiting for {what or 'the page'} at {driver.current_url}:\n"
            + driver.find_element(By.TAG_NAME, "body").text[:3000]
        ) from None


def login(driver: WebDriver, base_url: str, password: str) -> None:
    """Log in through the login page of the app at ``base_url`` and wait for the page after it."""
    driver.get(f"{base_url}/login")
    field = driver.find_element(By.ID, "password")
    field.clear()
    field.send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    wait_for(driver, lambda d: "/login" not in d.current_url, what="the page after logging in")


_ACCESSIBILITY_SCRIPT = r"""
const minContrast = arguments[0];
const problems = [];
const describe = (el) => {
  const id = el.id ? '#' + el.id : '';
  const name = el.getAttribute('name') ? `[name=${el.getAttribute('name')}]` : '';
  return el.tagName.toLowerCase() + id + name;
};
if (!document.documentElement.getAttribute('lang')) problems.push('<html> has no lang attribute');
const h1 = document.querySelectorAll('h1').length;
if (h1 !== 1) problems.push(`the page has ${h1} <h1> elements instead of one`);
if (!document.title.trim()) problems.push('the page has no <title>');
for (const el of document.querySelectorAll('input, select, textarea')) {
  if (el.type === 'hidden') continue;
  const byFor = el.id && document.querySelector(`label[for="${CSS.escape(el.id)}"]`);
  const labelled = byFor || el.closest('label') || (el.getAttribute('aria-label') || '').trim()
    || el.getAttribute('aria-labelledby');
  if (!labelled) problems.push(`${describe(el)} has no label`);
}
for (const img of document.querySelectorAll('img')) {
  if (!img.hasAttribute('alt')) problems.push(`image ${img.getAttribute('src')} has no alt text`);
}
for (const button of document.querySelectorAll('button, [role=button]')) {
  if (!button.textContent.trim() && !(button.getAttribute('aria-label') || '').trim()) {
    problems.push(`${describe(button)} has no text`);
  }
}
const parse = (text) => {
  const m = text.match(/rgba?\(([^)]+)\)/);
  if (!m) return [0, 0, 0, 1];
  const p = m[1].split(/[ ,\/]+/).filter(Boolean).map(Number);
  return [p[0], p[1], p[2], p.length > 3 ? p[3] : 1];
};
const luminance = ([r, g, b]) => {
  const f = (c) => { c /= 255; return c <= 0.03928 ? c / 12.92 : Math.pow((c + 0.055) / 1.055, 2.4); };
  return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
};
const blend = (top, bottom) => {
  const a = top[3];
  return [0, 1, 2].map((i) => top[i] * a + bottom[i] * (1 - a)).concat([1]);
};
const background = (el) => {
  const layers = [];
  for (let node = el; node && node.nodeType === 1; node = node.parentElement) {
    const colour = parse(getComputedStyle(node).backgroundColor);
    if (colour[3] > 0) layers.push(colour);
    if (colour[3] >= 1) break;
  }
  let result = [255, 255, 255, 1];
  for (const layer of layers.reverse()) result = blend(layer, result);
  return result;
};
const seen = new Set();
const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
for (let node = walker.nextNode(); node; node = walker.nextNode()) {
  if (!node.textContent.trim()) continue;
  const el = node.parentElement;
  if (!el || seen.has(el)) continue;
  seen.add(el);
  const style = getComputedStyle(el);
  if (style.visibility === 'hidden' || style.display === 'none' || !el.getClientRects().length) continue;
  const bg = background(el);
  const fg = blend(parse(style.color), bg);
  const [l1, l2] = [luminance(fg), luminance(bg)].sort((a, b) => b - a);
  const ratio = (l1 + 0.05) / (l2 + 0.05);
  if (ratio < minContrast) {
    problems.push(`text "${node.textContent.trim().slice(0, 40)}" in ${describe(el)} has contrast `
      + `${ratio.toFixed(2)}:1 (${style.color} on rgb(${bg.slice(0, 3).map(Math.round).join(', ')}))`);
  }
}
return problems;
"""


def accessibility_problems(driver: WebDriver) -> list[str]:
    """What :func:`check_accessibility` finds wrong with the current page (empty when nothing)."""
    problems: Any = driver.execute_script(_ACCESSIBILITY_SCRIPT, MIN_CONTRAST)
    return [str(problem) for problem in problems]


def check_accessibility(driver: WebDriver) -> None:
    """Basic checks of the current page; AssertionError listing every problem.

    Every input, select and textarea has a label (``label[for]``, an enclosing label or ``aria-label``), images
    have ``alt``, buttons have text, there is exactly one ``<h1>``, a ``<title>`` and ``<html lang>``, and every
    visible text has a contrast of at least 4.5:1 against its background as the stylesheet paints them
    (computed styles, semi-transparent layers blended).
    """
    problems = accessibility_problems(driver)
    if problems:
        raise AssertionError(f"accessibility problems on {driver.current_url}:\n  " + "\n  ".join(problems))
