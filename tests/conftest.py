"""Shared pytest setup.

Browser tests (dash[testing]'s ``dash_duo``) run Chromium headless so that plain ``pytest`` works
as root without a display (dash adds --no-sandbox itself when running as root).
"""

from __future__ import annotations

import pytest


def pytest_setup_options():
    """Chrome options for dash[testing]: headless, no GPU, fixed window size."""
    from selenium.webdriver.chrome.options import Options

    options = Options()
    options.add_argument("--headless=new")
    options.add_argument("--no-sandbox")
    options.add_argument("--disable-gpu")
    options.add_argument("--disable-dev-shm-usage")
    options.add_argument("--window-size=1400,1000")
    return options


@pytest.fixture(scope="session")
def lvlm_run(tmp_path_factory):
    """One tiny LLaVA and its recordings, shared by the lvlm tests (``tests.helpers.make_lvlm_run``)."""
    from tests.helpers import make_lvlm_run

    return make_lvlm_run(tmp_path_factory.mktemp("lvlm"))
