"""The web chat page (llama_jax/web) in a real browser, against the real server.

`python -m eval.serve` runs as a subprocess on a free loopback port with the tiny random model of test_generate and
an API key; Debian's headless Chromium, driven by selenium through Debian's chromedriver, uses the page as a person
would (typing, Enter, buttons). References are independent of the page: the same requests sent to the API directly
with httpx, without streaming, at temperature 0 (greedy, so the answers must agree token for token). What the page
sends is read from a wrapper around the browser's `fetch`, and the streamed states of the answer from a
MutationObserver that keeps every text the answer held (characterDataOldValue), both installed by the test.
"""
from __future__ import annotations

import shutil

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from test_generate import REPO, hf_model, model, model_dir, tokenizer  # noqa: F401 (module fixtures shared)
from test_serve import running_server

pytestmark = pytest.mark.slow  # a server start-up, its compilations and a browser: about a minute on 2 cores

API_KEY = "test-key-7f3a"
SYSTEM = "Answer in one short sentence."
SHORT = 12  # max tokens of the turns compared with the API
LONG = 160  # max tokens of the answer that is stopped (prompt + LONG stay within the model's 256 positions)
WAIT_S = 120  # waits are bounds on a hung server or browser, not timings: nothing asserts how long anything took

# Installed into the page by the test: every chat request body the page sends, and every text an assistant answer
# held on its way to the final one (a Text node's old value at each append).
RECORDERS = """
window.__requests = [];
const realFetch = window.fetch.bind(window);
window.fetch = (url, options) => {
  if (String(url).includes("chat/completions")) window.__requests.push(JSON.parse(options.body));
  return realFetch(url, options);
};
window.__states = [];
new MutationObserver((records) => {
  for (const r of records) {
    if (r.type === "characterData" && r.target.parentElement.closest(".message.assistant")) {
      window.__states.push(r.oldValue, r.target.data);
    }
  }
}).observe(document.getElementById("conversation"),
           {subtree: true, characterData: true, characterDataOldValue: true});
"""

STOP_AFTER_TWO_PIECES = """
new MutationObserver((records, observer) => {
  const answers = document.querySelectorAll("#conversation .message.assistant");
  if (answers.length && Number(answers[answers.length - 1].dataset.chunks) >= 2) {
    observer.disconnect();
    document.getElementById("stop").click();
  }
}).observe(document.getElementById("conversation"), {subtree: true, attributeFilter: ["data-chunks"]});
"""


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """The server's base URL; its output goes to a log file that failures quote."""
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with running_server(model_dir, log_path, "--api-key", API_KEY, wait_s=WAIT_S) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium from Debian's packages (installed by .ci/run); no browser is downloaded at run time."""
    binary, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert binary and driver_path, "Debian's chromium and chromium-driver packages are needed (see .ci/run)"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,800"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, read after every test
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        yield driver
    finally:
        driver.quit()


class ChatPage:
    """The page as a user sees it: fields found by id, text read as the DOM holds it."""

    def __init__(self, driver: webdriver.Chrome, url: str):
        self.driver = driver
        driver.get(f"{url}/")
        driver.execute_script(RECORDERS)

    def wait(self, condition, message: str = ""):
        return WebDriverWait(self.driver, WAIT_S, poll_frequency=0.02).until(condition, message)

    def field(self, element_id: str):
        return self.driver.find_element(By.ID, element_id)

    def fill(self, element_id: str, value: str) -> None:
        field = self.field(element_id)
        field.clear()
        field.send_keys(value)

    def send(self, *keys: str) -> None:
        """Type into the message box and press Enter, as a user sends."""
        turns = self.turns
        self.field("message").send_keys(*keys, Keys.ENTER)
        self.wait(lambda d: self.turns > turns, "the page did not send the message")

    @property
    def turns(self) -> int:
        return int(self.field("conversation").get_attribute("data-turns") or 0)

    @property
    def state(self) -> str:
        return self.field("conversation").get_attribute("data-state")

    def wait_idle(self) -> None:
        self.wait(lambda d: self.state == "idle", "the answer never finished")

    def messages(self) -> list[tuple[str, str]]:
        """(role, text) of every message in the conversation view, text exactly as in the DOM."""
        items = self.driver.find_elements(By.CSS_SELECTOR, "#conversation .message")
        return [(item.get_attribute("data-role"), item.find_element(By.CLASS_NAME, "content")
                 .get_property("textContent")) for item in items]

    def last_answer(self):
        return self.driver.find_elements(By.CSS_SELECTOR, "#conversation .message.assistant")[-1]

    @property
    def requests(self) -> list[dict]:
        return self.driver.execute_script("return window.__requests")

    @property
    def states(self) -> list[str]:
        return self.driver.execute_script("return window.__states")

    def error(self) -> str:
        element = self.field("error")
        return element.text if element.is_displayed() else ""


