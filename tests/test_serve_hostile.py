"""`captioner serve` against hostile requests: pages of other sites, fields no parser expected."""

from __future__ import annotations

import http.client
import io
import json
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from captioner.settings import DecodingConfig, ServeLimits

from .test_serve import Server, multipart

pytestmark = pytest.mark.slow  # loads the bundled model and starts servers


def _tiny_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _tiny_png()


def post(port: int, fields=None, headers=None, method="POST", path="/api/caption"):
    body, ctype = multipart([("red.png", PNG)], fields)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request(method, path, body=body if method == "POST" else None,
                 headers={"Content-Type": ctype, **(headers or {})})  # fmt: skip
    r = conn.getresponse()
    data, hdrs = r.read(), dict(r.getheaders())
    conn.close()
    is_json = hdrs.get("content-type", "").startswith("application/json")
    return r.status, (json.loads(data) if is_json else data), {k.lower(): v for k, v in hdrs.items()}


@pytest.fixture(scope="module")
def servers():
    from captioner import Captioner
    from captioner.serve import create_app

    model = Captioner.load(device="cpu")
    limits = ServeLimits(max_files=4, batch_wait_ms=1)
    with (
        Server(create_app(model, limits)) as plain,
        Server(create_app(model, limits, allow_origins=["http://friend.example"])) as friendly,
    ):
        yield plain, friendly


def test_pages_of_other_sites_cannot_use_the_server(servers):
    plain, friendly = servers
    status, body, _ = post(plain.port, headers={"Origin": "http://evil.example"})
    assert status == 403 and "evil.example" in body["error"] and "--allow-origin" in body["error"]
    status, _, _ = post(plain.port, headers={"Referer": "http://evil.example/page.html"})
    assert status == 403
    status, _, _ = post(plain.port, headers={"Sec-Fetch-Site": "cross-site"})
    assert status == 403
    status, _, _ = post(plain.port, headers={"Origin": "null"})  # sandboxed frames, file:// pages
    assert status == 403
    # its own page, and clients that send no Origin (curl, scripts), are served
    status, body, hdrs = post(plain.port, headers={"Origin": plain.url})
    assert status == 200 and body[0]["caption"] and "access-control-allow-origin" not in hdrs
    assert post(plain.port)[0] == 200
    # a site named with --allow-origin is served, with CORS headers (and its preflight answered)
    status, body, hdrs = post(friendly.port, headers={"Origin": "http://friend.example"})
    assert status == 200 and hdrs["access-control-allow-origin"] == "http://friend.example"
    status, _, hdrs = post(friendly.port, headers={"Origin": "http://friend.example"}, method="OPTIONS")
    assert status == 204 and hdrs["access-control-allow-origin"] == "http://friend.example"
    assert post(friendly.port, headers={"Origin": "http://evil.example"})[0] == 403


def test_strange_numbers_are_bad_requests_not_errors(servers):
    plain, _ = servers
    for bad in ("--5", "²", "٣", "1" * 5000, "1e400", "nan", "inf", "0x10", " ", "1_000", "+-1"):
        for field in ("beam_size", "tag_boost", "tags"):
            status, body, _ = post(plain.port, {field: bad})
            assert status == 400 and body["error"], (field, bad)


FIELDS = [*DecodingConfig.names(), "tags", "attention"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.sampled_from(["/api/caption", "/api/caption-sequence"]),
    field=st.sampled_from(FIELDS),
    value=st.one_of(
        st.text(max_size=30),
        st.integers(-(10**30), 10**30).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.from_regex(r"-?[0-9]{1,3}(\.[0-9]{0,3})?", fullmatch=True),
    ),
)
def test_no_form_field_value_makes_a_server_error(servers, path, field, value):
    plain, _ = servers
    if "\x00" in value or "\r" in value or "\n" in value:  # not sendable as a form value as built here
        value = value.replace("\x00", "").replace("\r", "").replace("\n", "")
    status, body, _ = post(plain.port, {field: value}, path=path)
    assert status in (200, 400), (field, value, status, body)
    if status == 400:
        assert isinstance(body, dict) and body["error"]


