"""Every limit `captioner serve` enforces, at its edge: a request exactly at the limit is answered,
one past it is refused with one status code and a message naming what was over. The limits are
read from the code (DecodingConfig's caps, ServeLimits, TAGS_KEPT, the images' decoding cost),
never copied; where a default is too large to reach in a test, a small ServeLimits stands in.

Fast tier: the ASGI app is called in this process (no sockets, no uvicorn), over a small random
attention model; each test makes its own app (create_app is cheap; the model is shared)."""

from __future__ import annotations

import asyncio
import io
import json
import platform
import random
import re
import struct
import threading
import zlib
from typing import Any, NamedTuple

import pytest
import torch
import torchvision  # noqa: F401 - imported by preprocessing (5 s): at collection, once for all of mutmut's forks
from PIL import Image

from captioner.images import decode_bytes
from captioner.serve import budget
from captioner.serve.app import MAX_TAGS, TRIM_ABOVE, create_app
from captioner.serve.budget import Busy, ByteBudget
from captioner.settings import TAGS_SHOWN, DecodingConfig, ServeLimits

BOUNDARY = "limits0boundary0"


# ---- a client for the ASGI app, in this process --------------------------------------------------
class Reply(NamedTuple):
    status: int
    body: Any  # the JSON, else the bytes
    headers: dict[str, str]

    @property
    def error(self) -> str:
        assert isinstance(self.body, dict) and isinstance(self.body.get("error"), str), self.body
        return self.body["error"]


def multipart(files: list[tuple[str, bytes]], fields: dict[str, str] | list[tuple[str, str]] = ()) -> bytes:
    out = io.BytesIO()
    for k, v in fields.items() if isinstance(fields, dict) else fields:
        out.write(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    for name, data in files:
        head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
        out.write(head.encode() + b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n")
    out.write(f"--{BOUNDARY}--\r\n".encode())
    return out.getvalue()


class Client:
    """The app on an event loop of this thread, started and stopped as a server does (a "lifespan"
    scope through the whole app, middleware included); each request runs the loop until it is
    answered (the batcher's task and the executors' callbacks run meanwhile)."""

    def __init__(self, app) -> None:
        self.app, self.loop = app, asyncio.new_event_loop()
        self._events: asyncio.Queue = asyncio.Queue()
        self._replies: asyncio.Queue = asyncio.Queue()
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
        self._lifespan = self.loop.create_task(app(scope, self._events.get, self._replies.put))
        assert self._lifespan_step("startup")["type"] == "lifespan.startup.complete"

    def _lifespan_step(self, step: str) -> dict:
        async def step_through() -> dict:
            await self._events.put({"type": f"lifespan.{step}"})
            return await self._replies.get()

        return self.loop.run_until_complete(asyncio.wait_for(step_through(), 30))

    def close(self) -> None:
        assert self._lifespan_step("shutdown")["type"] == "lifespan.shutdown.complete"
        self.loop.run_until_complete(self._lifespan)
        self.loop.close()

    async def _call(self, method: str, path: str, chunks: list[bytes], headers: dict[str, str]) -> Reply:
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()],
            "client": ("127.0.0.1", 5000), "server": ("testserver", 80),
        }  # fmt: skip
        incoming = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
        sent: list[dict] = []
        answered = asyncio.Event()

        async def receive() -> dict:
            if incoming:
                return incoming.pop(0)
            await answered.wait()  # as a server does: the client is gone once it has its answer
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                answered.set()

        try:
            await self.app(scope, receive, send)
        except Exception:  # re-raised, after its 500 went out, for the server to log (as Starlette does)
            if not answered.is_set():
                raise
        [start] = [m for m in sent if m["type"] == "http.response.start"]
        data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        hdrs = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in start.get("headers", [])}  # any case
        is_json = hdrs.get("content-type", "").startswith("application/json")
        return Reply(start["status"], json.loads(data) if is_json else data, hdrs)

    def request(self, method: str, path: str, body: bytes = b"", headers=None, chunks=None, declare=True) -> Reply:
        """`chunks`: the body in these pieces; declare=False: no Content-Length (as a chunked upload).
        Host is testserver unless given (None: no such header)."""
        headers = {"host": "testserver"} | {k.lower(): v for k, v in (headers or {}).items()}
        if declare and chunks is None:
            headers["content-length"] = str(len(body))
        headers = {k: v for k, v in headers.items() if v is not None}
        return self.loop.run_until_complete(
            asyncio.wait_for(self._call(method, path, chunks if chunks is not None else [body], headers), 60)
        )

    def post(self, files, fields=(), path: str = "/api/caption", declare: bool = True, headers=None) -> Reply:
        body = multipart(files, fields)
        headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}", **(headers or {})}
        if declare:
            return self.request("POST", path, body, headers)
        pieces = [body[i : i + 4096] for i in range(0, len(body), 4096)]
        return self.request("POST", path, headers=headers, chunks=pieces, declare=False)

    def get(self, path: str) -> Reply:
        return self.request("GET", path)


