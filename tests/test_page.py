"""The page shows every outcome (issue 27, item 7), checked in a real headless browser (Debian's
chromium): error cards that name the file and the reason with nothing empty, a status that counts
what failed and why, cards in the order chosen, files dropped anywhere, a visible keyboard focus,
no tags under 1 %, scores in words, a favicon."""

from __future__ import annotations

import pytest

from .test_serve import EXAMPLES, Server, _browser, post_files, request

pytestmark = pytest.mark.slow  # loads the bundled model, starts a server and a browser

# every element of a card with no text in it, pictures and a tag's bar aside: an empty list,
# heading or paragraph
EMPTY_PARTS = """
return Array.from(arguments[0].querySelectorAll('*'))
  .filter(e => !['IMG', 'CANVAS'].includes(e.tagName) && !e.matches('.bar') && !e.querySelector('img, canvas'))
  .filter(e => !e.textContent.trim()).map(e => e.outerHTML);
"""


@pytest.fixture(scope="module")
def server():
    from captioner import Captioner
    from captioner.serve import ServeLimits, create_app

    app = create_app(Captioner.load(device="cpu"), ServeLimits(max_upload_mb=2.0, max_files=4, batch_wait_ms=10))
    with Server(app) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    b = _browser()
    yield b
    b.quit()


@pytest.fixture(scope="module")
def notes(tmp_path_factory):
    path = tmp_path_factory.mktemp("page") / "notes.txt"
    path.write_text("not an image at all\n")
    return path


def settled(browser, cards: int):
    """Waits until `cards` cards are on the page and none is still captioning; returns them."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def done(b):
        found = b.find_elements(By.CSS_SELECTOR, "#results .card")
        return len(found) == cards and all(c.get_attribute("data-outcome") != "pending" for c in found) and found

    return WebDriverWait(browser, 60).until(done)


def test_error_cards_status_order_tags_and_scores(server, browser, notes):
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/")
    chosen = [EXAMPLES / "dog.png", notes, EXAMPLES / "cat.jpg"]  # not in alphabetical order
    browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in chosen))
    cards = settled(browser, 3)
    assert [c.get_attribute("data-file") for c in cards] == ["dog.png", "notes.txt", "cat.jpg"]
    assert [c.get_attribute("data-outcome") for c in cards] == ["captioned", "failed", "captioned"]

    bad = cards[1]  # names the file and the reason; no picture, nothing empty
    assert bad.find_element(By.CSS_SELECTOR, ".name").text == "notes.txt"
    assert bad.find_element(By.CSS_SELECTOR, ".caption").text.startswith("not an image")
    assert not bad.find_elements(By.TAG_NAME, "img")
    assert not bad.find_elements(By.CSS_SELECTOR, "details, .tags-title, .tags, .copy")
    for card in cards:
        assert browser.execute_script(EMPTY_PARTS, card) == []
    broken = "return Array.from(document.images).filter(i => i.complete && !i.naturalWidth).length"
    assert browser.execute_script(broken) == 0

    status = browser.find_element(By.ID, "status").text
    assert "2 captioned" in status and "1 not an image" in status, status

    # tags under 1 % are left out (the cat's API answer has two)
    _, [api] = post_files(server.port, [("cat.jpg", (EXAMPLES / "cat.jpg").read_bytes())])
    assert any(t["p"] < 0.01 for t in api["tags"])
    shown = [li.text.split("\n")[0] for li in cards[2].find_elements(By.CSS_SELECTOR, ".tags li")]
    assert shown == [t["label"] for t in api["tags"] if t["p"] >= 0.01]

    # other captions scored in words, the log-probability only in a tooltip
    text = browser.execute_script("return document.getElementById('results').textContent")
    assert "log-prob" not in text and "top choice" in text


def test_a_drop_anywhere_is_captioned_and_the_page_stays(server, browser, notes):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(server.url + "/")
    url = browser.current_url
    # a real drag and drop (Chrome's own input events) onto the heading, outside the drop zone: the
    # page cancels the browser's own handling of dragover and drop, which opens the file in the
    # page's place; a listener registered after the page's sees whether it did
    browser.execute_script("""
        window.cancelled = {};
        for (const t of ['dragover', 'drop']) addEventListener(t, e => { window.cancelled[t] = e.defaultPrevented; });
    """)
    h1 = "const r = document.querySelector('h1').getBoundingClientRect(); return [r.x + 5, r.y + 5]"
    x, y = browser.execute_script(h1)
    outside = "return document.elementFromPoint(arguments[0], arguments[1]).closest('#drop') === null"
    assert browser.execute_script(outside, x, y)
    data = {"items": [], "files": [str(EXAMPLES / "dog.png")], "dragOperationsMask": 1}
    for kind in ("dragEnter", "dragOver", "drop"):
        browser.execute_cdp_cmd("Input.dispatchDragEvent", {"type": kind, "x": x, "y": y, "data": data})
    [card] = settled(browser, 1)
    assert card.get_attribute("data-outcome") == "captioned" and card.get_attribute("data-file") == "dog.png"
    assert browser.current_url == url
    assert browser.execute_script("return window.cancelled") == {"dragover": True, "drop": True}

    # sequence mode: a non-image chosen with the photos gets its own card; the photos are captioned
    Select(browser.find_element(By.ID, "mode")).select_by_value("sequence")
    chosen = [EXAMPLES / "dog.png", notes, EXAMPLES / "cat.jpg"]
    browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in chosen))
    cards = settled(browser, 3)
    assert [c.get_attribute("data-file") for c in cards] == ["dog.png, cat.jpg", "notes.txt", "dog.png"]
    assert [c.get_attribute("data-outcome") for c in cards] == ["captioned", "failed", "captioned"]
    assert "not an image" in cards[1].find_element(By.CSS_SELECTOR, ".caption").text
    status = browser.find_element(By.ID, "status").text
    assert "1 captioned" in status and "1 sequence captioned" in status and "1 not an image" in status, status


def test_keyboard_focus_is_visible_and_the_favicon_resolves(server, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(server.url + "/")
    ActionChains(browser).send_keys(Keys.TAB).perform()  # the first Tab stop is the file chooser
    focused = browser.switch_to.active_element
    assert focused.get_attribute("id") == "choose" and focused.is_displayed()
    style, width = focused.value_of_css_property("outline-style"), focused.value_of_css_property("outline-width")
    assert style != "none" and float(width.removesuffix("px")) >= 2, (style, width)
    browser.execute_script("document.getElementById('files').click = () => { window.chooserOpened = true; };")
    ActionChains(browser).send_keys(Keys.ENTER).perform()  # Enter opens the browser's file chooser
    assert browser.execute_script("return window.chooserOpened") is True
    ActionChains(browser).send_keys(Keys.TAB).perform()  # no invisible stop after it: the options come next
    assert browser.switch_to.active_element.get_attribute("id") == "mode"

    href = browser.find_element(By.CSS_SELECTOR, "link[rel=icon]").get_attribute("href")
    assert href == server.url + "/static/favicon.svg"
    status, body = request(server.port, "GET", "/static/favicon.svg")
    assert status == 200 and b"<svg" in body
