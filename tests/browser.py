"""Drive `liandan studio` in a real headless Chromium (Debian's chromium + chromium-driver, via Selenium).

Selenium is pointed at the installed browser and driver; nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM = next((p for p in (os.environ.get("LIANDAN_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"))
                 if p), None)
CHROMEDRIVER = os.environ.get("LIANDAN_CHROMEDRIVER") or shutil.which("chromedriver")
# LIANDAN_SCREENSHOTS=docs/studio: the tabs' screenshots are also copied there (the README shows them);
# unset, a test run leaves the repository alone.
DOCS_SHOTS = os.environ.get("LIANDAN_SCREENSHOTS")


def missing_gradio() -> bool:
    import importlib.util

    return importlib.util.find_spec("gradio") is None


def missing() -> list[str]:
    """What a browser test needs and this machine lacks."""
    import importlib.util

    needs = [("chromium", CHROMIUM), ("chromium-driver", CHROMEDRIVER),
             ("selenium", importlib.util.find_spec("selenium")), ("gradio", importlib.util.find_spec("gradio"))]
    return [name for name, ok in needs if not ok]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Studio:
    """`liandan studio` as a real process (niced: the machine is shared), stopped with its whole session."""

    def __init__(self, workspace: Path, log: Path, *extra: str):
        self.workspace = Path(workspace)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = open(log, "w", encoding="utf-8")
        self.process = subprocess.Popen(
            ["nice", "-n", "10", sys.executable, "-m", "liandan", "studio", "--workspace", str(workspace),
             "--port", str(self.port), *extra],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1", GRADIO_TEMP_DIR=str(Path(workspace).parent / "gradio")))
        deadline = time.time() + 120
        while not self.serving():
            if self.process.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"studio did not start: {Path(log).read_text()[-2000:]}")
            time.sleep(0.5)

    def serving(self) -> bool:
        try:
            with urllib.request.urlopen(self.url, timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def close(self) -> None:
        """Stop the studio, and the training runs it started (they live in their own sessions, on purpose)."""
        from liandan.studio import runs

        for run_dir in runs.list_runs(self.workspace / "runs"):
            if runs.is_running(run_dir):
                os.kill(runs.read_run(run_dir)["pid"], signal.SIGKILL)
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.log.close()


class Page:
    """A Chromium tab on the studio, with the few Gradio interactions the tests need."""

    def __init__(self, downloads: Path, shots: Path):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1500",
                    "--disable-gpu", "--lang=en-US"):
            options.add_argument(arg)
        options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                                  "download.prompt_for_download": False})
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.shots = shots
        shots.mkdir(parents=True, exist_ok=True)

    def open(self, url: str) -> None:
        self.driver.get(url)
        self.wait(lambda: self.driver.find_elements("css selector", "#check"), 60, "the page to load")

    def find(self, css: str):
        return self.driver.find_element("css selector", css)

    def wait(self, condition, timeout: float, what: str):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                result = condition()
            except Exception:  # the element is being re-rendered
                result = None
            if result:
                return result
            time.sleep(0.5)
        self.shot("timeout")
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")

    def text(self, elem_id: str) -> str:
        element = self.find(f"#{elem_id}")
        fields = element.find_elements("css selector", "textarea, input")
        return fields[0].get_attribute("value") if fields else element.text

    def wait_text(self, elem_id: str, needle: str, timeout: float = 60) -> str:
        return self.wait(lambda: (t := self.text(elem_id)) and needle in t and t, timeout, f"{needle!r} in #{elem_id}")

    def tab(self, name: str) -> None:
        self.driver.find_element("xpath", f"//button[@role='tab' and normalize-space()='{name}']").click()
        time.sleep(1)

    def fill(self, elem_id: str, value) -> None:
        field = self.find(f"#{elem_id} textarea, #{elem_id} input")
        field.clear()
        field.send_keys(str(value))
        field.send_keys("\t")  # blur: Gradio sends the value

    def click(self, elem_id: str) -> None:
        self.find(f"#{elem_id}").click()

    def upload(self, elem_id: str, paths: list[Path]) -> None:
        self.find(f"#{elem_id} input[type=file]").send_keys("\n".join(str(p) for p in paths))

    def open_accordion(self, label: str) -> None:
        self.driver.find_element("xpath", f"//button[contains(normalize-space(), '{label}')]").click()
        time.sleep(0.5)

    def shot(self, name: str, docs: bool = False) -> Path:
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        if docs and DOCS_SHOTS:
            Path(DOCS_SHOTS).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, Path(DOCS_SHOTS) / f"{name}.png")
        return path

    def outside_requests(self, base: str) -> list[str]:
        """Resources the page loaded from anywhere but the studio itself (must be none: offline, no CDN)."""
        names = self.driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        return [n for n in names if not n.startswith((base, "data:", "blob:"))]

    def close(self) -> None:
        self.driver.quit()