# ---- the model, the apps, the images --------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    """A small attention model of random weights over a one-layer random encoder with an ImageNet
    head (so `attention` and tags answer): the server's shapes, built in 0.1 s, nothing trained.
    One torch thread while it runs: its tensors are too small to share out."""
    from torch import nn

    from captioner import Captioner
    from captioner.encoders import Encoder, EncoderSpec
    from captioner.images import Preprocess
    from captioner.models import build_model
    from captioner.training import TrainOptions
    from captioner.vocab import Vocabulary

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    spec = EncoderSpec("tiny", 16, Preprocess(resize=40, crop=32))
    trunk = nn.Sequential(nn.Conv2d(3, 16, kernel_size=8, stride=8))  # a 4 x 4 grid of 16 features
    encoder = Encoder(spec, trunk, [trunk[0]], head=nn.Linear(16, 1000))
    opts = TrainOptions(decoder="attention", temporal="none", hidden_size=32, embed_size=16, attention_size=16)
    vocab = Vocabulary([f"w{i}" for i in range(40)])
    config = {
        "encoder": spec.name,
        "decoder": "attention",
        "decoder_hparams": opts.decoder_hparams(),
        "temporal": opts.temporal_config(),
        "preprocess": spec.preprocess.to_dict(),
        "fine_tune_encoder": 0,
    }
    made = Captioner(encoder, build_model(config, len(vocab), spec.feature_dim), vocab, config, device="cpu")
    assert made.decoder.attends_over == "regions" and made.model.has_classifier
    yield made
    torch.set_num_threads(threads)


@pytest.fixture
def serve(model):
    """serve(limits) -> a Client of a new app over the model; closed after the test. The app is
    made inside the test, so mutation testing (mutmut) sees which tests reach create_app."""
    opened: list[Client] = []

    def make(limits: ServeLimits = ServeLimits(batch_wait_ms=0), allow_origins=()) -> Client:
        opened.append(Client(create_app(model, limits, allow_origins)))
        return opened[-1]

    yield make
    for c in opened:
        c.close()


def png(width: int = 24, height: int = 24, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), 90).save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring width x height RGB pixels and holding none (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


PNG = png()
ONE = [("a.png", PNG)]


def cap_of(s) -> float:
    """The most one request may ask of a setting, as the server declares it (app._cap)."""
    return s.serve_max if s.serve_max is not None else s.high


CAPPED = [s for s in DecodingConfig.settings() if cap_of(s) is not None]
UNCAPPED = [s for s in DecodingConfig.settings() if cap_of(s) is None]


def at(s, value: float) -> str:
    """`value` as a form field of setting `s`: a whole number, or a number with 9 decimals at most."""
    return str(int(value)) if s.kind is int else f"{value:.9f}".rstrip("0").rstrip(".")


def with_needs(s, value: str) -> dict[str, str]:
    """The form asking `s` = value, with what that needs to be allowed: min_len needs a max_len as long."""
    return {s.name: value, "max_len": value} if s.name == "min_len" else {s.name: value}


# ---- decoding settings: each cap and each least value ------------------------------------------------
def test_every_decoding_cap_is_answered_at_the_cap_and_refused_past_it(serve):
    c = serve()
    assert {s.name for s in CAPPED} >= {"beam_size", "max_len", "min_len", "n_best"}  # the work a request asks
    for s in CAPPED:
        cap = cap_of(s)
        r = c.post(ONE, with_needs(s, at(s, cap)))
        assert r.status == 200 and r.body[0]["caption"] is not None, (s.name, cap, r.body)
        pasts = [cap + 1] + ([cap + 1e-9] if s.kind is float else [])  # the least step a form can ask for
        for past in pasts:
            r = c.post(ONE, {s.name: at(s, past)})
            assert r.status == 400, (s.name, past, r.body)
            if s.name == "min_len":  # past max_len's cap too: refused as longer than max_len
                assert r.error.startswith(f"min length {at(s, past)} is more than max length"), r.error
            else:  # the field and its limit
                assert s.name in r.error and f"{cap:g}" in r.error, (s.name, r.error)


def test_caps_are_refused_on_the_sequence_route_too(serve):
    c = serve()
    for s in CAPPED:
        r = c.post(ONE, {s.name: at(s, cap_of(s) + 1)}, path="/api/caption-sequence")
        assert r.status == 400 and (s.name in r.error or r.error.startswith(s.label)), (s.name, r.body)


def test_the_caps_reach_the_decoder(serve):
    """At the caps of n_best and max_len (min_len = max_len: every caption that long), the answer
    has that many captions of that many words: the settings are used, not only checked."""
    caps = {s.name: int(cap_of(s)) for s in CAPPED if s.name in ("n_best", "max_len", "beam_size")}
    c = serve()
    fields = {"n_best": str(caps["n_best"]), "beam_size": str(caps["beam_size"]), "max_len": str(caps["max_len"]),
              "min_len": str(caps["max_len"])}  # fmt: skip
    r = c.post(ONE, fields)
    assert r.status == 200
    nbest = r.body[0]["nbest"]
    assert len(nbest) == caps["n_best"], len(nbest)
    assert all(len(n["caption"].split()) == caps["max_len"] for n in nbest), [n["caption"] for n in nbest]
    r = c.post(ONE, {"max_len": "3", "n_best": "2"})
    assert r.status == 200 and all(len(n["caption"].split()) <= 3 for n in r.body[0]["nbest"])
    r = c.post(ONE * 2, {"max_len": "3", "n_best": "2"}, path="/api/caption-sequence")  # and for sequences
    nbest = r.body["nbest"]
    assert r.status == 200 and len(nbest) == 2 and all(len(n["caption"].split()) <= 3 for n in nbest), r.body


def test_every_setting_at_its_least_value_is_answered_and_below_it_refused(serve):
    c = serve()
    for s in DecodingConfig.settings():
        r = c.post(ONE, {s.name: at(s, s.low)})
        assert r.status == 200, (s.name, s.low, r.body)
        below = s.low - 1 if s.kind is int else s.low - 1e-9
        r = c.post(ONE, {s.name: at(s, below)})
        assert r.status == 400 and f"{s.name}=" in r.error and f">= {s.low:g}" in r.error, (s.name, r.body)


def test_min_len_may_equal_max_len_and_not_pass_it(serve):
    c = serve()
    assert c.post(ONE, {"max_len": "4", "min_len": "4"}).status == 200
    r = c.post(ONE, {"max_len": "4", "min_len": "5"})
    assert r.status == 400 and "min length 5" in r.error and "max length 4" in r.error


def test_settings_without_a_cap_cost_nothing_at_the_largest_number_a_form_holds(serve):
    """no_repeat_ngram and constraints_needed have no server cap: at 999,999,999 (the most a form
    field may spell) the request is answered like any other."""
    assert {s.name for s in UNCAPPED} == {"no_repeat_ngram", "constraints_needed"}
    c = serve()
    for s in UNCAPPED:
        r = c.post(ONE, {s.name: "999999999"})
        assert r.status == 200 and r.body[0]["caption"] is not None, (s.name, r.body)


# ---- tags, attention, form numbers --------------------------------------------------------------------
def test_tags_from_none_to_every_one_kept(serve):
    c = serve()
    r = c.post(ONE, {"tags": str(MAX_TAGS)})
    assert r.status == 200 and len(r.body[0]["tags"]) == MAX_TAGS
    r = c.post(ONE, {"tags": "0"})
    assert r.status == 200 and "tags" not in r.body[0]
    assert len(c.post(ONE).body[0]["tags"]) == TAGS_SHOWN  # unasked: the default number
    for bad in (MAX_TAGS + 1, -1):
        r = c.post(ONE, {"tags": str(bad)})
        assert r.status == 400 and r.error == f"tags must be 0 to {MAX_TAGS}, not {bad}"


def test_numbers_in_form_fields_are_nine_digits_at_most(serve):
    c = serve()
    r = c.post(ONE, {"tags": "000000003"})  # nine digits: read
    assert r.status == 200 and len(r.body[0]["tags"]) == 3
    r = c.post(ONE, {"tags": "0000000003"})  # ten: refused before any number is made of it
    assert r.status == 400 and r.error == "field 'tags' must be a whole number, not '0000000003'"
    assert c.post(ONE, {"length_alpha": "0.000000001"}).status == 200  # nine decimals
    r = c.post(ONE, {"length_alpha": "0.0000000001"})
    assert r.status == 400 and r.error == "field 'length_alpha' must be a number like 0.5, not '0.0000000001'"
    assert c.post(ONE, {"length_alpha": ".5"}).status == 200 and c.post(ONE, {"length_alpha": "1."}).status == 200
    for field in ("beam_size", "length_alpha"):  # an empty field is the model's default
        assert c.post(ONE, {field: ""}).status == 200
    long = "1" * 60 + "x"  # what a refusal quotes back is cut at 40 characters
    for field in ("beam_size", "length_alpha"):
        r = c.post(ONE, {field: long})
        assert r.status == 400 and r.error.endswith(f"not {'1' * 40!r}"), r.error


def test_attention_is_given_when_asked_for_only(serve):
    c = serve()
    noise = Image.frombytes("RGB", (48, 48), random.Random(0).randbytes(48 * 48 * 3))
    buf = io.BytesIO()
    noise.save(buf, format="PNG")  # a picture whose regions differ: weights that are not all alike
    for asked in ("1", "true"):
        [entry] = c.post([("noise.png", buf.getvalue())], {"attention": asked, "max_len": "4"}).body
        att = entry["attention"]
        assert att["words"] == entry["caption"].split() and len(att["weights"]) == len(att["words"])
        side = att["side"]
        assert side > 1 and all(len(row) == side * side for row in att["weights"])
        for row in att["weights"]:  # each word's weights over the grid: a distribution, to 4 decimals
            assert abs(sum(row) - 1) < 1e-3 and all(0 <= w <= 1 and round(w, 4) == w for w in row)
        preprocess = c.app.state.batcher.model.preprocess
        assert att["crop"] == preprocess.crop / preprocess.resize  # the crop's share of the short side
    for not_asked in ((), {"attention": "0"}, {"attention": "yes"}):
        assert "attention" not in c.post(ONE, not_asked).body[0]


# ---- files: how many, how large, how many pixels, how much memory ------------------------------------
def test_files_per_request_at_the_limit_and_one_past_it(serve):
    limits = ServeLimits(max_files=3, max_upload_mb=5.0, batch_wait_ms=0)
    c = serve(limits)
    n = limits.max_files
    files = [(f"{i}.png", PNG) for i in range(n)]
    for path in ("/api/caption", "/api/caption-sequence"):
        r = c.post(files, path=path)
        assert r.status == 200, (path, r.body)
    assert [e["file"] for e in c.post(files).body] == [f"{i}.png" for i in range(n)]
    for path in ("/api/caption", "/api/caption-sequence"):
        r = c.post(files + [("extra.png", PNG)], path=path)
        assert r.status == 413 and "Too many files" in r.error and f"is {n}." in r.error, (path, r.body)
    assert c.get("/api/model").body["limits"] == {"max_upload_mb": limits.max_upload_mb, "max_files": n}


def test_the_default_file_limit_is_the_one_applied(serve):
    c = serve()
    n = ServeLimits().max_files
    r = c.post([(f"{i}.png", b"x") for i in range(n + 1)])  # refused while parsing: nothing is decoded
    assert r.status == 413 and f"is {n}." in r.error
    r = c.post([(f"{i}.png", b"") for i in range(n)])  # at the limit: parsed, each file refused alone
    assert r.status == 422 and len(r.body["results"]) == n
    assert c.get("/api/model").body["limits"]["max_files"] == n


def test_text_fields_per_request_at_the_limit_and_one_past_it(serve):
    """50 text fields are parsed (app.read_form's max_fields); a 51st is refused. The files do not count."""
    c = serve()
    fields = [(f"x{i}", "1") for i in range(50)]
    assert c.post(ONE, fields).status == 200
    r = c.post(ONE, fields + [("x50", "1")])
    assert r.status == 400 and "Too many fields" in r.error


def _body_of(size: int) -> bytes:
    """A multipart request of exactly `size` bytes: one photo and an ignored field padding it out."""
    base = multipart(ONE, {"pad": ""})
    body = multipart(ONE, {"pad": "p" * (size - len(base))})
    assert len(body) == size
    return body


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "streamed"])
def test_the_body_at_the_upload_limit_and_one_byte_past_it(serve, declared):
    limits = ServeLimits(max_upload_mb=1 / 16, batch_wait_ms=0)
    c = serve(limits)
    limit = int(limits.max_upload_mb * 2**20)
    ctype = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    for size, status in ((limit, 200), (limit + 1, 413)):
        body = _body_of(size)
        if declared:
            r = c.request("POST", "/api/caption", body, ctype)
        else:
            r = c.request("POST", "/api/caption", headers=ctype, chunks=[body[:1000], body[1000:]], declare=False)
        assert r.status == status, (size, r.body)
    assert r.error == f"request body over the upload limit of {limits.max_upload_mb:g} MB (--max-upload-mb)"
    if declared:  # a length declared past the limit is refused from the header: the small body is never read
        r = c.request("POST", "/api/caption", headers={**ctype, "content-length": str(limit + 1)},
                      chunks=[multipart(ONE)], declare=False)  # fmt: skip
        assert r.status == 413 and "--max-upload-mb" in r.error, r.body


