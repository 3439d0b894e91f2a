"""Media references → raw bytes, within the byte, time, redirect and SSRF limits.

Forms: `data:<mime>;base64,<payload>`, `http(s)://` (httpx, async), `file://` (only under
`allowed_local_media_path`). Nothing here decodes media.

http(s): redirects are followed by hand, up to `max_redirects`, and every hop is checked
(scheme, host name, resolved addresses). The connection itself goes through `_PinnedBackend`,
which connects only to the addresses vetted for that host and checks the peer address it got;
TLS still verifies and sends SNI for the URL's host name, and Host is the URL's host. So a DNS
answer that changes between the check and the connect (rebinding) is never used.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import functools
import ipaddress
import os
import re
import ssl
import zlib
from typing import Iterable, Literal
from urllib.parse import unquote, urlsplit

import httpcore
import httpx

from vlmserve.multimodal.types import MediaConfig, MediaError
from vlmserve.multimodal.ssrf import HostPolicy, IPAddress, Resolver

Kind = Literal["image", "video"]
_REDIRECTS = (301, 302, 303, 307, 308)
_HTTPCORE_ERRORS = (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol,
                    httpcore.ProxyError)
_ALLOWED_FORMS = ("data:<mime>;base64,<data>, http://, https://, "
                  "or file:// under the server's --allowed-local-media-path")
_INLINE_DATA_URL = 256 * 1024  # longer data: URLs are decoded off the event loop
_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(?:;[^,]*)?),", re.IGNORECASE)


def _mib(n: int) -> str:
    return f"{n} bytes ({n / 2**20:.1f} MiB)"


class MediaFetcher:
    def __init__(self, config: MediaConfig, *, resolver: Resolver | None = None) -> None:
        self.config = config
        self.policy = HostPolicy(allowed_domains=config.allowed_media_domains,
                                 allow_private=config.allow_private_networks, resolver=resolver)

    def limits(self, kind: Kind) -> tuple[int, str, float, str]:
        if kind == "video":
            return (self.config.max_video_bytes, "--max-video-bytes",
                    self.config.video_timeout_s, "--video-timeout-s")
        return (self.config.max_media_bytes, "--max-media-bytes",
                self.config.image_timeout_s, "--image-timeout-s")

    async def fetch(self, url: str, kind: Kind) -> bytes:
        if not isinstance(url, str) or not url:
            raise MediaError(f"{kind} URL is empty; expected {_ALLOWED_FORMS}", param=f"{kind}_url")
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            if len(url) > _INLINE_DATA_URL:  # base64 of MBs holds the GIL for ~10 ms per MB
                return await asyncio.to_thread(self._data_url, url, kind)
            return self._data_url(url, kind)
        if scheme in ("http", "https"):
            return await self._http(url, kind)
        if scheme == "file":
            return await asyncio.to_thread(self._file, url, kind)
        raise MediaError(f"unsupported {kind} URL scheme {scheme or url[:16]!r}; "
                         f"allowed: {_ALLOWED_FORMS}", param=f"{kind}_url")

    # -- data: -----------------------------------------------------------------------------

    def _data_url(self, url: str, kind: Kind) -> bytes:
        cap, flag, _, _ = self.limits(kind)
        m = _DATA_URL.match(url)
        if m is None:
            raise MediaError(f"malformed data: URL; expected data:{kind}/<type>;base64,<data>")
        mime = m["mime"].strip().lower()
        if not mime.startswith(kind + "/"):
            raise MediaError(f"data: URL has media type {mime or '(none)'!r} where a {kind}/* "
                             f"type is expected (data:{kind}/<type>;base64,<data>)")
        params = [p.strip().lower() for p in m["params"].split(";")]
        if "base64" not in params:
            raise MediaError(f"data: URL must be base64 encoded: data:{mime};base64,<data>")
        payload = url[m.end():]
        # 4 base64 chars carry 3 bytes: refuse before decoding anything that cannot fit.
        if len(payload) // 4 * 3 > cap + 3:
            raise MediaError(f"{kind} of about {_mib(len(payload) // 4 * 3)} exceeds the limit of "
                             f"{_mib(cap)}; the server's {flag} raises it", status_code=413)
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            try:  # line-wrapped base64 (MIME style) is common; anything else is not base64
                raw = base64.b64decode("".join(payload.split()), validate=True)
            except (binascii.Error, ValueError):
                raise MediaError("data: URL payload is not valid base64 (A-Z a-z 0-9 + /, "
                                 "padded with = to a multiple of 4)") from None
        if not raw:
            raise MediaError(f"data: URL carries no {kind} bytes")
        if len(raw) > cap:
            raise MediaError(f"{kind} of {_mib(len(raw))} exceeds the limit of {_mib(cap)}; "
                             f"the server's {flag} raises it", status_code=413)
        return raw

    # -- file:// ----------------------------------------------------------------------------

    def _file(self, url: str, kind: Kind) -> bytes:
        root = self.config.allowed_local_media_path
        if root is None:
            raise MediaError("file:// media URLs are disabled; the server's "
                             "--allowed-local-media-path enables them for one directory")
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise MediaError(f"file:// URL names host {parts.netloc!r}; only local files "
                             "(file:///absolute/path) are allowed")
        requested = unquote(parts.path)
        if "\x00" in requested:
            raise MediaError("file:// URL path contains a NUL byte")
        # realpath resolves `..` and every symlink, so the containment check sees the file
        # that would really be opened.
        real = os.path.realpath(requested)
        if os.path.commonpath([real, root]) != root:
            raise MediaError(f"file {requested!r} is outside the allowed media directory "
                             f"{root} (the server's --allowed-local-media-path)")
        cap, flag, _, _ = self.limits(kind)
        try:
            # O_NOFOLLOW: the last component cannot be swapped for a symlink after realpath.
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError as e:
            why = "does not exist" if e.errno == errno.ENOENT else f"cannot be opened ({e.strerror})"
            raise MediaError(f"file {requested!r} {why}") from None
        with os.fdopen(fd, "rb") as f:
            if not os.path.isfile(real):
                raise MediaError(f"file {requested!r} is not a regular file")
            raw = f.read(cap + 1)
        if len(raw) > cap:
            raise MediaError(f"{kind} file exceeds the limit of {_mib(cap)}; the server's {flag} "
                             "raises it", status_code=413)
        if not raw:
            raise MediaError(f"file {requested!r} is empty")
        return raw

    # -- http(s) ----------------------------------------------------------------------------

    async def _http(self, url: str, kind: Kind) -> bytes:
        _, _, budget, flag = self.limits(kind)
        pins: dict[tuple[str, int], list[IPAddress]] = {}
        timeout = httpx.Timeout(budget)
        transport = _PinnedTransport(_PinnedBackend(pins, self.policy))
        async with httpx.AsyncClient(transport=transport, timeout=timeout, trust_env=False,
                                     follow_redirects=False) as client:
            try:
                return await asyncio.wait_for(self._follow(client, pins, url, kind), budget)
            except (asyncio.TimeoutError, httpx.TimeoutException):
                raise MediaError(f"fetching the {kind} URL took longer than {budget:g} s; the "
                                 f"server's {flag} raises the limit") from None
            except httpx.TransportError as e:
                raise MediaError(f"cannot fetch the {kind} URL: {e or type(e).__name__}") from None

    async def _follow(self, client: httpx.AsyncClient, pins: dict, url: str, kind: Kind) -> bytes:
        hops = 0
        current = _parse_url(url, kind)
        while True:
            await self._vet_hop(current, pins)
            headers = {"Accept-Encoding": "gzip, deflate, identity", "User-Agent": "vlmserve-media"}
            async with client.stream("GET", current, headers=headers) as resp:
                if resp.status_code in _REDIRECTS and "location" in resp.headers:
                    hops += 1
                    if hops > self.config.max_redirects:
                        raise MediaError(f"{kind} URL redirected more than "
                                         f"{self.config.max_redirects} times; the server's "
                                         "--max-redirects raises the limit")
                    current = _parse_url(resp.headers["location"], kind, base=current)
                    continue
                if resp.status_code != 200:
                    raise MediaError(f"{kind} URL answered HTTP {resp.status_code} "
                                     f"{resp.reason_phrase}; expected 200")
                return await self._read_body(resp, kind)

    async def _vet_hop(self, url: httpx.URL, pins: dict) -> None:
        if url.scheme not in ("http", "https"):
            raise MediaError(f"media URL redirected to scheme {url.scheme!r}; only http and "
                             "https are followed")
        host = url.raw_host.decode("ascii").lower()
        port = url.port or (443 if url.scheme == "https" else 80)
        self.policy.check_name(host)
        pins[(host, port)] = await self.policy.resolve(host, port)

    async def _read_body(self, resp: httpx.Response, kind: Kind) -> bytes:
        cap, flag, _, _ = self.limits(kind)
        too_big = f"{kind} exceeds the limit of {_mib(cap)}; the server's {flag} raises it"
        declared = resp.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            raise MediaError(f"{kind} of {_mib(int(declared))} (Content-Length) exceeds the limit "
                             f"of {_mib(cap)}; the server's {flag} raises it", status_code=413)
        encoding = resp.headers.get("content-encoding", "").strip().lower()
        inflater = None if encoding in ("", "identity") else _Inflater(encoding, cap, too_big)
        body = bytearray()
        async for chunk in resp.aiter_raw():  # raw: _Inflater bounds decompression, httpx would not
            body += inflater.feed(chunk) if inflater else chunk
            if len(body) > cap:  # stop reading: the rest is never downloaded
                raise MediaError(too_big, status_code=413)
        if inflater:
            body += inflater.feed(b"")
        if not body:
            raise MediaError(f"{kind} URL returned an empty body")
        return bytes(body)


def _parse_url(url: str, kind: Kind, base: httpx.URL | None = None) -> httpx.URL:
    """The URL (or a redirect's Location, joined to `base`), or a 400 naming what is wrong
    with it: a bad port, an IP literal httpx refuses (octal `0177.0.0.1`), a host that is not
    a valid IDNA name, a lone surrogate."""
    where = "redirect Location" if base is not None else "URL"
    try:
        parsed = base.join(url) if base is not None else httpx.URL(url)
    except (httpx.InvalidURL, ValueError, UnicodeError) as e:
        raise MediaError(f"the {kind} {where} is not a valid http(s) URL ({e}); expected "
                         "http(s)://host[:port]/path with a DNS name or a dotted-decimal IP") from None
    if parsed.port is not None and not 0 < parsed.port < 65536:  # httpx parses any integer
        raise MediaError(f"the {kind} {where} has port {parsed.port}; a port is 1 to 65535")
    return parsed


class _Inflater:
    """Content-Encoding decoder that never inflates past the byte cap (a 20 KB gzip bomb
    cannot allocate gigabytes before the cap sees it: zlib's max_length bounds each call)."""

    def __init__(self, encoding: str, cap: int, too_big: str) -> None:
        if encoding not in ("gzip", "x-gzip", "deflate"):
            raise MediaError(f"media URL answered with Content-Encoding {encoding!r}; "
                             "supported: identity, gzip, deflate")
        self.encoding, self.cap, self.too_big = encoding, cap, too_big
        self.out = 0
        # 32 + MAX_WBITS accepts a zlib or gzip header; servers that send raw deflate for
        # "deflate" get a second decoder on the first chunk.
        self._z = zlib.decompressobj(32 + zlib.MAX_WBITS)
        self._first = True

    def feed(self, chunk: bytes) -> bytes:
        budget = self.cap + 1 - self.out
        try:
            data = self._z.decompress(chunk, budget) if chunk else self._z.flush(budget)
        except zlib.error:
            if not (self._first and self.encoding == "deflate"):
                raise MediaError(f"media URL body is not valid {self.encoding} data") from None
            self._z = zlib.decompressobj(-zlib.MAX_WBITS)
            data = self._z.decompress(chunk, budget)
        self._first = False
        self.out += len(data)
        if self.out > self.cap or self._z.unconsumed_tail:
            raise MediaError(self.too_big, status_code=413)
        return data


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """Connects only to addresses the fetcher vetted for (host, port), never re-resolving."""

    def __init__(self, pins: dict[tuple[str, int], list[IPAddress]], policy: HostPolicy,
                 inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self._pins = pins
        self._policy = policy
        self._inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable | None = None) -> httpcore.AsyncNetworkStream:
        addresses = self._pins.get((host.lower(), port))
        if not addresses:
            raise MediaError(f"refusing to connect to {host}:{port}: no vetted address for it")
        error: Exception | None = None
        for ip in addresses:
            self._policy.check_address(ip, host=host)
            try:
                stream = await self._inner.connect_tcp(str(ip), port, timeout, local_address,
                                                       socket_options)
            except httpcore.ConnectError as e:  # try the next vetted address
                error = e
                continue
            peer = stream.get_extra_info("server_addr")
            if peer is not None and ipaddress.ip_address(str(peer[0]).split("%")[0]) != ip:
                await stream.aclose()
                raise MediaError(f"connection to {host} reached {peer[0]}, not the vetted {ip}")
            return stream
        raise error or httpcore.ConnectError(f"cannot connect to {host}:{port}")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


@functools.lru_cache(maxsize=1)
def _ssl_context() -> ssl.SSLContext:
    """One verifying context (certifi's roots) for all fetches: loading the CA bundle costs
    ~10 ms of CPU, too much to repeat on the event loop per request."""
    return httpx.create_ssl_context()


class _PinnedTransport(httpx.AsyncBaseTransport):
    """httpx transport over an httpcore pool that uses `_PinnedBackend` for every socket."""

    def __init__(self, backend: _PinnedBackend) -> None:
        self._pool = httpcore.AsyncConnectionPool(ssl_context=_ssl_context(),
                                                  network_backend=backend, max_connections=4)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        core = httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=request.url.raw_scheme, host=request.url.raw_host,
                             port=request.url.port, target=request.url.raw_path),
            headers=request.headers.raw, content=request.stream, extensions=request.extensions)
        with _mapped_errors():
            resp = await self._pool.handle_async_request(core)
        return httpx.Response(status_code=resp.status, headers=resp.headers,
                              stream=_Body(resp.stream), extensions=resp.extensions)

    async def aclose(self) -> None:
        await self._pool.aclose()


class _Body(httpx.AsyncByteStream):
    def __init__(self, stream) -> None:
        self._stream = stream

    async def __aiter__(self):
        with _mapped_errors():
            async for chunk in self._stream:
                yield chunk

    async def aclose(self) -> None:
        if hasattr(self._stream, "aclose"):
            await self._stream.aclose()


class _mapped_errors:
    """httpcore errors → httpx's, so callers catch one family (MediaError passes through)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ, exc, tb) -> bool:
        if exc is None or isinstance(exc, MediaError):
            return False
        if isinstance(exc, httpcore.TimeoutException):
            raise httpx.TimeoutException(str(exc)) from exc
        if isinstance(exc, _HTTPCORE_ERRORS):
            raise httpx.TransportError(str(exc) or type(exc).__name__) from exc
        return False
