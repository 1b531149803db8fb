"""A real browser for the web page's tests: Debian's chromium, headless, driven through Selenium
with Debian's chromedriver.

``browsers(base_url)`` (a fixture) starts one at desktop size, ``browsers(base_url, phone=True)``
one at a phone's; both are quit when the test ends. Every page a browser shows is saved as a
screenshot into the test's ``tmp_path`` (and into ``$SPOOLD_SCREENSHOTS`` when that names a
directory), and the browser's console is read after each: a SEVERE entry (a script's error, a
resource that did not load, a CSP violation) fails the test, unless the test said it expects
it (``Browser.tolerating``).

Without chromium or chromedriver the tests skip, but under ``CI=true`` they fail, naming the
``apt-get`` command that installs them: CI must not pass by testing nothing."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import pytest
import requests
from selenium import webdriver
from selenium.common.exceptions import (
    NoAlertPresentException,
    NoSuchElementException,
    TimeoutException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL = "apt-get install -y chromium chromium-driver"
#: The window of a desktop browser, and the viewport of a phone (an iPhone 12 to 15's, in CSS px).
DESKTOP = (1280, 900)
PHONE = (390, 844)
ARGUMENTS = ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage")
#: A ceiling for a wait in the browser, not a measurement: a wait that needs it has failed.
BOUND = 30.0

T = TypeVar("T")


def require_chromium() -> None:
    """Skip the test when chromium or chromedriver is missing; fail it under ``CI=true``."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if not missing:
        return
    message = f"{' and '.join(missing)} missing: install them with `{INSTALL}`"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@dataclass
class Browser:
    """One headless chromium, at ``base`` (the daemon's URL), saving what it shows."""

    driver: webdriver.Chrome
    base: str
    name: str  # the test's, for the screenshots' names
    shots_dir: Path
    also_into: Path | None = None
    shots: list[Path] = field(default_factory=list)
    console: list[dict[str, Any]] = field(default_factory=list)  # every entry read so far
    _tolerated: list[str] = field(default_factory=list)

    # -- going places --------------------------------------------------------------------------

    def open(self, path: str) -> None:
        """Go to ``path`` (under ``base``), wait until it has loaded, save it and read the
        console."""
        self.driver.get(self.base + path)
        self.settled()

    def reload(self) -> None:
        self.driver.refresh()
        self.settled()

    def settled(self, label: str | None = None) -> Path:
        """After a navigation: wait until the document has loaded, then save a screenshot and
        check the console. Returns the screenshot."""
        self.wait(
            lambda d: d.execute_script("return document.readyState") == "complete",
            what="the page to load",
        )
        shot = self.shot(label)
        self.check_console()
        return shot

    def submit(self, element: WebElement | str, label: str | None = None) -> None:
        """Click ``element`` (a CSS selector, or the element): a button that submits a form or a
        link; wait until the next page has replaced this one (accepting a confirm() the page may
        ask first), then as ``settled``."""
        target = self.find(element) if isinstance(element, str) else element
        # A mark on this document: the next one has none. (Not the old element's staleness:
        # asked while the document goes, chromedriver may answer with an error of its own.)
        self.script("window.spooldLeaving = true")
        target.click()

        def replaced(driver: webdriver.Chrome) -> bool:
            with contextlib.suppress(NoAlertPresentException):
                driver.switch_to.alert.accept()
                return False
            try:
                return bool(driver.execute_script("return window.spooldLeaving !== true"))
            except WebDriverException:
                return False  # between documents: ask again

        self.wait(replaced, what=f"the page after clicking {element!r}")
        self.settled(label)

    @property
    def path(self) -> str:
        """The path (and query) of the page shown."""
        url = str(self.driver.current_url)
        return url.removeprefix(self.base) if url.startswith(self.base) else url

    def login(self, token: str) -> None:
        """Log in through the form, as a user would; ends on the overview."""
        self.open("/login")
        self.find("form#login input#token").send_keys(token)
        self.submit("button#login-submit")
        self.find("main#page-overview")

    # -- reading -------------------------------------------------------------------------------

    def find(self, css: str, within: WebElement | None = None) -> WebElement:
        """The first element ``css`` selects, waiting up to ``BOUND`` for it to exist."""
        scope = within or self.driver

        def found(_: webdriver.Chrome) -> WebElement | None:
            with contextlib.suppress(NoSuchElementException):
                return scope.find_element(By.CSS_SELECTOR, css)
            return None

        return self.wait(found, what=f"an element {css!r} on {self.path}")

    def all(self, css: str, within: WebElement | None = None) -> list[WebElement]:
        """Every element ``css`` selects now (no waiting: may be none)."""
        return list((within or self.driver).find_elements(By.CSS_SELECTOR, css))

    def text(self, css: str) -> str:
        """The text content of ``css``'s element (also where it is hidden or scrolled away)."""
        return str(self.find(css).get_attribute("textContent") or "")

    def script(self, source: str, *args: Any) -> Any:
        return self.driver.execute_script(source, *args)

    def wait(
        self, condition: Callable[[webdriver.Chrome], T | bool | None], *, bound: float = BOUND,
        what: str = "a condition",
    ) -> T:  # fmt: skip
        """Poll ``condition`` until it is truthy; fail naming ``what`` after ``bound`` s."""
        try:
            found = WebDriverWait(self.driver, bound, poll_frequency=0.05).until(condition)
        except TimeoutException:
            raise AssertionError(f"timed out after {bound:g} s waiting for {what}") from None
        return cast(T, found)  # truthy: not None, and a bool only where T is one

    def wait_reloading(self, condition: Callable[[], bool], *, bound: float = BOUND,
                       what: str = "a condition") -> None:  # fmt: skip
        """Reload the page until ``condition`` holds on it (for what a page shows only as it
        is loaded, such as a job's state after it changed)."""

        def holds(_: webdriver.Chrome) -> bool:
            if condition():
                return True
            self.driver.refresh()
            self.wait(
                lambda d: d.execute_script("return document.readyState") == "complete",
                what="the page to load",
            )
            return False

        self.wait(holds, bound=bound, what=what)
        self.settled()

    # -- the session, for requests -------------------------------------------------------------

    def session(self) -> requests.Session:
        """A ``requests`` session holding this browser's cookies (the HttpOnly session cookie
        too: WebDriver sees every cookie)."""
        made = requests.Session()
        for cookie in self.driver.get_cookies():
            made.cookies.set(cookie["name"], cookie["value"], path=cookie.get("path", "/"))
        return made

    # -- evidence ------------------------------------------------------------------------------

    def shot(self, label: str | None = None) -> Path:
        """Save what the window shows, named after the page (or ``label``)."""
        slug = label or re.sub(r"[^A-Za-z0-9._-]+", "_", self.path).strip("_")[:80]
        name = f"{len(self.shots) + 1:02d}-{slug or 'root'}.png"
        path = self.shots_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        png = self.driver.get_screenshot_as_png()
        path.write_bytes(png)
        if self.also_into is not None:
            self.also_into.mkdir(parents=True, exist_ok=True)
            (self.also_into / f"{self.name}-{name}").write_bytes(png)
        self.shots.append(path)
        return path

    def read_console(self) -> list[dict[str, Any]]:
        """The console entries logged since the last read (each entry is read once)."""
        fresh: list[dict[str, Any]] = list(self.driver.get_log("browser"))  # type: ignore[no-untyped-call]
        self.console += fresh
        return fresh

    def check_console(self) -> None:
        """Fail on a SEVERE console entry not tolerated."""
        severe = [
            entry
            for entry in self.read_console()
            if entry.get("level") == "SEVERE"
            and not any(part in str(entry.get("message")) for part in self._tolerated)
        ]
        if severe:
            lines = "\n  ".join(str(entry.get("message")) for entry in severe)
            raise AssertionError(f"the browser's console on {self.path} says:\n  {lines}")

    @contextlib.contextmanager
    def tolerating(self, *fragments: str) -> Iterator[None]:
        """Within: SEVERE console entries holding one of ``fragments`` are expected (a page
        answered 4xx on purpose, which chromium logs as an error)."""
        before = self._tolerated
        self._tolerated = [*before, *fragments]
        try:
            yield
            self.check_console()  # what the browser logged within, read while still tolerated
        finally:
            self._tolerated = before