def test_a_body_longer_than_it_declares_is_cut_off_at_the_limit(serve):
    limits = ServeLimits(max_upload_mb=1 / 16, batch_wait_ms=0)
    c = serve(limits)
    body = _body_of(int(limits.max_upload_mb * 2**20) + 1)
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}", "content-length": "100"}
    r = c.request("POST", "/api/caption", headers=headers, chunks=[body[:5000], body[5000:]], declare=False)
    assert r.status == 413 and "--max-upload-mb" in r.error


def test_pixels_at_the_limit_and_one_past_it(serve, monkeypatch):
    import captioner.images

    side = 24
    limits = ServeLimits(max_pixels=side * side, batch_wait_ms=0)
    c = serve(limits)
    # the server's limit is the one applied, not the library's default (a --max-pixels raised above the
    # default): a default under the limit changes nothing
    monkeypatch.setattr(captioner.images, "DEFAULT_MAX_PIXELS", side)
    at_limit, past = png(side, side), png(limits.max_pixels + 1, 1)
    r = c.post([("at.png", at_limit), ("past.png", past)])
    assert r.status == 200 and r.body[0]["caption"] is not None and "caption" not in r.body[1]
    assert f"over the limit of {limits.max_pixels:,}" in r.body[1]["error"]
    r = c.post([("past.png", past)])
    assert r.status == 422 and r.error == "no image could be read"
    assert r.body["results"][0]["file"] == "past.png" and "--max-pixels" in r.body["results"][0]["error"]
    r = c.post([("at.png", at_limit), ("past.png", past)], path="/api/caption-sequence")
    assert r.status == 422 and r.error.startswith("past.png: declares") and r.error.endswith("(sequence not captioned)")
    assert [f["file"] for f in r.body["files"]] == ["past.png"]


