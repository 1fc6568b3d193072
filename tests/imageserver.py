"""A real HTTP server on 127.0.0.1 serving the cases a web-scale pool meets.

    with ImageServer() as server:
        server.url("good", 3)          # a real JPEG (scikit-image / scikit-learn photos)
        server.url("missing", 0)       # 404
        server.url("html", 0)          # 200 text/html instead of an image
        server.url("truncated", 0)     # a JPEG cut after a third of its bytes
        server.url("bomb", 0)          # a decompression-bomb PNG (40,000 x 40,000 pixels)
        server.url("slow", 0)          # a good image after `slow_seconds` (or delay=...)
        server.large_url(0, 20_000, 20_000)  # a valid PNG of that many pixels (~1 MB)
        server.refused_url(0)          # a port that refuses connections

The server runs in its own thread on a port the kernel picks, and `stop()` shuts
it down and joins that thread (never by name). `served` counts requests per kind.
"""

from __future__ import annotations

import functools
import http.server
import io
import socket
import threading
import time
import zlib
from collections import Counter

from dcslurm.demo.pool import BackgroundHTTPServer

KINDS = ("good", "missing", "html", "truncated", "bomb", "slow", "large")


@functools.lru_cache(maxsize=1)
def real_photos() -> tuple[bytes, ...]:
    """Real photographs shipped inside scikit-image and scikit-learn, as JPEG bytes."""
    import numpy as np
    import skimage.data
    from PIL import Image
    from sklearn.datasets import load_sample_images

    arrays = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket(),
              np.stack([skimage.data.camera()] * 3, axis=-1), *load_sample_images().images]
    out = []
    for i, arr in enumerate(arrays):
        img = Image.fromarray(arr)
        if i % 2:  # some below the 512 px resize limit, some above
            img = img.resize((img.width // 3, img.height // 3))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return tuple(out)


@functools.lru_cache(maxsize=1)
def bomb_png(side: int = 40_000) -> bytes:
    """A valid 1-bit PNG of side x side pixels that compresses to a few hundred KB.

    1.6 G pixels: above OpenCV's 2^30-pixel decode limit and Pillow's bomb limit.
    """
    return large_png(side, side)


@functools.lru_cache(maxsize=64)
def large_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height pixels of one colour: ~1 MB per 10^9 pixels,
    made in well under a second per 10^8 pixels (zlib of zero rows)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + (zlib.crc32(body) & 0xFFFFFFFF).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])  # 1-bit greyscale
    row = bytes(1 + (width + 7) // 8)  # filter byte + packed zero pixels
    comp = zlib.compressobj(9)
    parts = [comp.compress(row * 1000) for _ in range(height // 1000)]
    parts.append(comp.compress(row * (height % 1000)))
    parts.append(comp.flush())
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


class ImageServer(BackgroundHTTPServer):
    def __init__(self, slow_seconds: float = 1.0):
        self.slow_seconds = slow_seconds
        self.served: Counter = Counter()  # requests per kind
        self.hits: Counter = Counter()  # requests per path (without the query)
        self.count_lock = threading.Lock()
        self._photos = real_photos()
        self._bomb = bomb_png()  # built now: building it on the first request would time that request out
        self._refusers: list[socket.socket] = []
        super().__init__(self._handler(), name="imageserver")

    def stop(self) -> None:
        super().stop()
        for s in self._refusers:
            s.close()

    # -- URLs --------------------------------------------------------------
    def url(self, kind: str, i: int, delay: float | None = None) -> str:
        """The URL of case `kind` number `i`; `delay` (slow only) overrides slow_seconds."""
        if kind not in KINDS:
            raise ValueError(kind)
        ext = {"html": "html", "bomb": "png"}.get(kind, "jpg")
        query = f"?delay={delay}" if delay is not None and kind == "slow" else ""
        return f"http://127.0.0.1:{self.port}/{kind}/{i}.{ext}{query}"

    def large_url(self, i: int, width: int, height: int) -> str:
        """The URL of a one-colour PNG of width x height pixels (made now, not on request)."""
        large_png(width, height)
        return f"http://127.0.0.1:{self.port}/large/{i}.png?w={width}&h={height}"

    def refused_url(self, i: int) -> str:
        """A URL whose port is bound but never listens: connecting is refused (RST)."""
        if not self._refusers:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))  # held, so no other process can take the port
            self._refusers.append(s)
        return f"http://127.0.0.1:{self._refusers[0].getsockname()[1]}/refused/{i}.jpg"

    def photo(self, i: int) -> bytes:
        return self._photos[i % len(self._photos)]

    # -- serving -----------------------------------------------------------
    def _handler(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                path, _, query = self.path.partition("?")
                params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
                parts = path.strip("/").split("/")
                kind = parts[0] if parts else ""
                try:
                    i = int(parts[1].split(".")[0]) if len(parts) > 1 else 0
                except ValueError:
                    i = 0
                with server.count_lock:  # handler threads run at once: += is not atomic
                    server.served[kind] += 1
                    server.hits[path] += 1
                if kind == "good":
                    return self._reply(200, server.photo(i), "image/jpeg")
                if kind == "slow":
                    time.sleep(float(params.get("delay", server.slow_seconds)))
                    return self._reply(200, server.photo(i), "image/jpeg")
                if kind == "html":
                    return self._reply(200, b"<!DOCTYPE html><html><body><h1>Welcome!</h1><p>Our gallery moved."
                                            b"</p></body></html>", "text/html; charset=utf-8")
                if kind == "truncated":
                    data = server.photo(i)
                    return self._reply(200, data[: len(data) // 3], "image/jpeg")
                if kind == "bomb":
                    return self._reply(200, server._bomb, "image/png")
                if kind == "large":
                    return self._reply(200, large_png(int(params["w"]), int(params["h"])), "image/png")
                self._reply(404, b"not found", "text/plain")

            def _reply(self, code: int, body: bytes, ctype: str) -> None:
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

        return Handler
