"""The SSRF guard: address classes, host names, the allow-list, redirect hops and the address
actually connected. Traffic only ever goes to the local server on 127.0.0.1."""

from __future__ import annotations

import ipaddress

import httpcore
import pytest

from vlmserve.multimodal.fetch import _PinnedBackend
from vlmserve.multimodal.media import MediaConfig, MediaError, MediaLoader
from vlmserve.multimodal.ssrf import HostPolicy, address_refusal

REFUSED_BY_DEFAULT = [
    "127.0.0.1", "127.8.9.10", "10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1",
    "169.254.1.1", "192.0.2.1", "::1", "fe80::1", "fc00::1", "fd12:3456::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::127.0.0.1",
    "64:ff9b::7f00:1", "2002:a00:1::1",
]
ALWAYS_REFUSED = [
    "169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254", "0.0.0.0", "::",
    "224.0.0.1", "ff02::1", "240.0.0.1", "255.255.255.255", "::ffff:169.254.169.254",
]
PUBLIC = ["8.8.8.8", "93.184.215.14", "2606:4700:4700::1111", "::ffff:8.8.8.8"]


@pytest.mark.parametrize("addr", REFUSED_BY_DEFAULT + ALWAYS_REFUSED)
def test_non_public_address_is_refused_by_default(addr):
    assert address_refusal(ipaddress.ip_address(addr), allow_private=False) is not None


@pytest.mark.parametrize("addr", ALWAYS_REFUSED)
def test_metadata_multicast_unspecified_reserved_refused_even_with_private_opt_in(addr):
    assert address_refusal(ipaddress.ip_address(addr), allow_private=True) is not None


@pytest.mark.parametrize("addr", ["127.0.0.1", "10.1.2.3", "100.64.0.1", "fd12::1", "::ffff:192.168.0.1"])
def test_private_opt_in_allows_private_ranges(addr):
    assert address_refusal(ipaddress.ip_address(addr), allow_private=True) is None


@pytest.mark.parametrize("addr", PUBLIC)
def test_public_address_is_allowed(addr):
    assert address_refusal(ipaddress.ip_address(addr), allow_private=False) is None


def test_refusal_names_the_class_and_the_flag():
    policy = HostPolicy(allowed_domains=None, allow_private=False)
    with pytest.raises(MediaError) as e:
        policy.check_address(ipaddress.ip_address("100.64.3.4"))
    assert "carrier-grade NAT" in str(e.value) and "--allow-private-media-urls" in str(e.value)
    assert e.value.status_code == 400


@pytest.mark.parametrize("host", ["metadata.google.internal", "METADATA.google.internal.", "metadata"])
def test_metadata_hostnames_refused_even_with_private_opt_in(host):
    with pytest.raises(MediaError, match="metadata"):
        HostPolicy(allowed_domains=None, allow_private=True).check_name(host)


def test_domain_allow_list_matches_exact_names_and_wildcard_subdomains():
    policy = HostPolicy(allowed_domains=("cdn.example", "*.images.example"), allow_private=False)
    policy.check_name("cdn.example")
    policy.check_name("a.b.images.example")
    for host in ("evil.example", "images.example", "cdn.example.evil", "8.8.8.8"):
        with pytest.raises(MediaError, match="--allowed-media-domains"):
            policy.check_name(host)


async def test_host_with_any_non_public_address_is_refused():
    policy = HostPolicy(allowed_domains=None, allow_private=False,
                        resolver=lambda host, port: ["8.8.8.8", "10.0.0.7"])
    with pytest.raises(MediaError, match="10.0.0.7"):
        await policy.resolve("mixed.example", 443)


async def test_async_resolver_is_awaited_and_answers_vetted():
    async def resolver(host, port):
        return ["8.8.4.4", "8.8.4.4"]
    policy = HostPolicy(allowed_domains=None, allow_private=False, resolver=resolver)
    assert await policy.resolve("dns.example", 80) == [ipaddress.ip_address("8.8.4.4")]


# -- the connection backend ------------------------------------------------------------------

class _FakeStream(httpcore.AsyncNetworkStream):
    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.closed = False

    def get_extra_info(self, info: str):
        return (self.peer, 443) if info == "server_addr" else None

    async def aclose(self) -> None:
        self.closed = True


class _RecordingBackend(httpcore.AsyncNetworkBackend):
    """Stands in for the socket layer: records where it was asked to connect, sends nothing."""

    def __init__(self, peer: str | None = None) -> None:
        self.calls: list[tuple[str, int]] = []
        self.peer = peer
        self.stream: _FakeStream | None = None

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        self.calls.append((host, port))
        self.stream = _FakeStream(self.peer or host)
        return self.stream


async def test_backend_connects_to_the_vetted_ip_not_the_name():
    inner = _RecordingBackend()
    pins = {("public.example", 443): [ipaddress.ip_address("93.184.215.14")]}
    backend = _PinnedBackend(pins, HostPolicy(allowed_domains=None, allow_private=False), inner)
    await backend.connect_tcp("public.example", 443)
    assert inner.calls == [("93.184.215.14", 443)]