def test_a_request_decodes_images_up_to_its_memory_limit(serve):
    """An image costing exactly --max-request-decode-mb is decoded; one byte more and it is refused."""
    cost = decode_bytes(PNG, "a.png")
    assert cost > 1
    c = serve(ServeLimits(max_request_decode_mb=cost / 2**20, batch_wait_ms=0))
    r = c.post([("a.png", PNG), ("b.png", PNG)])  # each costs the limit: they take turns
    assert r.status == 200 and all(e["caption"] is not None for e in r.body)
    c = serve(ServeLimits(max_request_decode_mb=(cost - 1) / 2**20, batch_wait_ms=0))
    r = c.post(ONE)
    assert r.status == 422 and "--max-request-decode-mb" in r.body["results"][0]["error"]
    big = png(1024, 1024)  # 4 MB decoded: the refusal says how much, and the limit
    cost = decode_bytes(big, "big.png")
    limits = ServeLimits(max_request_decode_mb=(cost - 1) / 2**20, batch_wait_ms=0)
    r = serve(limits).post([("big.png", big)])
    cap = f"{limits.max_request_decode_mb:g} MB a request may use (--max-request-decode-mb)"
    assert r.status == 422 and r.body["results"][0]["error"] == f"decoding it would take 4 MB, over the {cap}"


