"""The demo pool: a small, offline, deterministic DataComp-format pool.

`generate_demo_pool(out, samples, seed)` writes, into a folder (local or s3://):

    00000000.parquet ...      DataComp metadata: uid, url, text, original_width,
                              original_height, sha256, face_bboxes
    images/NNNNNN.{jpg,png}   what the URLs serve (rendered shapes the captions describe)
    pages/NNNNNN.html         non-image responses (HTML served where an image was expected)
    serve.json                the host the URLs name, for `DemoPoolServer`; written last
    heldout/                  labelled images NOT in the pool, in clip_benchmark's
                              webdataset layout (shapes, colours, counts, retrieval)
    manifest.json             what was generated: seed, counts per noise kind

URLs look like `http://demo-pool.dcslurm.invalid/images/000123.jpg` (`.invalid` never
resolves, RFC 2606). The download stage fetches them through `DemoPoolServer`, a tiny
HTTP proxy that answers for that host from the pool folder, named by the run's
`[stages.download] http_proxy`; `dcslurm demo` runs one while its sweeps run and
`dcslurm pool serve` runs one by hand. So the URLs (and so the shards) do not depend
on a port or a path. See docs/DEMO_POOL.md.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import random
import socket
import tarfile
import threading
import urllib.parse
from dataclasses import dataclass, field

from dcslurm.core.errors import UserError
from dcslurm.core.storage import DataFolder

DEMO_HOST = "demo-pool.dcslurm.invalid"
SERVE_FILE = "serve.json"
SERVE_KIND = "dcslurm-demo-pool"
# `dcslurm pool serve`'s port, and the http_proxy of the sweep files `dcslurm demo --config-only` writes.
DEFAULT_SERVE_PORT = 8480

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 180), "orange": (245, 140, 30), "white": (250, 250, 250), "black": (20, 20, 20),
}
COUNTS = ("one", "two", "three", "four")
TEXTURES = ("plain", "striped", "dotted", "checkered")
BACKGROUNDS = ((200, 200, 200), (120, 150, 170), (235, 225, 200), (90, 90, 100))

# Real translations so language identification has something true to find.
_TRANSLATIONS = {
    "de": {
        "shape": {"circle": "Kreise", "square": "Quadrate", "triangle": "Dreiecke", "star": "Sterne",
                  "hexagon": "Sechsecke", "cross": "Kreuze"},
        "colour": {"red": "rote", "green": "grüne", "blue": "blaue", "yellow": "gelbe", "purple": "lila",
                   "orange": "orange", "white": "weiße", "black": "schwarze"},
        "count": {"one": "ein Bild mit", "two": "zwei", "three": "drei", "four": "vier"},
        "template": "{count} {colour} {shape} auf einem Hintergrund mit Muster",
    },
    "fr": {
        "shape": {"circle": "cercles", "square": "carrés", "triangle": "triangles", "star": "étoiles",
                  "hexagon": "hexagones", "cross": "croix"},
        "colour": {"red": "rouges", "green": "verts", "blue": "bleus", "yellow": "jaunes", "purple": "violets",
                   "orange": "orange", "white": "blancs", "black": "noirs"},
        "count": {"one": "une image avec", "two": "deux", "three": "trois", "four": "quatre"},
        "template": "{count} {shape} {colour} sur un fond décoré",
    },
    "es": {
        "shape": {"circle": "círculos", "square": "cuadrados", "triangle": "triángulos", "star": "estrellas",
                  "hexagon": "hexágonos", "cross": "cruces"},
        "colour": {"red": "rojos", "green": "verdes", "blue": "azules", "yellow": "amarillos",
                   "purple": "morados", "orange": "naranjas", "white": "blancos", "black": "negros"},
        "count": {"one": "una imagen con", "two": "dos", "three": "tres", "four": "cuatro"},
        "template": "{count} {shape} {colour} sobre un fondo con dibujos",
    },
}

_GOOD_TEMPLATES = (
    "a photo of {count} {colour} {shapes} on a {texture} background",
    "{count} {colour} {shapes} against a {texture} pattern",
    "illustration with {count} {colour} {shapes}, {texture} backdrop",
    "{Count} {colour} {shapes} drawn on {texture} paper",
    "clip art of {count} {colour} {shapes}",
)
BOILERPLATE = ("image", "IMG_2041.jpg", "untitled", "DSC_0042.JPG", "photo", "click here to enlarge",
               "stock photo", "thumbnail", "image.png", "no description available")

# Fraction of the pool in each noise kind (the rest is clean). Chosen to resemble
# what DataComp-style pools have, at a size where each kind is visible at 2,000 samples.
NOISE = {
    "mismatched_caption": 0.10,
    "boilerplate_caption": 0.05,
    "non_english_caption": 0.07,
    "tiny_image": 0.04,
    "extreme_aspect": 0.04,
    "broken_url": 0.03,
    "non_image": 0.02,
}


@dataclass(frozen=True)
class Content:
    """What an image shows (and what a truthful caption says)."""

    shape: str
    colour: str
    count: int  # 1..4
    texture: str
    background: int  # index into BACKGROUNDS

    def caption(self, rng: random.Random) -> str:
        shapes = self.shape + ("es" if self.shape in ("cross",) else "s") if self.count > 1 else self.shape
        count = COUNTS[self.count - 1] if self.count > 1 else "a single"
        template = rng.choice(_GOOD_TEMPLATES)
        return template.format(count=count, Count=count.capitalize(), colour=self.colour, shapes=shapes,
                               texture=self.texture)

    def caption_in(self, lang: str) -> str:
        t = _TRANSLATIONS[lang]
        return t["template"].format(count=t["count"][COUNTS[self.count - 1]], colour=t["colour"][self.colour],
                                    shape=t["shape"][self.shape])


def random_content(rng: random.Random) -> Content:
    return Content(shape=rng.choice(SHAPES), colour=rng.choice(list(COLOURS)), count=rng.randint(1, 4),
                   texture=rng.choice(TEXTURES), background=rng.randrange(len(BACKGROUNDS)))


def render(content: Content, width: int, height: int, rng: random.Random):
    """A PIL image of `content` at `width` x `height`."""
    from PIL import Image, ImageDraw

    bg = BACKGROUNDS[content.background]
    img = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(img)
    darker = tuple(max(0, c - 50) for c in bg)
    step = max(6, min(width, height) // 10)
    if content.texture == "striped":
        for x in range(-height, width, step * 2):
            draw.polygon([(x, 0), (x + step, 0), (x + step + height, height), (x + height, height)], fill=darker)
    elif content.texture == "dotted":
        for y in range(step // 2, height, step):
            for x in range(step // 2, width, step):
                r = max(1, step // 5)
                draw.ellipse([x - r, y - r, x + r, y + r], fill=darker)
    elif content.texture == "checkered":
        for y in range(0, height, step):
            for x in range(0, width, step):
                if (x // step + y // step) % 2:
                    draw.rectangle([x, y, x + step - 1, y + step - 1], fill=darker)
    colour = COLOURS[content.colour]
    outline = (0, 0, 0) if content.colour != "black" else (255, 255, 255)
    # One cell per object in a 2x2 grid, jittered, so objects rarely overlap.
    cells = rng.sample(range(4), content.count)
    cw, ch = width / 2, height / 2
    for cell in cells:
        cx = (cell % 2 + 0.5) * cw + rng.uniform(-0.15, 0.15) * cw
        cy = (cell // 2 + 0.5) * ch + rng.uniform(-0.15, 0.15) * ch
        r = min(cw, ch) * rng.uniform(0.28, 0.42)
        _draw_shape(draw, content.shape, cx, cy, r, colour, outline)
    return img


def _draw_shape(draw, shape: str, cx: float, cy: float, r: float, fill, outline) -> None:
    import math

    def poly(n: int, rot: float, radii=None):
        pts = []
        for k in range(n):
            a = rot + 2 * math.pi * k / n
            rr = r if radii is None else radii[k % len(radii)]
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts

    w = max(1, int(r / 10))
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=w)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill, outline=outline, width=w)
    elif shape == "triangle":
        draw.polygon(poly(3, -math.pi / 2), fill=fill, outline=outline)
    elif shape == "star":
        draw.polygon(poly(10, -math.pi / 2, [r, r * 0.45]), fill=fill, outline=outline)
    elif shape == "hexagon":
        draw.polygon(poly(6, 0), fill=fill, outline=outline)
    elif shape == "cross":
        t = r * 0.35
        draw.polygon([(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
                      (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
                      (cx - r, cy - t), (cx - t, cy - t)], fill=fill, outline=outline)
    else:
        raise ValueError(shape)


def encode(img, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=90)
    else:
        img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def demo_uid(seed: int, index: int, split: str = "pool") -> str:
    """A 128-bit hex uid, deterministic in (seed, split, index)."""
    return hashlib.md5(f"dcslurm-demo:{seed}:{split}:{index}".encode()).hexdigest()


@dataclass
class DemoPoolSummary:
    url: str
    samples: int
    files: int
    heldout: int
    noise: dict[str, int] = field(default_factory=dict)
    bytes_served: int = 0


def _noise_kind(rng: random.Random) -> str:
    x = rng.random()
    for kind, frac in NOISE.items():
        if x < frac:
            return kind
        x -= frac
    return "clean"


def generate_demo_pool(out: str, samples: int = 2000, seed: int = 0, files: int = 4, heldout: int = 300,
                       storage_options: dict | None = None) -> DemoPoolSummary:
    """Write a demo pool to `out` (see the module docstring). Deterministic in (samples, seed, files, heldout)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if samples < 1 or files < 1 or heldout < 0:
        raise ValueError("samples and files must be >= 1, heldout >= 0")
    files = min(files, samples)
    folder = DataFolder(out, storage_options)
    rng = random.Random(seed)
    rows: list[dict] = []
    noise_counts: dict[str, int] = {k: 0 for k in (*NOISE, "clean")}
    served = 0
    contents = [random_content(rng) for _ in range(samples)]
    for i in range(samples):
        r = random.Random(f"{seed}:{i}")  # per-sample stream: a sample does not depend on the pool size
        content = contents[i]
        kind = _noise_kind(r)
        noise_counts[kind] += 1
        uid = demo_uid(seed, i)
        width, height = r.randint(128, 320), r.randint(128, 320)
        if kind == "tiny_image":
            width, height = r.randint(12, 40), r.randint(12, 40)
        elif kind == "extreme_aspect":
            long, short = r.randint(400, 720), r.randint(48, 90)
            width, height = (long, short) if r.random() < 0.5 else (short, long)
        caption = content.caption(r)
        if kind == "mismatched_caption":
            other = random_content(r)
            while other.shape == content.shape and other.colour == content.colour:
                other = random_content(r)
            caption = other.caption(r)
        elif kind == "boilerplate_caption":
            caption = r.choice(BOILERPLATE)
        elif kind == "non_english_caption":
            caption = content.caption_in(r.choice(sorted(_TRANSLATIONS)))
        fmt = "png" if r.random() < 0.2 else "jpg"
        sha = None
        if kind == "broken_url":
            path = f"images/{i:06d}-gone.{fmt}"  # never written: the server answers 404
        elif kind == "non_image":
            path = f"pages/{i:06d}.html"
            body = (f"<!DOCTYPE html><html><head><title>{caption}</title></head><body><h1>Page moved</h1>"
                    f"<p>The image you requested is no longer here.</p></body></html>").encode()
            folder.write_bytes(path, body)
            served += len(body)
        else:
            path = f"images/{i:06d}.{fmt}"
            data = encode(render(content, width, height, r), fmt)
            folder.write_bytes(path, data)
            served += len(data)
            sha = hashlib.sha256(data).hexdigest()
        rows.append({
            "uid": uid, "url": f"http://{DEMO_HOST}/{path}", "text": caption,
            "original_width": width, "original_height": height, "sha256": sha,
            # DataComp pools list detected faces; ours has none, except a few boxes so blurring runs.
            "face_bboxes": [[0.05, 0.05, 0.3, 0.3]] if r.random() < 0.02 else [],
            "demo_kind": kind,
        })
    schema = pa.schema([
        ("uid", pa.string()), ("url", pa.string()), ("text", pa.string()),
        ("original_width", pa.int64()), ("original_height", pa.int64()), ("sha256", pa.string()),
        ("face_bboxes", pa.list_(pa.list_(pa.float64()))), ("demo_kind", pa.string()),
    ])
    per_file = -(-samples // files)
    for f in range(files):
        part = rows[f * per_file:(f + 1) * per_file]
        if not part:
            continue
        table = pa.Table.from_pylist(part, schema=schema)
        with folder.writer(f"{f:08d}.parquet") as fh:
            pq.write_table(table, fh)
    write_heldout(folder.child("heldout"), heldout, seed)
    summary = DemoPoolSummary(url=folder.url, samples=samples, files=files, heldout=heldout,
                              noise=noise_counts, bytes_served=served)
    folder.write_json("manifest.json", {
        "kind": SERVE_KIND, "seed": seed, "samples": samples, "files": files, "heldout": heldout,
        "noise": noise_counts, "noise_fractions": NOISE, "bytes_served": served,
    })
    # Written last: a pool is "ready to serve" only once everything above exists.
    folder.write_json(SERVE_FILE, {"kind": SERVE_KIND, "host": DEMO_HOST})
    return summary


# -- held-out evaluation sets -------------------------------------------------

def write_heldout(folder: DataFolder, n: int, seed: int) -> None:
    """Clean labelled images not in the pool, as clip_benchmark webdatasets:
    shapes/, colours/, counts/ (zero-shot classification) and retrieval/."""
    if n <= 0:
        return
    tasks = {
        "shapes": (list(SHAPES), lambda c: SHAPES.index(c.shape), ["a photo of a {c}.", "a drawing of a {c}.",
                                                                   "a {c} shape."]),
        "colours": (list(COLOURS), lambda c: list(COLOURS).index(c.colour), ["a photo of something {c}.",
                                                                            "a {c} shape."]),
        "counts": (list(COUNTS), lambda c: c.count - 1, ["a photo of {c} objects.", "{c} shapes."]),
    }
    buffers = {name: io.BytesIO() for name in (*tasks, "retrieval")}
    tars = {name: tarfile.open(fileobj=buf, mode="w") for name, buf in buffers.items()}
    labels = []
    for i in range(n):
        r = random.Random(f"{seed}:heldout:{i}")
        content = random_content(r)
        data = encode(render(content, 128, 128, r), "png")
        key = f"{i:06d}"
        captions = [content.caption(r) for _ in range(3)]
        for name, (_classes, label_of, _t) in tasks.items():
            _add(tars[name], f"{key}.png", data)
            _add(tars[name], f"{key}.cls", str(label_of(content)).encode())
        _add(tars["retrieval"], f"{key}.png", data)
        _add(tars["retrieval"], f"{key}.txt", "\n".join(captions).encode())
        labels.append({"key": key, "uid": demo_uid(seed, i, "heldout"), "shape": content.shape,
                       "colour": content.colour, "count": content.count, "texture": content.texture,
                       "captions": captions})
    for name, tar in tars.items():
        tar.close()
        task = folder.child(name)
        task.write_bytes("test/0.tar", buffers[name].getvalue())
        task.write_text("test/nshards.txt", "1\n")
        if name == "retrieval":
            task.write_text("dataset_type.txt", "retrieval\n")
        else:
            classes, _label, templates = tasks[name]
            task.write_text("classnames.txt", "\n".join(classes) + "\n")
            task.write_text("zeroshot_classification_templates.txt", "\n".join(templates) + "\n")
    folder.write_text("labels.jsonl", "".join(json.dumps(label, sort_keys=True) + "\n" for label in labels))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # deterministic bytes
    tar.addfile(info, io.BytesIO(data))


# -- serving ------------------------------------------------------------------

def read_serve_info(pool: DataFolder) -> dict | None:
    """The pool's serve.json, or None when the pool's URLs are real ones."""
    if not pool.exists(SERVE_FILE):
        return None
    info = pool.read_json(SERVE_FILE)
    if info.get("kind") != SERVE_KIND or not info.get("host"):
        return None
    return info


class BackgroundHTTPServer:
    """An http.server ThreadingHTTPServer answering from a daemon thread of this process:
    `start()` / `stop()` (joins the thread), or a context manager. Subclasses give the handler."""

    def __init__(self, handler, bind: str = "127.0.0.1", port: int = 0, name: str = "http-server"):
        try:
            self._server = http.server.ThreadingHTTPServer((bind, port), handler)
        except OSError as exc:
            raise UserError(f"{bind}:{port}: cannot listen there ({exc.strerror})") from None
        self._server.daemon_threads = True
        self._name = name
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self):
        self._thread = threading.Thread(target=self._server.serve_forever, name=self._name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class DemoPoolServer(BackgroundHTTPServer):
    """An HTTP proxy that answers for the demo pool's host from its folder.

    Clients reach it as a proxy (`ProxyHandler({"http": server.proxy_url})`; the download
    stage's `http_proxy`), so the URLs in the metadata stay `http://demo-pool.dcslurm.invalid/...`.
    Other hosts get 502 Bad Gateway, missing files 404. It listens on `bind` (127.0.0.1: this
    machine's tasks only; "0.0.0.0" for compute nodes, which then reach it by this host's name),
    port 0 = a free one.
    """

    def __init__(self, pool: DataFolder, host: str = DEMO_HOST, port: int = 0, bind: str = "127.0.0.1"):
        self.pool = pool
        self.host = host
        self.requests = 0
        super().__init__(self._make_handler(), bind, port, name="demo-pool-server")

    @classmethod
    def for_pool(cls, pool: DataFolder, port: int = 0, bind: str = "127.0.0.1") -> DemoPoolServer:
        """The server of a generated demo pool (its serve.json names the host to answer for)."""
        info = read_serve_info(pool)
        if info is None:
            raise UserError(f"{pool.url}: not a complete demo pool (no {SERVE_FILE}; `dcslurm pool demo` writes one)")
        return cls(pool, info["host"], port=port, bind=bind)

    @property
    def proxy_url(self) -> str:
        """What a download task's http_proxy names: this host's name when listening on every address."""
        address = self._server.server_address[0]
        return f"http://{socket.gethostname() if address in ('0.0.0.0', '') else address}:{self.port}"

    def _make_handler(self):
        server = self
        types = {".jpg": "image/jpeg", ".png": "image/png", ".html": "text/html; charset=utf-8"}

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args) -> None:  # quiet: thousands of requests
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                server.requests += 1
                parsed = urllib.parse.urlsplit(self.path)
                host = parsed.hostname or (self.headers.get("Host") or "").split(":")[0]
                rel = urllib.parse.unquote(parsed.path).lstrip("/")
                if host != server.host:
                    return self._reply(502, b"unknown host", "text/plain")
                if not rel.startswith(("images/", "pages/")) or ".." in rel:
                    return self._reply(404, b"not found", "text/plain")
                try:
                    data = server.pool.read_bytes(rel)
                except FileNotFoundError:
                    return self._reply(404, b"not found", "text/plain")
                ext = rel[rel.rfind("."):]
                self._reply(200, data, types.get(ext, "application/octet-stream"))

            def _reply(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler
