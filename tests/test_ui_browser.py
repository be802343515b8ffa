"""The chat UI (nanochat/ui.html) in a real browser: headless Chromium driven by Playwright,
against `python -m scripts.chat_web --device_type=cpu` serving a tiny random model.
Sending with Enter, streaming, Stop, edit, regenerate, New chat, code blocks and escaping,
a phone-sized screen, the server's error messages, and the API-key prompt on a 401.

Needs Debian's chromium at /usr/bin/chromium (or $NANOCHAT_CHROMIUM) and the playwright
package (dev group); Playwright's own browser download is not used. Missing either is a
failure, not a skip."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from chat_model_fixture import make_chat_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = os.environ.get("NANOCHAT_CHROMIUM", "/usr/bin/chromium")
PHONE = {"width": 390, "height": 844}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """scripts/chat_web.py as a subprocess on a free port; its log goes to a file."""

    def __init__(self, base_dir, log_path, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = log_path
        env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), OMP_NUM_THREADS="1")
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "--device_type=cpu",
                                      "--port", str(self.port), *args],
                                     cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait(self, timeout=90):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"chat_web exited with {self.proc.returncode}:\n{open(self.log_path).read()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "health", timeout=2) as r:
                    if json.load(r).get("status") == "ok":
                        return self
            except OSError:
                time.sleep(0.2)
        pytest.fail(f"chat_web did not answer /health in {timeout}s:\n{open(self.log_path).read()[-3000:]}")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory, tokenizer):
    """An open server and one with --api_key secret, started together. Long context and no
    special tokens (mute_special): every answer runs to max_tokens, so there is time to Stop."""
    d = tmp_path_factory.mktemp("ui")
    make_chat_checkpoint(d, tokenizer, source="sft", sequence_len=4096, mute_special=True)
    started = [Server(d, d / "open.log"), Server(d, d / "auth.log", "--api_key", "secret")]
    try:
        yield {"open": started[0].wait(), "auth": started[1].wait()}
    finally:
        for s in started:
            s.stop()


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"no Chromium at {CHROMIUM}: install it (apt-get install chromium) or set NANOCHAT_CHROMIUM")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: uv sync (it is in the dev group)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    context.set_default_timeout(15_000)
    pg = context.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def set_max_tokens(page, n):
    page.click("#settings-toggle")
    page.fill("#max-tokens", str(n))
    page.click("#settings-toggle")


def answer_text(page, i=-1):
    return page.locator(".message.assistant .content").nth(i).inner_text()


def wait_answer_started(page):
    page.wait_for_function("() => { const a = document.querySelectorAll('.message.assistant .content');"
                           " return a.length && a[a.length - 1].textContent.trim().length > 0; }")


def stop_and_check(page):
    """Press Stop while the answer streams; the partial answer stays and stops growing."""
    from playwright.sync_api import expect
    assert page.is_visible("#stop"), "the answer finished before Stop could be pressed"
    page.click("#stop")
    expect(page.locator("#stop")).to_be_hidden()
    expect(page.locator("#send")).to_be_enabled()
    before = answer_text(page)
    page.wait_for_timeout(1000)
    assert answer_text(page) == before and before.strip()


def test_chat_stream_stop_edit_regenerate_new_chat(browser, servers, page, tmp_path):
    from playwright.sync_api import expect
    page.goto(servers["open"].url)
    expect(page.locator("#messages")).to_be_empty()
    set_max_tokens(page, 4000)

    # Shift+Enter is a new line, Enter sends
    page.click("#input")
    page.keyboard.type("Hello there")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("second line")
    assert page.input_value("#input") == "Hello there\nsecond line"
    expect(page.locator(".message")).to_have_count(0)
    page.keyboard.press("Enter")
    expect(page.locator(".message.user")).to_have_count(1)
    expect(page.locator(".message.user .content")).to_have_text("Hello there\nsecond line")
    expect(page.locator(".message.assistant")).to_have_count(1)
    assert page.input_value("#input") == ""
    wait_answer_started(page)
    expect(page.locator("#send")).to_be_hidden()
    page.screenshot(path=str(tmp_path / "streaming.png"))
    stop_and_check(page)

    # edit the last user message: it goes back into the input, with its answer dropped
    page.click(".message.user .edit")
    expect(page.locator(".message")).to_have_count(0)
    assert page.input_value("#input") == "Hello there\nsecond line"
    page.fill("#input", "Edited question")
    page.press("#input", "Enter")
    expect(page.locator(".message.user .content")).to_have_text("Edited question")
    wait_answer_started(page)
    stop_and_check(page)
    first = answer_text(page)

    # regenerate the last answer: a new one streams in its place
    page.click(".message.assistant .regenerate")
    expect(page.locator(".message.assistant")).to_have_count(1)
    wait_answer_started(page)
    stop_and_check(page)
    expect(page.locator(".message.user")).to_have_count(1)
    assert answer_text(page) != first
    page.screenshot(path=str(tmp_path / "desktop.png"), full_page=True)

    page.click("#new-chat")
    expect(page.locator("#messages")).to_be_empty()
    expect(page.locator("#welcome")).to_be_visible()

    for name in ("streaming.png", "desktop.png"):
        assert (tmp_path / name).stat().st_size > 1000


# A canned answer: code blocks, inline code, HTML that must stay text, a long unbroken word.
CANNED = ("Here is <b>bold</b> <script>window.pwned = 1</script> and `x < y` inline:\n"
          "```cpp\nint main() { return 0; } // " + "a_very_long_line_" * 20 + "\n```\n"
          "and " + "W" * 300 + " done.")


def canned_sse(text):
    pieces = [text[i:i + 7] for i in range(0, len(text), 7)]
    return "".join(f"data: {json.dumps({'token': p, 'worker': 0})}\n\n" for p in pieces) + 'data: {"done": true}\n\n'


def test_code_blocks_escaping_and_phone_layout(browser, servers, page, tmp_path):
    from playwright.sync_api import expect
    page.set_viewport_size(PHONE)
    page.route("**/chat/completions", lambda route: route.fulfill(
        status=200, content_type="text/event-stream", body=canned_sse(CANNED)))
    page.goto(servers["open"].url)
    page.fill("#input", "show me <i>code</i> " + "Z" * 200)
    page.press("#input", "Enter")
    expect(page.locator("#send")).to_be_visible()
    answer = page.locator(".message.assistant .content")
    expect(answer.locator("pre code")).to_have_count(1)
    assert answer.locator("pre code").text_content() == "int main() { return 0; } // " + "a_very_long_line_" * 20
    expect(answer.locator("code.inline")).to_have_text("x < y")
    assert page.eval_on_selector("pre", "e => getComputedStyle(e).fontFamily").lower().find("mono") >= 0
    # model text and user text stay text: no elements made from them, no script run
    assert answer.locator("b, script").count() == 0
    assert page.locator(".message.user i").count() == 0
    assert "<b>bold</b>" in answer.text_content()
    assert page.evaluate("window.pwned") is None
    # nothing wider than the phone screen; the code block scrolls sideways inside the message
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    assert page.evaluate("document.querySelector('main').scrollWidth <= window.innerWidth")
    assert page.eval_on_selector("pre", "e => e.scrollWidth > e.clientWidth")
    page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)
    assert (tmp_path / "phone.png").stat().st_size > 1000
    # the real model on a phone screen too
    page.unroute("**/chat/completions")
    set_max_tokens(page, 30)
    page.fill("#input", "and now the model")
    page.press("#input", "Enter")
    expect(page.locator(".message.assistant")).to_have_count(2)
    expect(page.locator("#send")).to_be_visible(timeout=30_000)
    assert answer_text(page).strip()
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    # the New chat shortcut
    page.keyboard.press("Control+Shift+O")
    expect(page.locator("#messages")).to_be_empty()


def test_errors_are_shown(browser, servers, page):
    from playwright.sync_api import expect
    page.goto(servers["open"].url)
    too_long = "a" * 8001
    page.fill("#input", too_long)
    page.press("#input", "Enter")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("8001 characters; the limit is 8000")
    expect(page.locator("#error")).to_contain_text("400")
    # the failed exchange is undone and the message is back in the input to fix
    expect(page.locator(".message")).to_have_count(0)
    assert page.input_value("#input") == too_long
    expect(page.locator("#send")).to_be_enabled()
    # a network failure
    page.route("**/chat/completions", lambda route: route.abort())
    page.fill("#input", "hello")
    page.press("#input", "Enter")
    expect(page.locator("#error")).to_contain_text("Network error")
    assert page.input_value("#input") == "hello"


def test_api_key_prompt(browser, servers, page):
    from playwright.sync_api import expect
    prompts = []

    def on_dialog(dialog):
        prompts.append(dialog.message)
        dialog.accept("secret")

    page.on("dialog", on_dialog)
    page.goto(servers["auth"].url)  # the page itself needs no key
    set_max_tokens(page, 20)
    page.fill("#input", "hi")
    page.press("#input", "Enter")
    wait_answer_started(page)
    expect(page.locator("#send")).to_be_visible(timeout=30_000)
    expect(page.locator("#error")).to_be_hidden()
    assert len(prompts) == 1 and "API key" in prompts[0]
    assert page.evaluate("localStorage.getItem('nanochat.apiKey')") == "secret"
    # the stored key is sent from now on: no second prompt
    page.fill("#input", "again")
    page.press("#input", "Enter")
    expect(page.locator(".message.assistant")).to_have_count(2)
    wait_answer_started(page)
    expect(page.locator("#send")).to_be_visible(timeout=30_000)
    assert len(prompts) == 1