@pytest.mark.parametrize("wait_s", [0.0, 0.05])
def test_the_servers_decoding_memory_at_its_limit_and_one_byte_under(serve, wait_s):
    """An image costing exactly --max-decode-mb is decoded (even without waiting: --decode-wait-s 0);
    with one byte less the request waits --decode-wait-s for room that never comes, then gets 503."""
    cost = decode_bytes(PNG, "a.png")
    c = serve(ServeLimits(max_decode_mb=cost / 2**20, decode_wait_s=wait_s, batch_wait_ms=0))
    assert c.post(ONE).status == 200
    c = serve(ServeLimits(max_decode_mb=(cost - 1) / 2**20, decode_wait_s=wait_s, batch_wait_ms=0))
    r = c.post(ONE)
    assert r.status == 503
    assert r.error == "the server is decoding as many images as its memory budget allows: try again soon"


def test_memory_is_handed_back_after_an_image_as_large_as_the_threshold(serve, monkeypatch):
    """app.prepare trims the heap after a request whose largest image costs TRIM_ABOVE or more, not
    after smaller ones (headers only: the cost is read, the decoding then fails on no data)."""
    import captioner.serve.app as app_module

    calls = []
    monkeypatch.setattr(app_module, "give_back_memory", lambda: calls.append(1))
    width = 4096
    height = TRIM_ABOVE // (4 * width)
    at_threshold, under = png_header_only(width, height), png_header_only(width, height - 1)
    assert decode_bytes(at_threshold, "x") == TRIM_ABOVE and decode_bytes(under, "x") < TRIM_ABOVE
    c = serve()
    assert c.post([("under.png", under)]).status == 422 and calls == []
    assert c.post([("at.png", at_threshold)]).status == 422 and calls == [1]


# ---- the memory budget itself -----------------------------------------------------------------------
def test_a_budget_is_held_to_its_capacity_exactly():
    async def scenario() -> None:
        b = ByteBudget(100, wait_s=0.05)
        assert (b.capacity, b.wait_s, b.used) == (100, 0.05, 0)
        async with b.hold(60):
            assert b.used == 60
            async with b.hold(40):  # exactly full
                assert b.used == 100
            with pytest.raises(Busy):  # one byte over: waits 0.05 s, then Busy
                async with b.hold(41):
                    pass
            assert b.used == 60
        assert b.used == 0
        for wait_s in (0.0, None):  # no waiting: room now is taken now
            async with ByteBudget(10, wait_s=wait_s).hold(10):
                pass
        with pytest.raises(Busy):
            async with ByteBudget(10, wait_s=0.0).hold(11):
                pass

    asyncio.run(scenario())