@pytest.fixture
def page(browser, server):
    """A freshly loaded page with the right API key and greedy decoding; afterwards, no script error was logged."""
    browser.get_log("browser")  # drop what earlier tests left
    chat = ChatPage(browser, server)
    chat.fill("api-key", API_KEY)
    chat.fill("temperature", "0")
    chat.fill("max-tokens", str(SHORT))
    yield chat
    # Refused requests are logged by the browser's network layer (source "network"); a script error never should be.
    assert [entry for entry in browser.get_log("browser") if entry["source"] == "javascript"] == []


def api_answer(url: str, messages: list[dict], max_tokens: int, key: str = API_KEY) -> httpx.Response:
    """The same request as the page's, sent directly and not streamed."""
    headers = {"Authorization": f"Bearer {key}"}
    model_id = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"},
                         timeout=30).json()["data"][0]["id"]
    return httpx.post(f"{url}/v1/chat/completions", headers=headers, timeout=WAIT_S,
                      json={"model": model_id, "messages": messages, "temperature": 0, "max_tokens": max_tokens})


def api_text(url: str, messages: list[dict], max_tokens: int, usage: bool = False) -> str | tuple[str, int]:
    """The answer's text (and, with usage, its completion token count)."""
    response = api_answer(url, messages, max_tokens)
    assert response.status_code == 200, response.text
    answer = response.json()
    text = answer["choices"][0]["message"]["content"]
    return (text, answer["usage"]["completion_tokens"]) if usage else text


def test_answers_stream_in_and_equal_the_api_with_the_whole_conversation_sent(page, server):
    page.fill("system-prompt", SYSTEM)
    # Shift+Enter is a newline inside the message; the Enter that follows sends it.
    page.send("The quick brown fox", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "jumps over")
    page.wait_idle()
    question = "The quick brown fox\njumps over"
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    assert page.requests[-1]["messages"] == first
    assert page.requests[-1]["stream"] is True and page.requests[-1]["max_tokens"] == SHORT

    (user_role, user_text), (answer_role, answer) = page.messages()
    expected, tokens = api_text(server, first, SHORT, usage=True)
    assert (user_role, user_text) == ("user", question)
    assert answer_role == "assistant" and answer == expected
    assert page.last_answer().get_attribute("data-tokens") == str(tokens)  # the usage chunk the page asked for
    assert answer, "the test model answered nothing: streaming could not be seen"
    # Streamed, not shown at once: the answer held at least two distinct partial texts on its way, each a prefix.
    partial = {state for state in page.states if state and state != answer}
    assert len(partial) >= 2, page.states
    assert all(answer.startswith(state) for state in partial)
    assert int(page.last_answer().get_attribute("data-chunks")) >= 3
    assert page.last_answer().get_attribute("data-finish") in ("stop", "length")
    assert page.field("message").is_enabled() and not page.field("stop").is_enabled()

    # The second turn sends the whole conversation, the first answer included, and is answered as the API answers.
    page.send("What did I say before?")
    page.wait_idle()
    second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "What did I say before?"}]
    assert page.requests[-1]["messages"] == second
    assert page.messages()[-1] == ("assistant", api_text(server, second, SHORT))
    assert [role for role, _ in page.messages()] == ["user", "assistant", "user", "assistant"]


