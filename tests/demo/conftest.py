import pytest


@pytest.fixture(autouse=True)
def _orm_beside_playwright(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sync Playwright keeps an event loop running in this thread; the fixtures' ORM calls are
    still plain synchronous code, so Django's async-context guard does not apply to them."""
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