def test_a_holder_waits_for_room_and_gets_it_when_it_is_given_back():
    async def scenario() -> list[str]:
        b, order = ByteBudget(10, wait_s=5.0), []

        async def first() -> None:
            async with b.hold(10):
                order.append("first holds")
                await asyncio.sleep(0.05)
            order.append("first done")

        async def second() -> None:
            await asyncio.sleep(0.01)
            async with b.hold(5):
                order.append("second holds")

        await asyncio.gather(first(), second())
        assert b.used == 0
        return order

    assert asyncio.run(scenario()) == ["first holds", "first done", "second holds"]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_memory_is_given_back_through_glibcs_malloc_trim(monkeypatch):
    trim = budget._trimmer()
    assert trim is not None and trim.__name__ == "malloc_trim"
    calls = []
    monkeypatch.setattr(budget, "_MALLOC_TRIM", lambda pad: calls.append(pad))
    budget.give_back_memory()
    assert calls == [0]  # pad 0: keep nothing spare at the top of the heap
    monkeypatch.setattr(budget, "_MALLOC_TRIM", None)
    budget.give_back_memory()  # nothing to ask: nothing happens


# ---- whose pages may call it (SameOrigin) ---------------------------------------------------------------
def refusal(shown: str) -> str:
    return f"cross-site request from {shown} refused (`captioner serve --allow-origin {shown}` allows it)"


def test_pages_of_other_sites_are_refused_and_the_servers_own_page_is_not(serve):
    c = serve()
    for headers, shown in (
        ({"Origin": "http://evil.example"}, "http://evil.example"),
        ({"Origin": "HTTP://Evil.Example:8080"}, "http://evil.example:8080"),
        ({"Referer": "http://evil.example/page.html?q=1"}, "http://evil.example"),
        ({"Origin": "null"}, "null"),  # sandboxed frames, file:// pages
        ({"Origin": "null", "Host": None}, "null"),  # no Host to be the same as
        ({"Origin": "http://xxxx", "Host": None}, "http://xxxx"),  # no Host: no origin is its own, whatever the name
        ({"Sec-Fetch-Site": "cross-site"}, "another site"),
    ):
        r = c.post(ONE, headers=headers)
        assert r.status == 403 and r.error == refusal(shown), (headers, r.body)
    for headers in (
        {},  # curl, scripts
        {"Origin": "http://testserver"},
        {"Origin": "HTTP://TestServer"},
        {"Referer": "http://testserver/"},
        {"Origin": "http://127.0.0.1:8000", "Host": "127.0.0.1:8000"},
        {"Sec-Fetch-Site": "same-origin"},
    ):
        r = c.post(ONE, headers=headers)
        assert r.status == 200 and "access-control-allow-origin" not in r.headers, (headers, r.body)
    evil = {"Origin": "http://evil.example"}  # reading is not refused; nothing is shared with the site either
    r = c.request("GET", "/api/health", headers=evil)
    assert r.status == 200 and "access-control-allow-origin" not in r.headers
    assert c.request("HEAD", "/static/app.js", headers=evil).status == 200
    r = c.request("OPTIONS", "/api/caption", headers=evil)  # no preflight answered for it: the route's 405
    assert r.status == 405 and "access-control-allow-origin" not in r.headers


def test_a_site_allowed_by_name_gets_cors_headers_and_its_preflight_answered(serve):
    c = serve(allow_origins=["http://Friend.BOX/"])  # as typed: any case, a trailing slash
    cors = {"access-control-allow-origin": "http://friend.box", "vary": "Origin"}
    for headers in ({"Origin": "http://friend.box"}, {"Referer": "http://friend.box/app/"}):
        r = c.post(ONE, headers=headers)
        assert r.status == 200 and r.body[0]["caption"] is not None
        assert {k: r.headers.get(k) for k in cors} == cors
    r = c.request("GET", "/api/health", headers={"Origin": "http://friend.box"})
    assert r.status == 200 and {k: r.headers.get(k) for k in cors} == cors
    r = c.request("OPTIONS", "/api/caption", headers={"Origin": "http://friend.box"})
    assert r.status == 204 and r.headers["access-control-allow-methods"] == "GET, POST"
    assert r.headers["access-control-allow-headers"] == "*" and {k: r.headers.get(k) for k in cors} == cors
    r = c.post(ONE, headers={"Origin": "http://evil.example"})
    assert r.status == 403 and r.error == refusal("http://evil.example")
    assert serve().post(ONE, headers={"Origin": "http://friend.box"}).status == 403  # allowed on one server only


# ---- uploads the parser must understand, requests it must refuse ----------------------------------------
def _one_part(c: Client, disposition: str) -> Reply:
    head = f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\nContent-Type: image/png\r\n\r\n"
    body = head.encode("latin-1") + PNG + f"\r\n--{BOUNDARY}--\r\n".encode()
    return c.request("POST", "/api/caption", body, {"content-type": f"multipart/form-data; boundary={BOUNDARY}"})


