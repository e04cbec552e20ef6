from django.conf import settings
from django.http import HttpResponseRedirect, StreamingHttpResponse
from django.utils.html import escape

from flowgate_client import Client, FlowgateError

FLOWGATE = Client(settings.FLOWGATE_URL, token=settings.FLOWGATE_TOKEN)


def job_archive(pandaid):
    """(URL, sha256) of the job's MLflow archive: the portal's own lookup."""
    raise NotImplementedError


def open_in_mlflow(request, pandaid):
    """The job page's "open in MLflow" link: ask Flowgate for the job's instance;
    redirect when it is ready, else stream its launch steps and redirect at the end."""
    url, sha256 = job_archive(pandaid)
    instance = FLOWGATE.create(str(pandaid), url=url, sha256=sha256, ttl="24h")
    if instance.ready:
        # the access link: it signs this user's browser in to the instance
        return HttpResponseRedirect(instance.open_url)

    def page():
        yield "<!doctype html><meta charset=utf-8><title>Starting MLflow</title><ul>\n"
        yield "<!--" + " " * 1024 + "-->\n"  # browsers render a streamed page after its first KiB
        try:
            for event in FLOWGATE.events(instance.id, timeout=600):
                yield f"<li>{escape(event.step)} {escape(event.message or '')}</li>\n"
                if event.step == "ready":
                    ready = escape(FLOWGATE.get(instance.id).open_url)  # a fresh access link
                    yield f'</ul><meta http-equiv=refresh content="0; url={ready}"><a href="{ready}">Open MLflow</a>\n'
                    return
                if event.final:  # failed, expired, deleted
                    yield f"</ul><p>MLflow could not be started: {escape(event.message or event.step)}</p>\n"
                    return
        except FlowgateError as e:
            yield f"</ul><p>MLflow could not be started: {escape(str(e))}</p>\n"

    return StreamingHttpResponse(page(), content_type="text/html; charset=utf-8")