async def test_backend_refuses_a_host_that_was_not_vetted():
    inner = _RecordingBackend()
    backend = _PinnedBackend({}, HostPolicy(allowed_domains=None, allow_private=False), inner)
    with pytest.raises(MediaError, match="no vetted address"):
        await backend.connect_tcp("public.example", 443)
    assert inner.calls == []


async def test_backend_rechecks_the_address_at_connect_time():
    inner = _RecordingBackend()
    pins = {("public.example", 80): [ipaddress.ip_address("127.0.0.1")]}  # a pin gone bad
    backend = _PinnedBackend(pins, HostPolicy(allowed_domains=None, allow_private=False), inner)
    with pytest.raises(MediaError, match="loopback"):
        await backend.connect_tcp("public.example", 80)
    assert inner.calls == []


async def test_backend_refuses_a_connection_whose_peer_is_not_the_vetted_address():
    inner = _RecordingBackend(peer="10.9.9.9")
    pins = {("public.example", 443): [ipaddress.ip_address("93.184.215.14")]}
    backend = _PinnedBackend(pins, HostPolicy(allowed_domains=None, allow_private=False), inner)
    with pytest.raises(MediaError, match="not the vetted"):
        await backend.connect_tcp("public.example", 443)
    assert inner.stream.closed


# -- end to end against the local server ------------------------------------------------------

async def test_loopback_url_is_refused_by_default_without_connecting(server):
    loader = MediaLoader(MediaConfig())
    with pytest.raises(MediaError, match="loopback") as e:
        await loader.load_image(server.url("/img.png"))
    assert e.value.status_code == 400 and server.log == []


async def test_loopback_url_is_fetched_with_private_opt_in(server):
    loader = MediaLoader(MediaConfig(allow_private_networks=True))
    image = await loader.load_image(server.url("/img.png"))
    assert image.size == (8, 6) and image.getpixel((0, 0)) == (200, 10, 10)


async def test_hostname_resolving_to_loopback_is_refused(server):
    loader = MediaLoader(MediaConfig(), resolver=lambda host, port: ["127.0.0.1"])
    with pytest.raises(MediaError, match="loopback"):
        await loader.load_image(server.url("/img.png", host="sneaky.example"))
    assert server.log == []


async def test_localhost_name_is_refused_with_the_system_resolver(server):
    with pytest.raises(MediaError, match="loopback"):
        await MediaLoader(MediaConfig()).load_image(server.url("/img.png", host="localhost"))
    assert server.log == []


async def test_vetted_name_is_resolved_once_and_keeps_its_host_header(server):
    calls = []

    def resolver(host, port):
        calls.append(host)
        return ["127.0.0.1"]
    loader = MediaLoader(MediaConfig(allow_private_networks=True,
                                     allowed_media_domains=("public.example",)), resolver=resolver)
    image = await loader.load_image(server.url("/img.png", host="public.example"))
    assert image.size == (8, 6)
    assert calls == ["public.example"]
    assert server.log == [("/img.png", f"public.example:{server.port}")]


async def test_domain_allow_list_refuses_other_hosts_before_resolving(server):
    calls = []
    loader = MediaLoader(MediaConfig(allowed_media_domains=("public.example",)),
                         resolver=lambda host, port: calls.append(host) or ["8.8.8.8"])
    with pytest.raises(MediaError, match="not in the allowed media domains"):
        await loader.load_image("https://other.example/cat.png")
    assert calls == []


@pytest.mark.parametrize("target", [
    "http://127.0.0.1:{port}/img.png",  # an IP literal outside the domain allow-list
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata: refused even with opt-in
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://[ff02::1]/x.png",  # multicast
    "http://rebind.example/x.png",  # a name the resolver maps to the metadata address
    "file:///etc/passwd",  # a redirect may not change the scheme to file
])
async def test_redirect_from_allowed_host_to_denied_target_is_refused(server, target):
    resolver = {"public.example": ["127.0.0.1"], "rebind.example": ["169.254.169.254"]}
    loader = MediaLoader(MediaConfig(allow_private_networks=True,
                                     allowed_media_domains=("public.example", "rebind.example")),
                         resolver=lambda host, port: resolver[host])
    server.redirect("/hop", target.format(port=server.port))
    with pytest.raises(MediaError) as e:
        await loader.load_image(server.url("/hop", host="public.example"))
    assert e.value.status_code == 400
    assert [path for path, _ in server.log] == ["/hop"]  # nothing reached past the first hop


async def test_allowed_redirect_is_followed(server):
    server.redirect("/hop", "/img.png")
    loader = MediaLoader(MediaConfig(allow_private_networks=True))
    assert (await loader.load_image(server.url("/hop"))).size == (8, 6)
    assert [path for path, _ in server.log] == ["/hop", "/img.png"]


async def test_redirect_cap_names_the_limit(server):
    server.redirect("/loop", "/loop")
    loader = MediaLoader(MediaConfig(allow_private_networks=True, max_redirects=2))
    with pytest.raises(MediaError, match="more than 2 times.*--max-redirects"):
        await loader.load_image(server.url("/loop"))
    assert len(server.log) == 3