def test_files_named_in_rfc5987_form_keep_their_names(serve):
    """filename*=charset'language'percent-encoded (RFC 5987), as some clients name non-ASCII files;
    a plain filename, where there is one, is the name."""
    c = serve()
    form = 'form-data; name="files"; '
    for disposition, name in (
        ("filename*=UTF-8''na%C3%AFve%20caf%C3%A9.png", "naïve café.png"),
        ("FILENAME*=utf-8''upper.png", "upper.png"),
        ("filename*=iso-8859-1''caf%E9.png", "café.png"),
        ("filename*=x-unknown''caf%E9.png", "caf\ufffd.png"),  # an unknown charset: read as UTF-8
        ("filename*=us-ascii''na%C3%AFve.png", "na\ufffd\ufffdve.png"),  # bytes its charset cannot read: replaced
        ("filename*=''caf%C3%A9.png", "café.png"),  # no charset: UTF-8
        ("filename*=UTF-8'en'it's.png", "it's.png"),  # after the language tag, all of it
        ("filename*=\"UTF-8''quoted.png\"", "quoted.png"),
        ("filename*=UTF-8''a%5Cb%22c.JPX", 'a\\b"c.JPX'),  # a backslash and a quote, kept
        ("filename*=UTF-8''a%5C%22b.png", 'a\\"b.png'),  # ... next to each other
        ("filename*=UTF-8''x%22%3By.png", 'x";y.png'),  # a quote before a semicolon
        ("filename=\"plain.png\"; filename*=UTF-8''other.png", "plain.png"),
        ("FILENAME=\"plain.png\"; filename*=UTF-8''other.png", "plain.png"),
        ("filename*=UTF-8''other.png; filename=\"plain.png\"", "plain.png"),
        ('filename=""', "<unnamed>"),
    ):
        r = _one_part(c, form + disposition)
        assert r.status == 200 and r.body[0]["file"] == name and r.body[0]["caption"] is not None, (disposition, r.body)


def test_a_parser_failure_is_named_by_its_detail_its_message_or_its_kind(serve, monkeypatch):
    """Starlette's multipart errors carry a message; older Starlettes raised HTTPException (its
    text in .detail, str() "400: ..."); an error with neither is named by its type."""
    from fastapi import HTTPException  # Starlette's, as FastAPI exports it

    from captioner.serve import app as serve_app

    c = serve()
    for error, shown in (
        (HTTPException(400, detail="Invalid boundary"), "Invalid boundary"),
        (ValueError("bad part"), "bad part"),
        (KeyError(), "KeyError"),
    ):

        async def fail(self, error=error):
            raise error

        monkeypatch.setattr(serve_app._Rfc5987Parser, "parse", fail)
        r = c.post(ONE)
        assert r.status == 400 and r.error == f"malformed or refused upload: {shown}", (error, r.body)


def test_requests_that_are_not_uploads_get_400_saying_what_to_send(serve):
    c = serve()
    for headers in ({"content-type": "application/json"}, {}):  # another type, or none
        r = c.request("POST", "/api/caption", b"{}", headers)
        assert r.status == 400 and r.error == "send multipart/form-data with the images in the repeatable field 'files'"
    r = c.post([], {"beam_size": "3"})
    assert r.status == 400 and r.error == "no images: send them in the repeatable field 'files'"
    r = c.request("POST", "/api/caption", b"--x\r\ngarbage", {"content-type": "multipart/form-data; boundary=x"})
    assert r.status == 400 and r.error == "no images: send them in the repeatable field 'files'"
    r = c.request("POST", "/api/caption", multipart(ONE), {"content-type": "multipart/form-data"})  # no boundary
    assert r.status == 400 and r.error == "malformed or refused upload: Missing boundary in multipart."
    text = "/etc/" + "x" * 100  # a text field in `files` is never read as a path; its name is cut at 80
    r = c.post(ONE, [("files", text)])
    refused = {"file": text[:80], "error": "not a file upload (the server never reads a path)"}
    assert r.status == 200 and r.body[0] == refused
    assert r.body[1]["file"] == "a.png" and r.body[1]["caption"] is not None


