"""References → bytes: data: URLs, file:// URLs under the allowed directory, and http limits
(bytes, time, status) against the local server."""

from __future__ import annotations

import base64
import os

import pytest
from PIL import Image

from vlmserve.multimodal.media import MediaConfig, MediaError, MediaLoader

from .conftest import data_url, gzip_body, image_bytes

PNG = image_bytes(Image.new("RGB", (5, 4), (0, 128, 255)))


async def test_data_url_image_loads_as_rgb():
    image = await MediaLoader().load_image(data_url(PNG))
    assert image.mode == "RGB" and image.size == (5, 4) and image.getpixel((4, 3)) == (0, 128, 255)


async def test_line_wrapped_base64_is_accepted():
    b64 = base64.encodebytes(PNG).decode()  # MIME style: a newline every 76 characters
    assert "\n" in b64
    assert (await MediaLoader().load_image("data:image/png;base64," + b64)).size == (5, 4)


@pytest.mark.parametrize("url, message", [
    ("data:image/png;base64,!!!notbase64", "not valid base64"),
    ("data:image/png;base64,iVBORw0KGgo", "not valid base64"),  # length not a multiple of 4
    ("data:image/png," + base64.b64encode(PNG).decode(), "must be base64 encoded"),
    ("data:text/plain;base64," + base64.b64encode(PNG).decode(), "'text/plain'.*image/"),
    ("data:;base64," + base64.b64encode(PNG).decode(), r"'\(none\)'"),
    ("data:image/png;base64,", "no image bytes"),
    ("data:image/png;base64" + base64.b64encode(PNG).decode(), "malformed data: URL"),
    ("ftp://example.com/cat.png", "scheme 'ftp'.*data:.*https://.*file://"),
    ("", "empty"),
])
async def test_bad_data_url_is_a_400_that_states_the_allowed_form(url, message):
    with pytest.raises(MediaError, match=message) as e:
        await MediaLoader().load_image(url)
    assert e.value.status_code == 400


async def test_video_data_url_needs_a_video_mime():
    with pytest.raises(MediaError, match="video/"):
        await MediaLoader().load_video(data_url(PNG, "image/png"))


async def test_oversized_data_url_is_413_naming_the_limit():
    loader = MediaLoader(MediaConfig(max_media_bytes=1000))
    with pytest.raises(MediaError, match="limit of 1000 bytes.*--max-media-bytes") as e:
        await loader.load_image(data_url(os.urandom(3000)))
    assert e.value.status_code == 413


# -- file:// ---------------------------------------------------------------------------------

