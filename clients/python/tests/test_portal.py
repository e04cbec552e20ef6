"""The README's portal example (examples/portal_view.py, a Django view), called as a
plain function with Django's RequestFactory against the real server."""

from __future__ import annotations

import importlib.util
import re

import httpx
import pytest
from conftest import ROOT, TOKENS

EXAMPLE = ROOT / "clients" / "python" / "examples" / "portal_view.py"


@pytest.fixture(scope="module")
def portal(server):
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            DEBUG=False,
            ALLOWED_HOSTS=["testserver"],
            FLOWGATE_URL=server.url,
            FLOWGATE_TOKEN=TOKENS["portal"],
        )
        django.setup()
    spec = importlib.util.spec_from_file_location("portal_view", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    module.FLOWGATE.close()


def test_the_readme_shows_the_tested_view():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert EXAMPLE.read_text() in blocks, "README's portal section must show examples/portal_view.py verbatim"


def call(portal, monkeypatch, pandaid, url, sha256):
    from django.test import RequestFactory

    monkeypatch.setattr(portal, "job_archive", lambda p: (url, sha256) if p == pandaid else None)
    return portal.open_in_mlflow(RequestFactory().get(f"/jobs/{pandaid}/mlflow"), pandaid)


def test_view_streams_progress_then_redirects(portal, monkeypatch, archive):
    response = call(portal, monkeypatch, 6543210, archive.url, archive.sha256)
    assert response.status_code == 200 and response.streaming
    assert response["Content-Type"].startswith("text/html")
    page = b"".join(response.streaming_content).decode()
    steps = re.findall(r"<li>(\w+)", page)
    assert steps[0] == "created" and steps[-1] == "ready", steps
    assert {"downloading", "verified", "starting"} <= set(steps)
    instance = portal.FLOWGATE.list(workload="6543210")[0]
    assert instance.ready and instance.owner == "portal"
    # the user is sent to a fresh access link (the plain URL would get a 401)
    link = re.search(r'<meta http-equiv=refresh content="0; url=(\S+)">', page).group(1)
    assert link.startswith(instance.url + "?flowgate_access="), link
    assert f'<a href="{link}">Open MLflow</a>' in page
    with httpx.Client(follow_redirects=True, timeout=30) as browser:
        opened = browser.get(link)
        assert opened.status_code == 200 and str(opened.url) == instance.url

    # the next click on the link: the instance is live and ready, straight there
    again = call(portal, monkeypatch, 6543210, archive.url, archive.sha256)
    assert again.status_code == 302
    assert again["Location"].startswith(instance.url + "?flowgate_access=")
    portal.FLOWGATE.delete(instance.id)


def test_view_shows_why_the_launch_failed(portal, monkeypatch, archive):
    response = call(portal, monkeypatch, 7654321, archive.url, "f" * 64)
    page = b"".join(response.streaming_content).decode()
    assert "<li>failed" in page and "MLflow could not be started" in page
    assert "<meta http-equiv=refresh" not in page
    for inst in portal.FLOWGATE.list(workload="7654321"):
        portal.FLOWGATE.delete(inst.id)