def test_the_api_page_needs_no_other_host(servers):
    import re

    plain, _ = servers
    conn = http.client.HTTPConnection("127.0.0.1", plain.port, timeout=60)
    conn.request("GET", "/docs")
    r = conn.getresponse()
    page = r.read().decode()
    assert r.status == 200 and "swagger" in page.lower()
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']|url: ?["']([^"']+)["']""", page)
    urls = [a or b for a, b in urls]
    assert urls and all(u.startswith("/") for u in urls), urls  # nothing from a CDN
    for u in urls:
        conn.request("GET", u)
        r = conn.getresponse()
        assert r.status == 200, u
        body = r.read()
        if u.endswith(".json"):  # the schema describes the upload, so "Try it out" can send a photo
            spec = json.loads(body)
            form = spec["paths"]["/api/caption"]["post"]["requestBody"]["content"]["multipart/form-data"]
            assert form["schema"]["properties"]["files"]["items"]["format"] == "binary"
    conn.close()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_huge_images_within_the_pixel_limit_cost_a_bounded_memory(servers):
    """Two 10000x9999 grey+alpha PNGs (190 KB each, under the 100 M pixel limit) in one request:
    the server's memory grows by at most 1.5 GB while decoding them and keeps at most 300 MB after
    (the server runs in this process: its resident memory is sampled while the request runs)."""
    import threading

    plain, _ = servers
    buf = io.BytesIO()
    Image.new("LA", (10000, 9999), (90, 255)).save(buf, format="PNG")
    big = buf.getvalue()
    assert len(big) < 400_000
    post(plain.port)  # warm: the first request pays one-off allocations
    base, peak, done = _rss_mb(), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            done.wait(0.02)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    body, ctype = multipart([("huge1.png", big), ("huge2.png", big)])
    conn = http.client.HTTPConnection("127.0.0.1", plain.port, timeout=300)
    conn.request("POST", "/api/caption", body=body, headers={"Content-Type": ctype})
    r = conn.getresponse()
    answer = json.loads(r.read())
    conn.close()
    done.set()
    watcher.join()
    assert r.status == 200 and all(a["caption"] for a in answer)
    assert peak[0] - base <= 1536, f"peak growth {peak[0] - base:.0f} MB"
    assert _rss_mb() - base <= 300, f"kept {_rss_mb() - base:.0f} MB"


class _TimedServer(Server):
    """Server with the read-timeout protocol `captioner serve` runs, at a 1 s timeout."""

    def __init__(self, app) -> None:
        import uvicorn

        from captioner.serve.protocol import ReadTimeoutH11Protocol

        super().__init__(app)
        protocol = type("OneSecond", (ReadTimeoutH11Protocol,), {"read_timeout": 1.0})
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", http=protocol)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)


def _closed_within(sock, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):  # an error answer may come first; then the close
            pass
        return True
    except TimeoutError:
        return False


def test_stalled_requests_are_closed_and_slow_uploads_finish():
    import socket
    import time

    from captioner import Captioner
    from captioner.serve import create_app

    with _TimedServer(create_app(Captioner.load(device="cpu"), ServeLimits(batch_wait_ms=1))) as s:
        stalled = []
        mid_headers = b"POST /api/caption HTTP/1.1\r\nHost: x\r\n"
        mid_body = mid_headers + b"Content-Length: 1000\r\n\r\n0123456789"
        for partial in (mid_headers, mid_body):
            sock = socket.create_connection(("127.0.0.1", s.port))
            sock.sendall(partial)
            stalled.append(sock)
        assert all(_closed_within(sock, 5.0) for sock in stalled)  # 1 s of silence, then closed
        for sock in stalled:
            sock.close()
        # a slow upload that keeps sending (a piece every 0.5 s, 3 s in all) is answered
        body, ctype = multipart([("red.png", PNG)])
        pieces = [body[i : i + len(body) // 6 + 1] for i in range(0, len(body), len(body) // 6 + 1)]
        sock = socket.create_connection(("127.0.0.1", s.port))
        head = f"POST /api/caption HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode())
        for piece in pieces:
            time.sleep(0.5)
            sock.sendall(piece)
        sock.settimeout(60)
        answer = sock.recv(65536)
        sock.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


def test_files_named_in_rfc5987_form_are_files(servers):
    plain, _ = servers
    boundary = "b0undary"
    disposition = "form-data; name=\"files\"; filename*=UTF-8''na%C3%AFve%20caf%C3%A9.png"
    head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\nContent-Type: image/png\r\n\r\n"
    body = head.encode() + PNG + f"\r\n--{boundary}--\r\n".encode()
    conn = http.client.HTTPConnection("127.0.0.1", plain.port, timeout=120)
    conn.request(
        "POST", "/api/caption", body=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    r = conn.getresponse()
    answer = json.loads(r.read())
    conn.close()
    assert r.status == 200 and answer[0]["file"] == "naïve café.png" and answer[0]["caption"]
