"""The page for people at ``/``, its assets, the example photos, and ``/docs`` and ``/redoc``
served from the service itself (their assets come from the fastapi-offline package, not a
CDN), so all of it works on a machine with no internet."""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

from service.deps import SettingsDep
from service.errors import ApiError, ErrorBody
from service.preprocessing import shown

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
DOCS_ASSETS = Path(fastapi_offline.__file__).parent / "static"
EXAMPLE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# Only this host, no inline script or style, no framing: what the page needs and no more.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; "
            "img-src 'self' blob: data:; media-src 'self' blob: mediastream:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# no-cache: asked again each time (an ETag makes that a 304); with no Cache-Control, browsers
# kept an old app.js under a new page for days after an upgrade (a review).
PAGE_HEADERS = {"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
                "Cache-Control": "no-cache"}
# Swagger UI and ReDoc start from inline code FastAPI writes, so they need 'unsafe-inline';
# everything they fetch stays on this host (ReDoc's footer logo would come from its CDN).
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; "
            "style-src 'self' 'unsafe-inline'; img-src 'self' data:; worker-src 'self' blob:; "
            "connect-src 'self'; frame-ancestors 'none'")

router = APIRouter(tags=["page"])


def without_range(scope: dict) -> dict:
    """The request without its Range header. These files are small and sent whole, as HTTP
    lets a server do: Starlette answered a malformed or unsatisfiable Range in plain text,
    where every error body of this service is JSON (a review)."""
    return {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"range"]}


class WholeFileResponse(FileResponse):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        del self.headers["accept-ranges"]

    async def __call__(self, scope, receive, send):
        await super().__call__(without_range(scope), receive, send)


class WholeFiles(StaticFiles):
    async def __call__(self, scope, receive, send):
        await super().__call__(without_range(scope), receive, send)

    async def get_response(self, path: str, scope):
        response = await super().get_response(path, scope)
        if "accept-ranges" in response.headers:
            del response.headers["accept-ranges"]
        return response


class PageFiles(WholeFiles):
    """The page's files, each with the page's headers: /static/index.html is the page too,
    and it was served there without them (framable by any site)."""

    async def get_response(self, path: str, scope):
        response = await super().get_response(path, scope)
        response.headers.update(PAGE_HEADERS)
        return response


@router.get("/", include_in_schema=False)
async def page() -> WholeFileResponse:
    return WholeFileResponse(STATIC_DIR / "index.html", media_type="text/html",
                             headers=PAGE_HEADERS)


def example_names(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in EXAMPLE_SUFFIXES)


@router.get("/examples", summary="The sample photos the page offers", response_model=list[str])
async def list_examples(settings: SettingsDep) -> list[str]:
    return example_names(settings.examples_dir)


@router.get("/examples/{name}", summary="One sample photo", responses={
    200: {"content": {"image/jpeg": {}}, "description": "the photo"},
    404: {"model": ErrorBody, "description": "no example of that name (`not_found`)"}})
async def get_example(name: str, settings: SettingsDep) -> WholeFileResponse:
    if name not in example_names(settings.examples_dir):  # never a path from the client
        raise ApiError(404, "not_found", f"no example named {shown(name)}")
    return WholeFileResponse(settings.examples_dir / name)


def install_page(app: FastAPI) -> None:
    """The page's router, its static files, and the offline /docs and /redoc."""
    app.include_router(router)
    app.mount("/static", PageFiles(directory=STATIC_DIR), name="static")
    app.mount("/docs-assets", WholeFiles(directory=DOCS_ASSETS), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        html = get_swagger_ui_html(
            openapi_url=app.openapi_url, title=f"{app.title}: Swagger UI",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon.png")
        html.headers["Content-Security-Policy"] = DOCS_CSP
        return html

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        html = get_redoc_html(openapi_url=app.openapi_url, title=f"{app.title}: ReDoc",
                              redoc_js_url="/docs-assets/redoc.standalone.js",
                              redoc_favicon_url="/docs-assets/favicon.png",
                              with_google_fonts=False)
        html.headers["Content-Security-Policy"] = DOCS_CSP
        return html
