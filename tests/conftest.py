import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")


@pytest.fixture
def tiktoken_cache(monkeypatch):
    """GPT-2's BPE offline: ../shared/tiktoken_cache as TIKTOKEN_CACHE_DIR, or a skip."""
    cache = os.path.join(SHARED, "tiktoken_cache")
    if not os.path.isdir(cache):
        pytest.skip("../shared/tiktoken_cache is not present")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", cache)
    return cache


@pytest.fixture
def shakespeare_path():
    """The standard tiny Shakespeare text from ../shared/, or a skip when this checkout has none."""
    path = os.path.join(SHARED, "data", "tinyshakespeare.txt")
    if not os.path.exists(path):
        pytest.skip("../shared/data/tinyshakespeare.txt is not present")
    return path


class FileServer:
    """A tiny HTTP server on 127.0.0.1 for download tests: serves `files` ({path: bytes}) with HTTP
    Range support, 404 for anything else, and cuts the connection after `drop_after` bytes for the
    first `drops` requests of a file (a flaky network)."""

    def __init__(self):
        import http.server
        import threading
        server = self
        self.files, self.drop_after, self.drops, self.requests = {}, None, 0, []

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if server.drops > 0 and server.drop_after is not None:
                    server.drops -= 1
                    self.wfile.write(body[:server.drop_after])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def file_server():
    server = FileServer()
    yield server
    server.close()


def make_text(n_chars=30000, seed=0):
    """A deterministic English-like text (no files needed): words drawn from a small lexicon."""
    import random
    rng = random.Random(seed)
    words = ("the king and queen of france shall speak to thee my lord what is this night "
             "a fair day for love and war we will go now").split()
    lines, size = [], 0
    while size < n_chars:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + "."
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines)[:n_chars]


def assert_one_line_error(result, program, message):
    """A failed command printed exactly one line, '<program>: error: ...' containing `message`."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0
    assert len(lines) == 1 and lines[0].startswith(f"{program}: error: "), result.stderr
    assert message in lines[0], lines[0]


def decode(model, x, chunks, after_each=None):
    """Feed x through forward_cached in chunks; the logits concatenated, and the cache."""
    cache, out, t = model.init_cache(x.size(0)), [], 0
    for n in chunks:
        out.append(model.forward_cached(x[:, t:t + n], cache))
        t += n
        if after_each:
            after_each(cache, t)
    return torch.cat(out, dim=1), cache
