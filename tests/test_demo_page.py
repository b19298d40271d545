"""The demo page at / in a real headless browser (Debian chromium + chromedriver via selenium):
type a prompt, pick the knobs, watch the canvas denoise through the native streaming endpoint,
and check the final text equals the API's output for the same seed. Saves a screenshot in the
test's tmp dir (and to $DLLM_DEMO_SCREENSHOT when set)."""

import os
import shutil

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
pytest.importorskip("selenium")

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--no-first-run")

_missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
if _missing:
  reason = (f"{' and '.join(_missing)} not installed "
            "(apt-get install -y chromium chromium-driver)")
  print(f"test_demo_page: skipped: {reason}")
  pytest.skip(reason, allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from server_fixtures import LiveServer, make_llm  # noqa: E402

SETTINGS = {"prompt": "The socket module", "gen-length": "32", "steps": "32",
            "block-length": "16", "temperature": "0.7", "seed": "11"}


@pytest.fixture(scope="module")
def server():
  from dllm_jax.server.app import create_app
  llm = make_llm()
  with LiveServer(create_app(llm, model_name="tiny")) as srv:
    srv.llm = llm
    yield srv


@pytest.fixture(scope="module")
def browser():
  opts = webdriver.ChromeOptions()
  opts.binary_location = CHROMIUM
  for f in FLAGS:
    opts.add_argument(f)
  opts.add_argument("--window-size=1280,900")
  driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
  driver.set_page_load_timeout(60)
  yield driver
  driver.quit()


def _text(driver, elem_id: str) -> str:
  return driver.execute_script(f"return document.getElementById('{elem_id}').textContent;")


def test_demo_page_denoises_and_matches_api(server, browser, tmp_path):
  browser.get(server.url + "/")
  assert "dllm-jax" in browser.title
  assert _text(browser, "model-name") == "tiny"
  for elem_id, value in SETTINGS.items():
    el = browser.find_element(By.ID, elem_id)
    el.clear()
    el.send_keys(value)
  sparse = browser.find_element(By.ID, "sparse")
  if not sparse.is_selected():
    sparse.click()
  browser.find_element(By.ID, "run").click()
  WebDriverWait(browser, 300, poll_frequency=0.2).until(
      lambda d: _text(d, "status") in ("done", "error"))
  assert _text(browser, "status") == "done", _text(browser, "error")
  shot = tmp_path / "demo_page.png"
  assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 1000
  if os.environ.get("DLLM_DEMO_SCREENSHOT"):
    shutil.copyfile(shot, os.environ["DLLM_DEMO_SCREENSHOT"])

  page_text = _text(browser, "final-text")
  api = httpx.post(server.url + "/v1/diffusion/generate", timeout=120, json={
      "prompt": SETTINGS["prompt"], "gen_length": 32, "steps": 32, "block_length": 16,
      "temperature": 0.7, "seed": 11, "sparse": True}).json()
  assert page_text == api["text"]
  # The canvas was drawn step by step and ends fully committed.
  assert _text(browser, "nfe") == str(api["nfe"])
  tokens = browser.find_elements(By.CSS_SELECTOR, "#canvas .tok")
  assert len(tokens) == 32
  assert not browser.find_elements(By.CSS_SELECTOR, "#canvas .tok.mask")
  assert _text(browser, "error") == ""