def test_stop_ends_the_answer_early_and_gives_the_input_back(page, server):
    # The tiny model writes all its tokens faster than a WebDriver round trip, so the click on Stop is made inside
    # the page as soon as the answer holds two pieces (a real click event on the button, handled by the page).
    page.driver.execute_script(STOP_AFTER_TWO_PIECES)
    page.fill("max-tokens", str(LONG))
    page.send("Rain in the morning")
    page.wait_idle()

    assert page.last_answer().get_attribute("data-finish") == "aborted"
    assert page.field("message").is_enabled() and page.field("send").is_enabled()
    assert not page.field("stop").is_enabled()
    stopped = page.messages()[-1][1]
    full = api_text(server, [{"role": "user", "content": "Rain in the morning"}], LONG)
    assert stopped and full.startswith(stopped) and len(stopped) < len(full)

    # The stopped answer stays in the conversation and the chat goes on from it.
    page.fill("max-tokens", str(SHORT))
    page.send("Go on")
    page.wait_idle()
    assert page.requests[-1]["messages"][-2:] == [{"role": "assistant", "content": stopped},
                                                  {"role": "user", "content": "Go on"}]


def test_new_chat_clears_the_conversation(page):
    page.send("The quick brown fox")
    page.wait_idle()
    assert len(page.messages()) == 2
    page.field("new-chat").click()
    assert page.messages() == []
    assert page.field("empty-hint").is_displayed()
    page.send("A model reads")
    page.wait_idle()
    assert page.requests[-1]["messages"] == [{"role": "user", "content": "A model reads"}]


def test_api_key_field_and_server_errors_are_shown(page, server):
    question = [{"role": "user", "content": "Numbers such as 12"}]
    page.fill("api-key", "wrong-key")
    page.send("Numbers such as 12")
    page.wait_idle()
    refused = api_answer(server, question, SHORT, key="wrong-key")
    assert refused.status_code == 401
    assert refused.json()["error"]["message"] in page.error()
    assert "401" in page.error()
    # Nothing was answered: the turn is taken back and the text returned to the input, ready to send again.
    assert page.messages() == []
    assert page.field("message").get_property("value") == "Numbers such as 12"

    page.fill("api-key", API_KEY)
    page.send()
    page.wait_idle()
    assert page.error() == ""
    assert page.messages()[-1] == ("assistant", api_text(server, question, SHORT))

    # A request the server refuses for its content: the server's own message is shown.
    page.fill("max-tokens", "100000")
    page.send("Rain in the morning")
    page.wait_idle()
    too_long = api_answer(server, [*question, {"role": "assistant", "content": page.messages()[-1][1]},
                                   {"role": "user", "content": "Rain in the morning"}], 100000)
    assert too_long.status_code == 400
    assert too_long.json()["error"]["message"] in page.error()
    assert len(page.messages()) == 2


def test_every_control_is_labelled_reached_by_tab_and_shows_focus(page):
    from selenium.webdriver.common.action_chains import ActionChains

    controls = page.driver.find_elements(By.CSS_SELECTOR, "input, textarea, button")
    # The accessible name is what a screen reader says: computed by Chromium from the labels and button texts.
    names = {control.get_attribute("id"): control.accessible_name for control in controls}
    assert all(names.values()), names
    assert names["message"] == "Message" and names["api-key"] == "API key" and names["stop"] == "Stop"

    # Tab walks every enabled control (Stop is disabled while nothing streams), each drawn with a focus outline.
    enabled = {control.get_attribute("id") for control in controls if control.is_enabled()}
    seen = {}
    for _ in range(2 * len(controls)):
        ActionChains(page.driver).send_keys(Keys.TAB).perform()
        focused, outline = page.driver.execute_script(
            "const e = document.activeElement; const s = getComputedStyle(e);"
            "return [e.id, s.outlineStyle !== 'none' && parseFloat(s.outlineWidth) >= 2];")
        seen[focused] = outline
    assert enabled <= seen.keys(), enabled - seen.keys()
    assert all(seen[control] for control in enabled), seen
