"""The registry website in headless Chromium (Selenium): search finds a published dataset,
its page shows the schema and the policy, stored XSS does not run, no CSP violations, the
optional script fills in the time zone, the site works with JavaScript off, and the
Croissant download validates with mlcroissant.

Needs Debian's ``chromium`` and ``chromium-driver`` (/usr/bin/chromium, /usr/bin/chromedriver):
skipped without them, unless ``$CI`` is set (then it fails)."""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from duet_p2p.identity import Identity
from duet_p2p.registry.listing import ListingSpec, SignedHeartbeat
from registry_server.app import RunningRegistry, start_registry
from registry_server.keys import STORE, RegistrySettings

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    if os.environ.get("CI"):
        pytest.fail("CI must run the browser tests: install chromium and chromium-driver")
    pytest.skip("no /usr/bin/chromium or /usr/bin/chromedriver", allow_module_level=True)

os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download a driver

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

HOST = Identity.generate()
ROOMY = dict(requests_per_second=1000.0, burst=1000, writes_per_minute=60_000.0)
PAYLOAD = (
    "<img src=x onerror=\"window.__pwned=1;document.title='pwned'\">"
    "<script>window.__pwned=1;document.title='pwned'</script>"
)
WAIT = 20.0


def dataset(**changes: Any) -> ListingSpec:
    fields: dict[str, Any] = dict(
        kind="dataset", name="Hospital admissions 2024", summary="Daily admissions by ward",
        description="# Admissions\n\nOne row per stay.", license="CC-BY-4.0",
        signaling_url="http://127.0.0.1:8765/", modality="tabular", keywords=["health"],
        schema=[
            {"name": "ward_name", "dtype": "string", "description": "the ward"},
            {"name": "admissions", "dtype": "int64"},
        ],
        policy_summary="Counts over at least 10 stays are released automatically.",
        availability=[{
            "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "start": "09:00",
            "end": "10:00", "tz": "UTC",
        }],
    )  # fmt: skip
    fields.update(changes)
    return ListingSpec.new(HOST, **fields)


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[RunningRegistry]:
    settings = RegistrySettings(database_url=f"sqlite:///{tmp_path / 'r.db'}", **ROOMY)
    async with await start_registry(settings) as running:
        yield running


def chrome(tmp_path: Path, *, javascript: bool = True, zone: str = "UTC") -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / ('profile-js' if javascript else 'profile-nojs')}",
        "--no-first-run", "--disable-extensions", "--disable-background-networking",
        "--disable-component-update", "--disable-sync",
    ):  # fmt: skip
        options.add_argument(argument)
    if not javascript:
        options.add_experimental_option(
            "prefs", {"profile.managed_default_content_settings.javascript": 2}
        )
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(str(CHROMEDRIVER), env={**os.environ, "TZ": zone})
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(WAIT)
    return driver


@pytest.fixture
def browsers(tmp_path: Path) -> Iterator[list[webdriver.Chrome]]:
    started: list[webdriver.Chrome] = []
    yield started
    for driver in started:
        driver.quit()


def csp_violations(driver: webdriver.Chrome) -> list[str]:
    messages = [entry.get("message", "") for entry in driver.get_log("browser")]
    return [m for m in messages if "Content Security Policy" in m or "Refused to" in m]


def browse(driver: webdriver.Chrome, base: str, hostile_id: str) -> dict[str, Any]:
    """Search, open the listing, open the hostile listing; what the browser saw."""
    seen: dict[str, Any] = {}
    driver.get(base + "/")
    box = driver.find_element(By.ID, "q")
    box.send_keys("admissions")
    box.submit()
    WebDriverWait(driver, WAIT).until(lambda d: "q=admissions" in d.current_url)
    driver.find_element(By.LINK_TEXT, "Hospital admissions 2024").click()
    WebDriverWait(driver, WAIT).until(lambda d: "/listings/" in d.current_url)
    seen["schema"] = driver.find_element(By.CSS_SELECTOR, "#schema table").text
    seen["access"] = driver.find_element(By.ID, "access").text
    seen["croissant"] = driver.find_element(
        By.PARTIAL_LINK_TEXT, "Download Croissant"
    ).get_attribute("href")
    seen["violations"] = csp_violations(driver)
    driver.get(f"{base}/listings/{hostile_id}")
    WebDriverWait(driver, WAIT).until(
        lambda d: d.execute_script("return document.readyState") == "complete"
    )
    time.sleep(0.3)  # give an injected handler its chance
    seen["pwned"] = driver.execute_script("return window.__pwned === undefined ? null : 1")
    seen["title"] = driver.title
    seen["heading"] = driver.find_element(By.TAG_NAME, "h1").text
    seen["hostile_violations"] = csp_violations(driver)
    return seen


