"""Screenshot of the demo page after a prediction (docs/demo_page.png), from the real `agnews-lora serve`.

    python experiments/demo_screenshot.py RUN_OR_EXPORT_DIR [--text "..."] [--out docs/demo_page.png]

Starts `agnews-lora serve DIR` on 127.0.0.1 at a free port, opens the page in headless Chromium
(selenium, /usr/bin/chromium + /usr/bin/chromedriver: `apt-get install chromium chromium-driver`),
types the text, waits for the answer, saves the page and stops the service.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
TEXT = "Oil prices climb to a record as supply worries grow, dragging airline shares lower"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, service: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if service.poll() is not None:
            sys.exit(f"error: agnews-lora serve exited with status {service.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    sys.exit(f"error: the service did not answer at {url} within {seconds:.0f} s")


def screenshot(url: str, text: str, out: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-proxy-server", "--window-size=860,760",
                "--force-device-scale-factor=1", "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path="/usr/bin/chromedriver"))
    try:
        driver.get(url + "/")
        box = driver.find_element(By.ID, "text")
        box.send_keys(text)
        driver.find_element(By.ID, "submit").click()
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "result").get_attribute("data-state") == "done")
        time.sleep(0.5)  # the bars' width transition (0.25 s)
        driver.execute_script("document.activeElement.blur()")  # no focus ring in the picture
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(860, height + 120)  # the outer window: leave room for its frame
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
        print(f"{out}: {driver.find_element(By.ID, 'label').text} "
              f"({driver.find_element(By.ID, 'confidence').text}) for {text!r}")
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="run folder or export folder to serve")
    parser.add_argument("--text", default=TEXT, help="headline typed into the page")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "demo_page.png")
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    service = subprocess.Popen([sys.executable, "-m", "agnews_lora.cli", "serve", args.model_dir,
                                "--port", str(port), "--threads", "1"])
    try:
        wait_until_up(url, service)
        screenshot(url, args.text, args.out)
    finally:
        service.terminate()
        service.wait(timeout=30)


if __name__ == "__main__":
    main()
