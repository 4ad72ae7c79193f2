"""The HTTP app: the page, the JSON API, upload limits. Built on FastAPI (Starlette + OpenAPI),
served by uvicorn (`captioner serve`, cli/serve.py).

The server never opens a path named in a request: images arrive as uploaded bytes only.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any
from urllib.parse import unquote, urlsplit

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartParser
from swagger_ui_bundle import swagger_ui_path

from .. import __version__
from ..api import Captioner
from ..errors import ImageError, UsageError
from ..images import decode_bytes, image_from_bytes
from ..pipeline import caption_record
from ..settings import LOW_CONFIDENCE, TAGS_KEPT, TAGS_SHOWN, DecodingConfig, ServeLimits, Setting
from .batcher import Batcher
from .budget import Busy, ByteBudget, give_back_memory

STATIC = resources.files("captioner.serve") / "static"
TRIM_ABOVE = 64 * 2**20  # decoded bytes of an image after which freed memory is handed back to the system
MAX_TAGS = TAGS_KEPT  # tags a request may ask for: all a caption carries


def form_schema() -> dict[str, Any]:
    """The OpenAPI request body of the caption routes, generated from DecodingConfig: the files and
    every decoding setting a request may set (with this server's caps), tags and attention."""
    props: dict[str, Any] = {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}, "description": "the images"}
    }
    for s in DecodingConfig.settings():
        high = _cap(s)
        props[s.name] = {
            "type": "integer" if s.kind is int else "number",
            "minimum": s.low,
            **({"maximum": high} if high is not None else {}),
            "description": f"{s.help} (default: the model's, else {s.default:g})",
        }
    props["tags"] = {"type": "integer", "minimum": 0, "maximum": MAX_TAGS, "default": TAGS_SHOWN,
                     "description": "how many of the photo's top ImageNet classes to return"}  # fmt: skip
    props["attention"] = {"type": "boolean", "default": False,
                          "description": "attention models: each word's weights over the image grid"}  # fmt: skip
    body = {"type": "object", "required": ["files"], "properties": props}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": body}}}}


def _cap(s: Setting) -> float | None:
    """The most one request may ask of a setting: one request cannot ask for hours of work."""
    return s.serve_max if s.serve_max is not None else s.high


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413, whether it declares its length
    or streams it (counted as it arrives; the rest is never read)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = _error(413, f"request body over the upload limit of {self.max_bytes / 2**20:g} MB (--max-upload-mb)")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await too_big(scope, receive, send)
        received, started = 0, False

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge
            return message

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except _TooLarge:
            if not started:
                await too_big(scope, receive, send)


class _TooLarge(Exception):
    pass


_WHOLE = re.compile(r"-?[0-9]{1,9}")  # ASCII digits only ("²" and "٣" are digits to str.isdigit), no "--5"
_NUMBER = re.compile(r"-?(?:[0-9]{1,9}(?:\.[0-9]{0,9})?|\.[0-9]{1,9})")


def _int_field(form, name: str, default: int | None) -> int | None:
    value = form.get(name)
    if value is None or value == "":
        return default
    if not isinstance(value, str) or not _WHOLE.fullmatch(value.strip()):
        raise UsageError(f"field {name!r} must be a whole number, not {str(value)[:40]!r}")
    return int(value)


def _number_field(form, name: str) -> float | None:
    value = form.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not _NUMBER.fullmatch(value.strip()):
        raise UsageError(f"field {name!r} must be a number like 0.5, not {str(value)[:40]!r}")
    return float(value)


