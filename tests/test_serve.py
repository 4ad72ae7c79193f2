"""`captioner serve` end to end: a real uvicorn server on a free loopback port, a real HTTP client,
and the page in a real headless browser (Debian's chromium)."""

from __future__ import annotations

import http.client
import io
import json
import shutil
import socket
import struct
import threading
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow  # loads the bundled model and starts servers
EXAMPLES = REPO / "assets" / "examples"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A uvicorn server in a thread of this process, serving `app` on a free loopback port."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def multipart(files: list[tuple[str, bytes]], fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for k, v in (fields or {}).items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    for name, data in files:
        out.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
        )
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def request(port: int, method: str, path: str, body: bytes = b"", content_type: str | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Content-Type": content_type} if content_type else {}
    conn.request(method, path, body=body, headers=headers)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, json.loads(data) if r.getheader("content-type", "").startswith("application/json") else data


def post_files(port: int, files, fields=None, path="/api/caption"):
    body, ctype = multipart(files, fields)
    return request(port, "POST", path, body, ctype)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds almost none: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def model():
    from captioner import Captioner

    return Captioner.load(device="cpu")


@pytest.fixture(scope="module")
def server(model):
    from captioner.serve import ServeLimits, create_app

    app = create_app(model, ServeLimits(max_upload_mb=2.0, max_files=4, batch_size=16, batch_wait_ms=10))
    with Server(app) as s:
        yield s


def photo(name: str) -> tuple[str, bytes]:
    return name, (EXAMPLES / name).read_bytes()


def test_captions_come_back_in_upload_order_with_bad_files_in_their_place(server, model):
    files = [photo("dog.png"), ("notes.txt", b"not an image at all"), photo("cat.jpg")]
    status, body = post_files(server.port, files, {"n_best": "2"})
    assert status == 200 and [e["file"] for e in body] == ["dog.png", "notes.txt", "cat.jpg"]
    assert "not an image" in body[1]["error"] and "caption" not in body[1]
    for entry, name in ((body[0], "dog.png"), (body[2], "cat.jpg")):
        text, tags, conf = model.caption(EXAMPLES / name, return_tags=True, return_confidence=True)
        assert entry["caption"] == text and entry["confidence"] == pytest.approx(conf, abs=1e-4)
        assert len(entry["nbest"]) == 2 and entry["nbest"][0]["caption"] == text
        assert entry["tags"][0]["label"] == tags[0].label
    status, body = post_files(server.port, [("junk.bin", b"\x00" * 100)])
    assert status == 422 and "junk.bin" in json.dumps(body)


def test_json_matches_the_command_line(server, capsys):
    from captioner.cli import main

    assert main(["caption", str(EXAMPLES / "dog.png"), "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    status, [api] = post_files(server.port, [photo("dog.png")])
    assert status == 200
    assert {k: v for k, v in api.items() if k != "file"} == {k: v for k, v in cli.items() if k != "path"}


def test_sequence_health_model_and_openapi(server, model):
    status, body = post_files(server.port, [photo("dog.png"), photo("cat.jpg")], path="/api/caption-sequence")
    assert status == 200 and body["files"] == ["dog.png", "cat.jpg"]
    assert body["caption"] == model.caption_sequence([EXAMPLES / "dog.png", EXAMPLES / "cat.jpg"])
    assert request(server.port, "GET", "/api/health")[1]["status"] == "ok"
    info = request(server.port, "GET", "/api/model")[1]
    assert info["decoding"] == model.decoding and info["attention"] and info["confidence"]
    status, spec = request(server.port, "GET", "/openapi.json")
    assert status == 200 and "/api/caption" in spec["paths"]
    status, page = request(server.port, "GET", "/")
    assert status == 200 and b'<script src="/static/app.js">' in page


def test_limits_and_malformed_requests_get_json_errors(server):
    status, body = post_files(server.port, [photo("dog.png")] * 5)  # max_files 4
    assert status == 413 and "Too many files" in body["error"] and "is 4." in body["error"]
    big = ("big.png", b"\x89PNG" + b"\x00" * (3 * 2**20))  # over the 2 MB limit
    status, body = post_files(server.port, [big])
    assert status == 413 and "upload limit" in body["error"]
    status, body = post_files(server.port, [("bomb.png", png_header_only(100_000, 100_000))])
    assert status == 422 and "pixels" in body["results"][0]["error"]
    status, body = request(server.port, "POST", "/api/caption", b"--x\r\ngarbage", "multipart/form-data; boundary=x")
    assert status == 400 and "error" in body
    status, body = request(server.port, "POST", "/api/caption", b"{}", "application/json")
    assert status == 400 and "multipart" in body["error"]
    status, body = post_files(server.port, [photo("dog.png")], {"beam_size": "0"})
    assert status == 400 and "beam" in body["error"]
    status, body = post_files(server.port, [photo("dog.png")], {"beam_size": "lots"})
    assert status == 400
    status, body = post_files(server.port, [photo("dog.png")], {"beam_size": "500"})
    assert status == 400 and "limit" in body["error"]
    for bad in ({"tags": "many"}, {"tags": "-1"}, {"n_best": "1.5"}):
        status, body = post_files(server.port, [photo("dog.png")], bad)
        assert status == 400 and "error" in body, bad
    # a body that streams past the limit without declaring its length is cut off too
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    head = b'--b\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n\r\n'
    chunks = iter([head] + [b"\x00" * 2**16] * 64 + [b"\r\n--b--\r\n"])  # 4 MB
    headers = {"Content-Type": "multipart/form-data; boundary=b", "Transfer-Encoding": "chunked"}
    conn.request("POST", "/api/caption", body=chunks, encode_chunked=True, headers=headers)
    r = conn.getresponse()
    assert r.status == 413 and "upload limit" in json.loads(r.read())["error"]
    conn.close()


def test_a_path_in_a_request_is_never_read(server, tmp_path):
    secret = tmp_path / "secret.png"
    shutil.copy(EXAMPLES / "dog.png", secret)
    body = f'--b\r\nContent-Disposition: form-data; name="files"\r\n\r\n{secret}\r\n--b--\r\n'.encode()
    status, reply = request(server.port, "POST", "/api/caption", body, "multipart/form-data; boundary=b")
    assert status == 422 and "not a file upload" in reply["results"][0]["error"]


def test_a_client_that_leaves_mid_upload_harms_nothing(server):
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(
            b"POST /api/caption HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 1000000\r\n\r\n"
            b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'
            + (EXAMPLES / "dog.png").read_bytes()[:5000]
        )
    status, body = post_files(server.port, [photo("dog.png")])
    assert status == 200 and body[0]["caption"]


def test_many_concurrent_clients_are_batched_and_all_answered(server, model):
    names = ["dog.png", "cat.jpg", "coffee.jpg", "rocket.jpg"]
    expected = dict(zip(names, model.caption([EXAMPLES / n for n in names])))
    batcher = server.server.config.app.state.batcher
    before = len(batcher.batches)

    def one(i: int) -> tuple[str, str]:
        name = names[i % len(names)]
        status, body = post_files(server.port, [photo(name)])
        assert status == 200
        return name, body[0]["caption"]

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(200)))
    assert len(answers) == 200 and all(caption == expected[name] for name, caption in answers)
    batches = batcher.batches[before:]
    assert sum(batches) == 200 and max(batches) > 1  # requests were gathered together
    assert request(server.port, "GET", "/api/health")[1]["status"] == "ok"


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("Debian's chromium and chromium-driver are not installed here (CI installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=900,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_the_page_in_a_real_browser(server, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser = _browser()
    try:
        browser.get(server.url + "/")
        browser.find_element(By.ID, "files").send_keys(str(EXAMPLES / "dog.png"))
        WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".card .word"))
        shown = " ".join(w.text for w in browser.find_elements(By.CSS_SELECTOR, ".card .word"))
        status, [api] = post_files(server.port, [photo("dog.png")], {"n_best": "3"})
        assert shown == api["caption"]
        assert browser.find_elements(By.CSS_SELECTOR, ".card .tags li")
        assert browser.find_element(By.CSS_SELECTOR, ".card img").get_attribute("src").startswith("blob:")
        assert "confidence" in browser.find_element(By.CSS_SELECTOR, ".card .meta").text
        heat = browser.find_element(By.CSS_SELECTOR, ".card .heat")
        word = browser.find_elements(By.CSS_SELECTOR, ".card .word")[1]
        ActionChains(browser).move_to_element(word).perform()  # hovering a word shows its attention
        WebDriverWait(browser, 5).until(lambda b: "on" in heat.get_attribute("class"))
        ActionChains(browser).move_to_element(browser.find_element(By.TAG_NAME, "h1")).perform()
        WebDriverWait(browser, 5).until(lambda b: "on" not in heat.get_attribute("class"))
        browser.find_element(By.ID, "clear").send_keys(Keys.TAB)  # the keyboard reaches the words too
        assert browser.switch_to.active_element.get_attribute("class") == "word"
        WebDriverWait(browser, 5).until(lambda b: "on" in heat.get_attribute("class"))
        out = Path(__file__).resolve().parent / "artifacts"
        out.mkdir(exist_ok=True)
        browser.save_screenshot(str(out / "serve_page.png"))
        browser.set_window_size(390, 844)  # a phone-sized window: one column, nothing cut off
        browser.save_screenshot(str(out / "serve_page_phone.png"))
        width, inner = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
        assert width <= inner, (width, inner)
        # sequence mode: the photos in order, one caption
        Select(browser.find_element(By.ID, "mode")).select_by_value("sequence")
        frames = [EXAMPLES / "dog.png", EXAMPLES / "cat.jpg"]
        browser.find_element(By.ID, "files").send_keys("\n".join(str(f) for f in frames))
        WebDriverWait(browser, 60).until(
            lambda b: (
                len(b.find_elements(By.CSS_SELECTOR, ".card")) == 2
                and "captioning" not in b.find_elements(By.CSS_SELECTOR, ".card .caption")[0].text
            )
        )
        status, seq = post_files(server.port, [photo("dog.png"), photo("cat.jpg")], path="/api/caption-sequence")
        assert browser.find_elements(By.CSS_SELECTOR, ".card .caption")[0].text == seq["caption"]
        assert len(browser.find_elements(By.CSS_SELECTOR, ".card .strip img")) == 2
    finally:
        browser.quit()


def test_the_serve_command_starts_a_server_that_answers(tmp_path):
    import os
    import subprocess
    import sys

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "captioner", "serve", "--port", str(port), "--device", "cpu", "--max-files", "2"],
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    try:
        first = proc.stderr.readline()
        assert f"http://localhost:{port}/" in first
        deadline = time.time() + 120
        while True:
            try:
                status, info = request(port, "GET", "/api/model")
                break
            except OSError:
                assert time.time() < deadline and proc.poll() is None, "the server did not start"
                time.sleep(0.3)
        assert status == 200 and info["limits"]["max_files"] == 2
        status, body = post_files(port, [photo("dog.png")])
        assert status == 200 and "dog" in body[0]["caption"].split()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_serve_command_refuses_nonsense_settings(capsys):
    from captioner.cli import main

    assert main(["serve", "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err