async def test_search_listing_xss_and_croissant(
    registry: RunningRegistry, tmp_path: Path, browsers: list[webdriver.Chrome]
) -> None:
    store = registry.app[STORE]
    good = dataset()
    hostile = dataset(name="Evil " + PAYLOAD[:150], description="Text " + PAYLOAD)
    for spec in (good, hostile):
        await store.publish(spec.sign(HOST).to_wire())
    beat = SignedHeartbeat.issue(HOST, [good.listing_id, hostile.listing_id])
    await store.heartbeat(beat.to_wire(), time.time())
    driver = await asyncio.to_thread(chrome, tmp_path)
    browsers.append(driver)
    seen = await asyncio.to_thread(browse, driver, registry.url, hostile.listing_id)
    assert "ward_name" in seen["schema"] and "the ward" in seen["schema"]
    assert "Counts over at least 10 stays" in seen["access"]
    assert seen["violations"] == []
    assert seen["pwned"] is None
    assert seen["title"] == f"{hostile.name} · OpenGrid Registry"  # the text, unchanged
    assert seen["heading"].startswith("Evil <img src=x onerror=")  # shown as text
    assert seen["hostile_violations"] == []  # escaped: nothing even tried to run

    croissant_url = seen["croissant"]
    assert croissant_url == f"{registry.url}/api/v1/listings/{good.listing_id}/croissant.json"

    def fetch() -> bytes:
        with urllib.request.urlopen(croissant_url, timeout=WAIT) as response:  # noqa: S310
            assert response.status == 200
            return response.read()

    doc = json.loads(await asyncio.to_thread(fetch))
    import mlcroissant as mlc

    validated = await asyncio.to_thread(mlc.Dataset, jsonld=doc)
    assert validated.metadata.name == good.name
    assert not validated.metadata.ctx.issues.errors


def zone_page(driver: webdriver.Chrome, url: str) -> tuple[str, str]:
    driver.get(url)
    WebDriverWait(driver, WAIT).until(lambda d: "tz=" in d.current_url)
    WebDriverWait(driver, WAIT).until(
        lambda d: d.execute_script("return document.readyState") == "complete"
    )
    return driver.current_url, driver.find_element(By.ID, "availability").text


async def test_script_fills_in_the_time_zone(
    registry: RunningRegistry, tmp_path: Path, browsers: list[webdriver.Chrome]
) -> None:
    spec = dataset()
    await registry.app[STORE].publish(spec.sign(HOST).to_wire())
    driver = await asyncio.to_thread(chrome, tmp_path, zone="Asia/Kolkata")
    browsers.append(driver)
    url, text = await asyncio.to_thread(
        zone_page, driver, f"{registry.url}/listings/{spec.listing_id}"
    )
    assert "tz=Asia%2FKolkata" in url or "tz=Asia%2FCalcutta" in url  # ICU may say Calcutta
    assert "14:30–15:30" in text  # 09:00 UTC is 14:30 in India
    assert csp_violations(driver) == []


def without_js(driver: webdriver.Chrome, base: str, listing_id: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    driver.get(base + "/")
    box = driver.find_element(By.ID, "q")
    box.send_keys("admissions")
    driver.find_element(By.CSS_SELECTOR, "form.search button").click()
    WebDriverWait(driver, WAIT).until(lambda d: "q=admissions" in d.current_url)
    seen["results"] = driver.find_element(By.CSS_SELECTOR, "ol.results").text
    driver.get(f"{base}/listings/{listing_id}")
    seen["url"] = driver.current_url
    seen["schema"] = driver.find_element(By.CSS_SELECTOR, "#schema table").text
    tz = driver.find_element(By.ID, "tz")
    tz.clear()
    tz.send_keys("Asia/Kolkata")
    driver.find_element(By.CSS_SELECTOR, "form.tz button").click()
    WebDriverWait(driver, WAIT).until(lambda d: "tz=" in d.current_url)
    seen["availability"] = driver.find_element(By.ID, "availability").text
    driver.find_element(By.CSS_SELECTOR, "details.report summary").click()
    driver.find_element(By.ID, "report-text").send_keys("Looks like spam")
    driver.find_element(By.CSS_SELECTOR, "details.report button").click()
    WebDriverWait(driver, WAIT).until(lambda d: d.current_url.endswith("/reported"))
    seen["thanks"] = driver.find_element(By.TAG_NAME, "h1").text
    return seen


async def test_works_without_javascript(
    registry: RunningRegistry, tmp_path: Path, browsers: list[webdriver.Chrome]
) -> None:
    spec = dataset()
    await registry.app[STORE].publish(spec.sign(HOST).to_wire())
    driver = await asyncio.to_thread(chrome, tmp_path, javascript=False, zone="Asia/Kolkata")
    browsers.append(driver)
    seen = await asyncio.to_thread(without_js, driver, registry.url, spec.listing_id)
    assert "Hospital admissions 2024" in seen["results"]
    assert seen["url"].endswith(f"/listings/{spec.listing_id}")  # the script did not run
    assert "ward_name" in seen["schema"]
    assert "14:30–15:30" in seen["availability"]
    assert seen["thanks"] == "Thank you"
    from registry_server.site import REPORTS

    (report,) = await registry.app[REPORTS].newest()
    assert report.listing_id == spec.listing_id and report.text == "Looks like spam"