@pytest.fixture
def media_dir(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "cat.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    return allowed


async def test_file_url_inside_allowed_dir_loads(media_dir):
    loader = MediaLoader(MediaConfig(allowed_local_media_path=str(media_dir)))
    assert (await loader.load_image(f"file://{media_dir}/cat.png")).size == (5, 4)


async def test_file_urls_are_refused_unless_a_dir_is_allowed(media_dir):
    with pytest.raises(MediaError, match="--allowed-local-media-path"):
        await MediaLoader().load_image(f"file://{media_dir}/cat.png")


@pytest.mark.parametrize("path", ["{d}/../secret.png", "{d}/%2e%2e/secret.png", "/etc/passwd"])
async def test_file_url_outside_allowed_dir_is_refused(media_dir, path):
    loader = MediaLoader(MediaConfig(allowed_local_media_path=str(media_dir)))
    with pytest.raises(MediaError, match="outside the allowed media directory"):
        await loader.load_image("file://" + path.format(d=media_dir))


async def test_symlink_escaping_the_allowed_dir_is_refused(media_dir):
    (media_dir / "link.png").symlink_to(media_dir.parent / "secret.png")
    loader = MediaLoader(MediaConfig(allowed_local_media_path=str(media_dir)))
    with pytest.raises(MediaError, match="outside the allowed media directory"):
        await loader.load_image(f"file://{media_dir}/link.png")


async def test_missing_file_and_remote_file_host_are_400(media_dir):
    loader = MediaLoader(MediaConfig(allowed_local_media_path=str(media_dir)))
    with pytest.raises(MediaError, match="does not exist"):
        await loader.load_image(f"file://{media_dir}/nope.png")
    with pytest.raises(MediaError, match="only local files"):
        await loader.load_image(f"file://fileserver{media_dir}/cat.png")


async def test_oversized_local_file_is_413(media_dir):
    loader = MediaLoader(MediaConfig(allowed_local_media_path=str(media_dir), max_media_bytes=50))
    with pytest.raises(MediaError, match="--max-media-bytes") as e:
        await loader.load_image(f"file://{media_dir}/cat.png")
    assert e.value.status_code == 413


# -- http limits -----------------------------------------------------------------------------

def _local(**kw) -> MediaLoader:
    return MediaLoader(MediaConfig(allow_private_networks=True, **kw))


async def test_declared_oversized_body_is_413_before_reading(server):
    server.route("/big", body=b"\0" * 200_000)
    with pytest.raises(MediaError, match="Content-Length.*limit of 100000 bytes") as e:
        await _local(max_media_bytes=100_000).load_image(server.url("/big"))
    assert e.value.status_code == 413


async def test_undeclared_body_stops_reading_past_the_cap(server):
    server.route("/stream", body=b"\0" * 2_000_000, length=False)
    with pytest.raises(MediaError, match="exceeds the limit of 100000 bytes") as e:
        await _local(max_media_bytes=100_000).load_image(server.url("/stream"))
    assert e.value.status_code == 413


async def test_gzip_bomb_is_stopped_at_the_cap(server):
    body = gzip_body(50_000_000)  # ~50 KB on the wire, 50 MB inflated
    server.route("/bomb", body=body, headers={"Content-Encoding": "gzip"})
    with pytest.raises(MediaError, match="limit of 100000 bytes") as e:
        await _local(max_media_bytes=100_000).load_image(server.url("/bomb"))
    assert e.value.status_code == 413


async def test_gzip_encoded_image_is_inflated(server):
    import gzip
    server.route("/gz.png", body=gzip.compress(PNG), headers={"Content-Encoding": "gzip"})
    assert (await _local().load_image(server.url("/gz.png"))).size == (5, 4)


async def test_slow_server_hits_the_fetch_timeout(server):
    server.route("/slow", body=PNG, delay=1.5)
    with pytest.raises(MediaError, match="longer than 0.3 s.*--image-timeout-s") as e:
        await _local(image_timeout_s=0.3).load_image(server.url("/slow"))
    assert e.value.status_code == 400


async def test_http_error_status_is_a_400_naming_it(server):
    with pytest.raises(MediaError, match="HTTP 404"):
        await _local().load_image(server.url("/missing.png"))


@pytest.mark.parametrize("url, message", [
    ("http://0177.0.0.1/x.png", "not a valid http.*IPv4"),  # octal: httpx refuses to parse it
    ("http://[::1/x.png", "not a valid http"),
    ("http://a\ud800.example/x.png", "not a valid http"),  # a lone surrogate from the JSON
    ("http://93.184.215.14:99999/x.png", "port 99999; a port is 1 to 65535"),
])
async def test_unparseable_http_url_is_a_400_not_a_crash(url, message):
    with pytest.raises(MediaError, match=message) as e:
        await MediaLoader().load_image(url)
    assert e.value.status_code == 400


async def test_unparseable_redirect_location_is_a_400_not_a_crash(server):
    server.redirect("/bad-hop", "http://[::1/x.png")
    with pytest.raises(MediaError, match="(?i)location") as e:
        await _local().load_image(server.url("/bad-hop"))
    assert e.value.status_code == 400


async def test_unreachable_port_is_a_400_not_a_crash(server):
    server.httpd.shutdown()
    server.httpd.server_close()
    with pytest.raises(MediaError, match="cannot fetch"):
        await _local().load_image(server.url("/img.png"))


@pytest.mark.parametrize("kwargs, message", [
    ({"max_image_pixels": 0}, "max_image_pixels must be at least 1"),
    ({"image_timeout_s": 0}, "image_timeout_s must be greater than 0"),
    ({"max_video_frames": 31}, "must be even"),
    ({"allowed_media_domains": "cdn.example"}, "list of host names"),
    ({"allowed_local_media_path": "/nonexistent/media"}, "existing directory"),
])
def test_invalid_media_config_is_refused_at_startup(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MediaConfig(**kwargs)


def test_media_config_normalizes_domains():
    assert MediaConfig(allowed_media_domains=["CDN.Example."]).allowed_media_domains == ("cdn.example",)