class SameOrigin:
    """ASGI middleware: a request that changes something (POST and the like) from a page of another
    site gets 403, unless that site is in `allowed` — a multipart form post needs no CORS preflight,
    so without this any page the user visits could make their browser upload to this server and
    use its CPU. Allowed origins get CORS headers (and their preflights are answered); requests
    without Origin/Referer (curl, scripts) and the server's own page pass."""

    def __init__(self, app, allowed: Sequence[str] = ()) -> None:
        self.app, self.allowed = app, {o.rstrip("/").lower() for o in allowed}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        origin, host = _origin_of(headers), headers.get("host", "").lower()
        own = origin is not None and host != "" and urlsplit(origin).netloc.lower() == host  # "null" has no host
        allowed = origin is not None and origin in self.allowed
        if scope["method"] == "OPTIONS" and allowed:  # a preflight from an allowed site
            return await self._cors(
                Response(
                    status_code=204,
                    headers={"Access-Control-Allow-Methods": "GET, POST", "Access-Control-Allow-Headers": "*"},
                ),  # fmt: skip
                origin,
            )(scope, receive, send)
        cross_site = not own and (origin is not None or headers.get("sec-fetch-site") == "cross-site")
        if scope["method"] not in ("GET", "HEAD", "OPTIONS") and cross_site and not allowed:
            shown = origin or "another site"
            message = f"cross-site request from {shown} refused (`captioner serve --allow-origin {shown}` allows it)"
            return await _error(403, message)(scope, receive, send)
        if not allowed:
            return await self.app(scope, receive, send)

        async def send_with_cors(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"access-control-allow-origin", origin.encode()),
                                      (b"vary", b"Origin")]  # fmt: skip
            await send(message)

        await self.app(scope, receive, send_with_cors)

    @staticmethod
    def _cors(response: Response, origin: str) -> Response:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"
        return response


def _origin_of(headers: dict[str, str]) -> str | None:
    """scheme://host[:port] of the page that made the request (Origin, else Referer), lower case."""
    raw = headers.get("origin") or headers.get("referer")
    if not raw or raw == "null":
        return None if not raw else "null"
    parts = urlsplit(raw)
    return f"{parts.scheme}://{parts.netloc}".lower()


