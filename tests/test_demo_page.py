"""The demo page at GET /: self-contained HTML, and driven in headless Chromium against POST /predict."""

from __future__ import annotations

import copy
import re
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import httpx
import pytest
from conftest import live_server
from fastapi.testclient import TestClient

from agnews_lora.predict import Classifier
from agnews_lora.serve import create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PAGE_IDS = ("form", "text", "submit", "examples", "result", "label", "confidence", "error", "bars", "status")


@pytest.fixture(scope="module")
def clf(tiny_run) -> Classifier:
    return Classifier.load(tiny_run, precision="fp32")


@pytest.fixture(scope="module")
def server(clf):
    with live_server(create_app(clf)) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium under selenium; skips naming what is missing."""
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[test]'): the demo page's browser test needs it")
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.is_file():
            pytest.skip(f"{path} is absent (apt-get install {package}): the demo page's browser test needs it")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-proxy-server", "--window-size=900,1000"):
        options.add_argument(arg)
    try:
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))
    except WebDriverException as err:
        pytest.skip(f"headless chromium did not start: {err.msg}")
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


def percent(p: float) -> str:
    """What the page shows for a probability: JavaScript's (100 * p).toFixed(1) + "%" (exact binary
    value, ties away from zero)."""
    return f"{Decimal(100 * p).quantize(Decimal('0.1'), rounding=ROUND_HALF_UP)}%"


def open_page(browser, url: str, n_classes: int) -> None:
    """Load the page and wait for the bars GET /info builds."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url + "/")
    WebDriverWait(browser, 10).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#bars .bar")) == n_classes)


def wait_for(browser, state: str, text: str | None = None) -> None:
    """Wait until #result is in `state` (for `text`, when given); an error on the page fails at once."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def reached(d):
        result = d.find_element(By.ID, "result")
        now = result.get_attribute("data-state")
        if now == "error" and state != "error":
            raise AssertionError(f"the page shows an error: {d.find_element(By.ID, 'error').text}")
        return now == state and (text is None or result.get_attribute("data-text") == text)

    WebDriverWait(browser, 15).until(reached)


def shown(browser) -> dict:
    """What the page displays: label, confidence, and per bar its name, probability attribute, text."""
    from selenium.webdriver.common.by import By

    bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
    return {"label": browser.find_element(By.ID, "label").text,
            "confidence": browser.find_element(By.ID, "confidence").text,
            "names": [b.find_element(By.CLASS_NAME, "name").text for b in bars],
            "ids": [b.get_attribute("id") for b in bars],
            "probabilities": [float(b.get_attribute("data-probability") or "nan") for b in bars],
            "percents": [b.find_element(By.CLASS_NAME, "value").text for b in bars],
            "widths": [b.find_element(By.CLASS_NAME, "fill").size["width"] for b in bars],
            "track": bars[0].find_element(By.CLASS_NAME, "track").size["width"],
            "top": [i for i, b in enumerate(bars) if "top" in b.get_attribute("class").split()]}


def test_get_root_serves_a_self_contained_page(clf):
    with TestClient(create_app(clf)) as client:
        r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert not re.search(r"https?://", page), "the page must not reference anything outside the service"
    assert not re.search(r"<(script|link|img|iframe)[^>]*\s(src|href)=\"(?!data:)", page)  # inline only
    for name in PAGE_IDS:
        assert f'id="{name}"' in page
    assert page.count('class="example"') >= 3
    # Text from the user or the model goes in with textContent; nothing is parsed as HTML.
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write", page)
    assert 'fetch("predict"' in page and "AG News" in page  # the existing endpoint, no parallel one
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "/" not in client.app.openapi()["paths"]  # the page is not part of the API schema


def test_page_shows_what_predict_answers(server, browser, clf):
    from selenium.webdriver.common.by import By

    text = "Oil prices climb as supply worries grow; stocks <b>fall</b> & \"bonds\" rally"
    open_page(browser, server, clf.num_labels)
    before = shown(browser)
    assert before["names"] == clf.label_names and before["label"] == ""  # the names come from /info
    assert before["percents"] == ["\u2013"] * clf.num_labels and before["widths"] == [0] * clf.num_labels
    box = browser.find_element(By.ID, "text")
    box.clear()
    box.send_keys(text)
    browser.find_element(By.ID, "submit").click()
    wait_for(browser, "done", text)

    page = shown(browser)
    api = httpx.post(f"{server}/predict", json={"texts": [text]}, timeout=30).json()
    probs, top = api["probabilities"][0], api["labels"][0]
    assert page["label"] == api["names"][0] and page["top"] == [top]
    assert page["names"] == api["label_names"] and page["ids"] == [f"bar-{i}" for i in range(len(probs))]
    assert page["probabilities"] == probs  # the served floats, unchanged
    assert page["percents"] == [percent(p) for p in probs] and page["confidence"] == percent(probs[top])
    for width, p in zip(page["widths"], probs):  # each bar is drawn at its share of the track
        assert abs(width - p * page["track"]) <= 1.5
    assert browser.find_elements(By.CSS_SELECTOR, "#result b") == []  # nothing was parsed as HTML


def test_clicking_an_example_fills_the_box_and_predicts(server, browser, clf):
    from selenium.webdriver.common.by import By

    open_page(browser, server, clf.num_labels)
    example = browser.find_elements(By.CSS_SELECTOR, "#examples .example")[1]
    headline = example.text
    example.click()
    wait_for(browser, "done", headline)
    assert browser.find_element(By.ID, "text").get_attribute("value") == headline
    page = shown(browser)
    api = httpx.post(f"{server}/predict", json={"texts": [headline]}, timeout=30).json()
    assert page["label"] == api["names"][0] and page["probabilities"] == api["probabilities"][0]


def test_errors_are_shown_on_the_page(server, browser, clf):
    from selenium.webdriver.common.by import By

    open_page(browser, server, clf.num_labels)
    browser.find_element(By.ID, "submit").click()  # empty box: refused before any request
    wait_for(browser, "error")
    assert browser.find_element(By.ID, "error").text == "Type a text first."
    box = browser.find_element(By.ID, "text")
    box.send_keys("\\ \\")  # only line-break marks: the service's own 422 message is shown
    browser.find_element(By.ID, "submit").click()
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 15).until(lambda d: "empty or only whitespace" in d.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "label").text == ""


def test_class_names_are_the_services_and_shown_as_text(clf, browser):
    """Other class names (with markup in them) appear as they are, one bar each: not hard-coded, not parsed."""
    from selenium.webdriver.common.by import By

    renamed = copy.copy(clf)
    renamed.label_names = ["<i>Monde</i>", "Sport & Jeux", "Économie", '"Sci"/Tech']
    with live_server(create_app(renamed)) as url:
        open_page(browser, url, 4)
        # AG News' example headlines are for AG News' classes: hidden for others
        assert not browser.find_element(By.ID, "examples").is_displayed()
        browser.find_element(By.ID, "text").send_keys("Ligue 1: Lyon bat Marseille")
        browser.find_element(By.ID, "submit").click()
        wait_for(browser, "done")
        page = shown(browser)
    assert page["names"] == renamed.label_names and page["label"] in renamed.label_names
    assert browser.find_elements(By.CSS_SELECTOR, "#bars i, #label i") == []