class StartBrowser(Protocol):
    def __call__(self, base_url: str, *, phone: bool = False) -> Browser: ...


def start_browser(
    base_url: str, shots_dir: Path, name: str, *, phone: bool = False, log: Path | None = None
) -> Browser:
    """A headless chromium at desktop size (``DESKTOP``) or a phone's (``PHONE``: its viewport
    emulated, as a window cannot be made that narrow)."""
    require_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ARGUMENTS:
        options.add_argument(argument)
    width, height = DESKTOP
    options.add_argument(f"--window-size={width},{height}")
    if phone:
        # A phone's viewport, touch and user agent: the page's <meta name="viewport"> decides
        # its layout width, as on a real phone.
        metrics = {"width": PHONE[0], "height": PHONE[1], "pixelRatio": 3.0, "touch": True}
        agent = (
            "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 "
            "(KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1"
        )
        options.add_experimental_option(
            "mobileEmulation", {"deviceMetrics": metrics, "userAgent": agent}
        )
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # A confirm() the page asks before an action is answered yes, also when it opens just as
    # a wait asks something else (the default would dismiss it, and the action not happen).
    options.unhandled_prompt_behavior = "accept"
    service = Service(str(CHROMEDRIVER), log_output=str(log) if log else None)
    try:
        driver = webdriver.Chrome(options=options, service=service)
    except WebDriverException as failure:
        service.stop()
        raise AssertionError(f"chromium did not start: {failure.msg}") from None
    driver.set_page_load_timeout(BOUND)
    also = os.environ.get("SPOOLD_SCREENSHOTS")
    return Browser(driver, base_url.rstrip("/"), name, shots_dir, Path(also) if also else None)


@pytest.fixture
def browsers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StartBrowser]:
    """Start browsers for this test (``browsers(url)``, ``browsers(url, phone=True)``); each
    is quit at its end, after a last look at its console."""
    started: list[Browser] = []
    test = re.sub(r"[^A-Za-z0-9._-]+", "_", request.node.name)

    def start(base_url: str, *, phone: bool = False) -> Browser:
        kind = "phone" if phone else "desktop"
        number = len(started) + 1
        made = start_browser(
            base_url, tmp_path / "screenshots" / f"{kind}-{number}", f"{test}-{kind}-{number}",
            phone=phone, log=tmp_path / f"chromedriver-{kind}-{number}.log",
        )  # fmt: skip
        started.append(made)
        return made

    yield start
    failures = []
    for browser in started:
        try:
            browser.check_console()
        except AssertionError as failure:
            failures.append(str(failure))
        except WebDriverException:
            pass  # the browser died: the test has said so
        finally:
            browser.driver.quit()
    if failures:
        pytest.fail("\n".join(failures), pytrace=False)