def create_app(model: Captioner, limits: ServeLimits = ServeLimits(), allow_origins: Sequence[str] = ()) -> FastAPI:
    """The app serving `model`: the page at /, the API under /api, OpenAPI docs at /docs.
    allow_origins: other sites (scheme://host:port) whose pages may call the API."""
    batcher = Batcher(model, max_batch=limits.batch_size, max_wait_ms=limits.batch_wait_ms)
    decode_budget = ByteBudget(int(limits.max_decode_mb * 2**20), wait_s=limits.decode_wait_s)  # the server's

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(
        title="captioner",
        version=__version__,
        description="Image captioning: upload photos, get captions (the JSON of `captioner caption --json`).",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's pages load Swagger UI / ReDoc from a CDN: ours is served from a package
        redoc_url=None,
    )
    app.state.batcher = batcher
    app.add_middleware(BodyLimit, max_bytes=int(limits.max_upload_mb * 2**20))
    app.add_middleware(SameOrigin, allowed=allow_origins)  # added last: runs first
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    app.mount("/swagger", StaticFiles(directory=swagger_ui_path), name="swagger")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        """The interactive API page (Swagger UI), every asset from this server: it works offline."""
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title="captioner API",
            swagger_js_url="/swagger/swagger-ui-bundle.js",
            swagger_css_url="/swagger/swagger-ui.css",
            swagger_favicon_url="/swagger/favicon-32x32.png",
        )

    attention_model = model.decoder.attends_over == "regions"

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:  # never a traceback to the client
        return _error(500, f"internal error: {type(exc).__name__}")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    @app.get("/api/health")
    async def health() -> dict[str, Any]:
        """Alive, and how much work is waiting."""
        return {"status": "ok", "waiting": batcher.waiting, "batches_run": len(batcher.batches)}

    @app.get("/api/model")
    async def model_info() -> dict[str, Any]:
        """What model is served: the model card's summary and the decoding defaults."""
        c = model.config
        return {
            "encoder": c.get("encoder"),
            "decoder": c.get("decoder"),
            "fine_tuned_encoder_blocks": c.get("fine_tune_encoder", 0),
            "vocabulary": len(model.vocab),
            "sequence_model": model.is_sequence_model,
            "attention": attention_model,
            "tags": model.model.has_classifier,
            "confidence": model.calibrated,
            "decoding": model.decoding,
            "limits": {"max_upload_mb": limits.max_upload_mb, "max_files": limits.max_files},
            "summary": c.get("summary")
            or "Trained on Flickr8k (people, dogs, outdoor scenes): see the model card (assets/MODEL_CARD.md).",
        }

    async def read_form(request: Request) -> tuple[Any, list[tuple[str, bytes | None, str | None]]]:
        """The form and its `files` in upload order: (name, bytes or None, problem or None)."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise _BadRequest(400, "send multipart/form-data with the images in the repeatable field 'files'")
        parser = _Rfc5987Parser(request.headers, request.stream(), max_files=limits.max_files, max_fields=50)
        try:
            form = await parser.parse()
        except _TooLarge:
            raise
        except Exception as e:  # malformed multipart, too many files or fields
            detail = getattr(e, "detail", None) or str(e) or type(e).__name__
            status = 413 if "Too many files" in str(detail) else 400
            raise _BadRequest(status, f"malformed or refused upload: {detail}") from None
        items = []
        for value in form.getlist("files"):
            if isinstance(value, UploadFile):
                items.append((value.filename or "<unnamed>", await value.read(), None))
            else:  # a plain text field: never read as a path
                items.append((str(value)[:80], None, "not a file upload (the server never reads a path)"))
        await form.close()  # the uploads are read: their spooled files go
        if not items:
            raise _BadRequest(400, "no images: send them in the repeatable field 'files'")
        return form, items

    def decoding_options(form) -> tuple[dict[str, Any], int]:
        """The decoding settings a request asks for (the fields of DecodingConfig), and how many tags
        it wants; UsageError for nonsense."""
        given = {
            s.name: _int_field(form, s.name, None) if s.kind is int else _number_field(form, s.name)
            for s in DecodingConfig.settings()
        }
        options = model.resolve_decoding(**given)  # UsageError for nonsense
        for s in DecodingConfig.settings():
            cap = _cap(s)
            if cap is not None and options[s.name] > cap:
                raise UsageError(f"{s.name} {options[s.name]} is over this server's limit of {cap:g}")
        tags = _int_field(form, "tags", TAGS_SHOWN)
        if not 0 <= tags <= MAX_TAGS:
            raise UsageError(f"tags must be 0 to {MAX_TAGS}, not {tags}")
        return options, tags

    def to_pixels(name: str, data: bytes):
        return model.prepare(image_from_bytes(data, name, limits.max_pixels))  # an ensemble prepares for each member

    async def prepare(items) -> list[Any]:
        """Each upload decoded and preprocessed off the event loop, in parallel as far as the memory
        budgets allow: pixels or its ImageError (Busy when the server's budget stays full)."""
        loop = asyncio.get_running_loop()
        per_request = ByteBudget(int(limits.max_request_decode_mb * 2**20))
        largest = 0

        async def one(name: str, data: bytes | None, problem: str | None) -> Any:
            nonlocal largest
            if problem:
                return ImageError(name, problem)
            try:
                cost = decode_bytes(data, name, limits.max_pixels)  # from the header: nothing decoded yet
                largest = max(largest, cost)
                if cost > per_request.capacity:
                    cap = f"{limits.max_request_decode_mb:g} MB a request may use (--max-request-decode-mb)"
                    raise ImageError(name, f"decoding it would take {cost / 2**20:,.0f} MB, over the {cap}")
                async with per_request.hold(cost), decode_budget.hold(cost):
                    return await loop.run_in_executor(None, to_pixels, name, data)
            except ImageError as e:
                return e

        try:
            return list(await asyncio.gather(*(one(*item) for item in items)))
        finally:
            if largest >= TRIM_ABOVE:  # only after large images: trimming the heap costs time
                await loop.run_in_executor(None, give_back_memory)

    def record(name: str, nbest, form, n_tags: int) -> dict[str, Any]:
        entry = {"file": name} | caption_record(nbest, n_tags, LOW_CONFIDENCE)
        if attention_model and form.get("attention") in ("1", "true") and nbest[0].attention is not None:
            best = nbest[0]
            weights = [[round(x, 4) for x in row] for row in best.attention.tolist()]  # (words, R)
            entry["attention"] = {
                "words": list(best.words),
                "side": best.attention_grid().shape[-1],  # the grid is side x side over the centre crop
                "crop": model.preprocess.crop / model.preprocess.resize,  # the crop's share of the short side
                "weights": weights,
            }
        return entry

    async def parse(request: Request) -> tuple[Any, list, dict[str, Any], int, list[Any]] | JSONResponse:
        """(form, its files, the decoding settings, tags wanted, each file's pixels or ImageError),
        or the JSON error that answers a request that cannot be taken."""
        try:
            form, items = await read_form(request)
            options, n_tags = decoding_options(form)
        except _BadRequest as e:
            return _error(e.status, e.message)
        except UsageError as e:
            return _error(400, str(e))
        try:
            return form, items, options, n_tags, await prepare(items)
        except Busy:
            return _error(503, "the server is decoding as many images as its memory budget allows: try again soon")

    @app.post("/api/caption", openapi_extra=form_schema())
    async def caption(request: Request) -> JSONResponse:
        """Caption each uploaded image (field `files`, repeatable; fields: every decoding setting,
        tags, attention): the JSON objects of `captioner caption --json`, in upload
        order, each with its `file` name; a bad file gets {"file", "error"} in its place."""
        parsed = await parse(request)
        if isinstance(parsed, JSONResponse):
            return parsed
        form, items, options, n_tags, pixels = parsed
        ok = [p for p in pixels if not isinstance(p, ImageError)]
        results = iter(await asyncio.gather(*(batcher.caption(p, **options) for p in ok)))
        entries = []
        for (name, _, _), p in zip(items, pixels):
            if isinstance(p, ImageError):
                entries.append({"file": name, "error": p.reason})
            else:
                entries.append(record(name, next(results), form, n_tags))
        if not ok:
            return _error(422, "no image could be read", results=entries)
        return JSONResponse(entries)

    @app.post("/api/caption-sequence", openapi_extra=form_schema())
    async def caption_sequence(request: Request) -> JSONResponse:
        """One caption for the uploaded images as an ordered sequence (upload order = frame order)."""
        parsed = await parse(request)
        if isinstance(parsed, JSONResponse):
            return parsed
        _, items, options, _, pixels = parsed
        bad = [(name, p) for (name, _, _), p in zip(items, pixels) if isinstance(p, ImageError)]
        if bad:
            return _error(422, f"{bad[0][0]}: {bad[0][1].reason} (sequence not captioned)",
                          files=[{"file": n, "error": p.reason} for n, p in bad])  # fmt: skip
        nbest = await batcher.run(lambda: model.decode(model.encode_sequences([pixels]), **options)[0])
        entry = {"files": [name for name, _, _ in items]} | caption_record(nbest, 0, LOW_CONFIDENCE)
        return JSONResponse(entry)

    return app


class _Rfc5987Parser(MultiPartParser):
    """Starlette's multipart parser, also taking files named only in RFC 5987 form
    (`filename*=UTF-8''na%C3%AFve.jpg`, as some clients send non-ASCII names), which the parser
    underneath drops, turning the file into a text field."""

    def on_headers_finished(self) -> None:
        part = self._current_part
        text = part.content_disposition.decode("latin-1")
        extended = re.search(r"filename\*\s*=\s*([^;]+)", text, flags=re.IGNORECASE)
        if extended and not re.search(r"(^|;)\s*filename\s*=", text, flags=re.IGNORECASE):
            charset, _, value = extended.group(1).strip().strip('"').partition("'")
            value = value.partition("'")[2]  # after the language tag
            try:
                name = unquote(value, encoding=charset or "utf-8", errors="replace")
            except LookupError:  # an unknown charset
                name = unquote(value, errors="replace")
            quoted = name.replace("\\", "\\\\").replace('"', '\\"')
            part.content_disposition = (text + f'; filename="{quoted}"').encode("utf-8")
        super().on_headers_finished()


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message
