"""The page of `medmoe serve` in a real browser (headless Chromium driven by Selenium): it loads
with its "not a diagnosis" note, takes a scan through its file picker and shows it, streams the
answer to a question (equal to `medmoe ask`'s), draws the routing chart, keeps the conversation
for a follow-up, and shows a DICOM scan through the server's preview. Screenshot in tmp_path."""

import json
import shutil

import pytest
from test_serve import LIMITS, ask_cli, running
from test_vqa import QUESTION, dataset, model_dir, oracle, run  # noqa: F401 -- the tiny MoE model and images of the ask tests

from medmoe import data, serve, vqa

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402 -- after the skip when selenium is missing
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")

# every text the answer bubble is given, in order (each streamed piece replaces its text node)
# r.target, not the added node's parent: when one network read carries several deltas, the observer runs once for
# all of them, and by then every text node but the last has been replaced (detached: no parent)
RECORD_ANSWER_TEXTS = """
window.answerTexts = [];
new MutationObserver((records) => records.forEach((r) => r.addedNodes.forEach((n) => {
  if (n.nodeType === Node.TEXT_NODE && r.target.closest('.assistant')) window.answerTexts.push(n.data);
}))).observe(document.getElementById('log'), {childList: true, subtree: true});
"""


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(DRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(model_dir, browser):  # noqa: F811
    with running(serve.Server(vqa.Assistant(model_dir), LIMITS)) as url:
        browser.get(url + "/")
        yield browser


def wait(driver, condition, seconds=20):
    return WebDriverWait(driver, seconds).until(lambda d: condition())


def ask_on_page(driver, question):
    """Type a question, press Ask, wait for the streamed answer to end; the answer's bubble."""
    before = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
    driver.find_element(By.ID, "question").send_keys(question)
    driver.find_element(By.ID, "send").click()
    wait(driver, lambda: len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant:not(.streaming)")) == before + 1)
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]


def test_a_scan_question_streamed_answer_and_routing_chart(page, model_dir, dataset, tmp_path):  # noqa: F811
    driver = page
    note = driver.find_element(By.ID, "note")
    assert note.is_displayed() and "Research tool, not a diagnosis" in note.text
    wait(driver, lambda: driver.find_element(By.ID, "model").text == "moe")
    driver.find_element(By.CSS_SELECTOR, "details summary").click()
    driver.find_element(By.ID, "max-tokens").clear()
    driver.find_element(By.ID, "max-tokens").send_keys("8")  # as `ask --max-new-tokens 8`, the oracle's

    image = data.load_examples(dataset)[0].image
    driver.find_element(By.ID, "file").send_keys(image)
    wait(driver, lambda: driver.execute_script("return document.getElementById('preview').naturalWidth") == 32)
    assert driver.find_element(By.ID, "preview").is_displayed()

    driver.execute_script(RECORD_ANSWER_TEXTS)
    bubble = ask_on_page(driver, QUESTION)
    expected = ask_cli(model_dir, image, QUESTION)
    assert bubble.find_element(By.CSS_SELECTOR, ".text").text == expected.strip()
    texts = driver.execute_script("return window.answerTexts")
    assert len(texts) > 2 and texts[-1] == expected  # it grew piece by piece: streamed
    assert all(expected.startswith(t) for t in texts)

    shown = json.loads(run("ask", image, QUESTION, "--model", model_dir, "--max-new-tokens", 8, "--json", "--show-routing").stdout)
    routed = max(shown["routing"]["router_sees"], key=shown["routing"]["router_sees"].get)
    assert bubble.find_element(By.CSS_SELECTOR, ".routing .expert").text == routed
    bars = bubble.find_elements(By.CSS_SELECTOR, ".routing .bar")
    assert len(bars) == 1 + 2 * len(shown["routing"]["layers"])  # the router's view, then image and text load per MoE layer
    widths = [s.get_attribute("style") for s in bars[0].find_elements(By.CSS_SELECTOR, ".seg")]
    assert len(widths) == len(shown["routing"]["router_sees"]) and all("width" in w for w in widths)

    follow_up = "Is this a ct image?"
    second = ask_on_page(driver, follow_up)  # the conversation goes on: the first turn is in the prompt
    a = vqa.Assistant(model_dir)
    assert second.find_element(By.CSS_SELECTOR, ".text").text == oracle(a, image, [(QUESTION, expected), (follow_up, None)]).strip()
    assert len(driver.find_elements(By.CSS_SELECTOR, ".msg.user")) == 2

    shot = tmp_path / "serve.png"
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


def test_a_dicom_scan_is_shown_through_the_server(page):
    pydicom_data = pytest.importorskip("pydicom.data")
    driver = page
    driver.find_element(By.ID, "file").send_keys(pydicom_data.get_testdata_file("CT_small.dcm"))
    wait(driver, lambda: driver.execute_script("return document.getElementById('preview').naturalWidth") == 128)
    assert driver.find_elements(By.CSS_SELECTOR, ".msg") == []  # a new scan starts a new conversation