def test_an_unexpected_failure_is_a_500_without_a_traceback(serve, model, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("secret detail")

    monkeypatch.setattr(model, "decode", broken)
    r = serve().post(ONE)
    assert r.status == 500 and r.body == {"error": "internal error: RuntimeError"}


# ---- batching, and what the app says about itself -------------------------------------------------------
def test_batches_are_capped_at_the_batch_size_and_wait_for_company(serve):
    c = serve(ServeLimits(batch_size=1, batch_wait_ms=2000))  # full at once: never waits
    assert c.post([("a.png", PNG), ("b.png", PNG)]).status == 200
    assert c.app.state.batcher.batches == [1, 1]
    c = serve(ServeLimits(batch_size=2, batch_wait_ms=2000))  # the first image waits for a second
    headers = {"host": "testserver", "content-type": f"multipart/form-data; boundary={BOUNDARY}"}

    async def two_requests() -> list[Reply]:
        async def later() -> Reply:
            await asyncio.sleep(0.05)
            return await c._call("POST", "/api/caption", [multipart(ONE)], headers)

        return list(await asyncio.gather(c._call("POST", "/api/caption", [multipart(ONE)], headers), later()))

    assert [r.status for r in c.loop.run_until_complete(two_requests())] == [200, 200]
    assert c.app.state.batcher.batches == [2]
    assert c.get("/api/health").body == {"status": "ok", "waiting": 0, "batches_run": 1}


def test_the_app_describes_itself_and_serves_its_pages_from_itself(serve, model, monkeypatch):
    from captioner.serve import app as serve_app

    monkeypatch.setattr(serve_app, "__version__", "9.8.7")  # not FastAPI's default version, which ours is today
    c = serve()
    spec = c.get("/openapi.json").body
    assert spec["info"]["title"] == "captioner" and spec["info"]["version"] == "9.8.7"
    assert spec["info"]["description"].startswith("Image captioning: upload photos")
    for route in ("/api/caption", "/api/caption-sequence"):
        body = spec["paths"][route]["post"]["requestBody"]
        assert body["required"] is True
        schema = body["content"]["multipart/form-data"]["schema"]
        assert schema["type"] == "object" and schema["required"] == ["files"]
        props = schema["properties"]
        assert set(props) == {"files", *DecodingConfig.names(), "tags", "attention"}
        files = {"type": "array", "items": {"type": "string", "format": "binary"}, "description": "the images"}
        assert props["files"] == files
        for s in DecodingConfig.settings():
            help = f"{s.help} (default: the model's, else {s.default:g})"
            expected = {"type": "integer" if s.kind is int else "number", "minimum": s.low, "description": help}
            if cap_of(s) is not None:
                expected["maximum"] = cap_of(s)
            assert props[s.name] == expected, s.name
        help = "how many of the photo's top ImageNet classes to return"
        tags = {"type": "integer", "minimum": 0, "maximum": MAX_TAGS, "default": TAGS_SHOWN, "description": help}
        assert props["tags"] == tags
        help = "attention models: each word's weights over the image grid"
        assert props["attention"] == {"type": "boolean", "default": False, "description": help}
    info = c.get("/api/model").body
    assert info["attention"] is True and info["tags"] is True and info["decoding"] == model.decoding
    page = c.get("/")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    assert b'<script src="/static/app.js">' in page.body and c.get("/static/app.js").status == 200
    assert c.get("/redoc").status == 404  # FastAPI's own doc pages load from a CDN: not served
    docs = c.get("/docs")
    assert docs.status == 200 and b"swagger" in docs.body.lower()
    found = re.findall(r"""(?:src|href)=["']([^"']+)["']|url: ?["']([^"']+)["']""", docs.body.decode())
    urls = [a or b for a, b in found]
    assert urls and all(u.startswith("/") for u in urls), urls  # every asset from this server
    assert all(c.get(u).status == 200 for u in urls), urls


def test_health_counts_the_images_waiting_for_the_model(serve, model, monkeypatch):
    """While the model is busy with one batch, the next request's image waits, and /api/health says so."""
    gate, decode = threading.Event(), model.decode

    def held(*args, **kwargs):
        assert gate.wait(30)
        return decode(*args, **kwargs)

    monkeypatch.setattr(model, "decode", held)
    c = serve()
    batcher = c.app.state.batcher
    headers = {"host": "testserver", "content-type": f"multipart/form-data; boundary={BOUNDARY}"}

    async def until(condition) -> None:
        for _ in range(3000):
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("never happened")

    async def scenario() -> tuple[Reply, list[Reply]]:
        first = asyncio.ensure_future(c._call("POST", "/api/caption", [multipart(ONE)], headers))
        await until(lambda: batcher.batches == [1])  # the model holds the first
        second = asyncio.ensure_future(c._call("POST", "/api/caption", [multipart(ONE)], headers))
        await until(lambda: batcher.waiting == 1)
        health = await c._call("GET", "/api/health", [b""], {"host": "testserver"})
        gate.set()
        return health, [await first, await second]

    health, answers = c.loop.run_until_complete(asyncio.wait_for(scenario(), 60))
    assert health.body == {"status": "ok", "waiting": 1, "batches_run": 1}
    assert [r.status for r in answers] == [200, 200] and c.get("/api/health").body["waiting"] == 0


def test_each_answer_is_the_json_of_captioner_caption_json(serve, model):
    """Each image's entry: its file name, then the record `captioner caption --json` prints, with the
    low-confidence mark the page shows."""
    from captioner.pipeline import caption_record
    from captioner.settings import LOW_CONFIDENCE

    [entry] = serve().post(ONE, {"n_best": "2"}).body
    nbest = model.decode(model.encode_prepared([model.prepare(Image.open(io.BytesIO(PNG)))]), n_best=2)[0]
    expected = caption_record(nbest, TAGS_SHOWN, LOW_CONFIDENCE)
    assert entry == {"file": "a.png", **expected} and "low_confidence" in entry
