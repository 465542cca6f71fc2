"""Screenshot of the web chat page: `python -m scripts.screenshot_chat_page [--model DIR] [--out PNG]`.

Starts `python -m eval.serve` on a free loopback port, opens its page in Debian's headless Chromium (selenium and
Debian's chromedriver, as tests/test_web_page.py does), fills in a system prompt, sends two messages and saves a
PNG of the window (docs/images/web_chat.png by default). Without --model the server gets a tiny model with random
weights and a SentencePiece tokenizer trained on the repository's docs (served as "tiny-random-model"), so the
answers are noise: the screenshot shows the page, not a model. The server is stopped by its process id at the end.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MESSAGES = ["Hello! Which city has the tallest tower?", "And how tall is it?"]
SYSTEM = "You are a helpful assistant. Answer briefly."


def tiny_model(out: Path) -> Path:
    """A random 2-layer model and a 2000-piece tokenizer, saved as `eval.serve --model` reads them.

    The vocabulary is large for so small a model so that fewer of the random answers' tokens are single bytes, which
    decode to replacement characters when they do not form valid UTF-8."""
    from flax import nnx

    import llama_jax
    from llama_jax.config import ModelConfig
    from llama_jax.tokenizer import train_sentencepiece

    tokenizer = train_sentencepiece(sorted((REPO / "docs").glob("*.md")), out / "tokenizer.model", vocab_size=2000)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                         ffn_hidden_dim=160, max_seq_len=512, dtype="float32", remat_policy="none")
    path = llama_jax.save(llama_jax.Llama(config, rngs=nnx.Rngs(0)), out / "model", overwrite=True)
    shutil.copy(tokenizer.path, path / "tokenizer.model")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(process: subprocess.Popen, url: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise SystemExit(f"eval.serve exited with status {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"eval.serve did not answer {url}/health within {timeout_s:.0f} s")
        time.sleep(0.5)


def screenshot(url: str, out: Path, width: int, height: int, max_tokens: int) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--hide-scrollbars"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"))
    try:
        # The viewport itself, not the window around it, gets the requested size.
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        driver.get(f"{url}/")
        field = lambda element_id: driver.find_element(By.ID, element_id)  # noqa: E731
        field("system-prompt").send_keys(SYSTEM)
        field("max-tokens").clear()
        field("max-tokens").send_keys(str(max_tokens))
        for message in MESSAGES:
            field("message").send_keys(message, Keys.ENTER)
            WebDriverWait(driver, 120, poll_frequency=0.05).until(
                lambda d: field("conversation").get_attribute("data-state") == "idle")
        field("message").send_keys("Thanks!")  # a draft in the box, so the screenshot shows where to type
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
    finally:
        driver.quit()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="a model folder for eval.serve (default: a tiny random model)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "web_chat.png")
    parser.add_argument("--size", default="1000x720", help="viewport WIDTHxHEIGHT in pixels")
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args(argv)
    width, height = (int(n) for n in args.size.split("x"))

    with tempfile.TemporaryDirectory() as scratch:
        served = ["--model", str(args.model)] if args.model else [
            "--model", str(tiny_model(Path(scratch))), "--served-model-name", "tiny-random-model"]
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        process = subprocess.Popen([sys.executable, "-m", "eval.serve", *served, "--port", str(port)],
                                   cwd=REPO, env=env)
        try:
            wait_healthy(process, url, timeout_s=300)
            screenshot(url, args.out, width, height, args.max_tokens)
        finally:
            process.terminate()
            process.wait(timeout=60)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
