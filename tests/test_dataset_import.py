"""`loraloop dataset import`: every source shape, normalised pixels, and drops that say why.

Pictures are drawn here with PIL (distinct shapes per seed, so their perceptual hashes differ),
URLs are served by a real aiohttp server on 127.0.0.1, and the real CLI does the work.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
from pathlib import Path

import pytest
from aiohttp import web
from click.testing import CliRunner
from PIL import Image, ImageDraw

from loraloop.cli import cli
from training.dataset import NearDuplicateIndex, dataset_hash, perceptual_hash
from training.downloads import HostPolicy

RESOLUTION = 64


def picture(seed: int, size: tuple[int, int] = (96, 80), mode: str = "RGB") -> Image.Image:
    """A picture of a few random shapes; different seeds look different to a perceptual hash."""
    rng = random.Random(seed)
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    width, height = size
    for _ in range(6):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = x0 + rng.randrange(8, width), y0 + rng.randrange(8, height)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x1, y1), fill=tuple(rng.randrange(256) for _ in range(3)))
    return image.convert(mode)


def png_bytes(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    # One worker: tests stay in-process; test_several_workers_give_the_same_dataset covers the pool.
    path.write_text(f"[training]\nresolution = {RESOLUTION}\n\n[dataset]\nmin_image_size = 48\nimport_workers = 1\n")
    return path


def run_import(config_file: Path, *args: str):
    return CliRunner().invoke(cli, ["--config", str(config_file), "dataset", "import", "--no-progress",
                                    *map(str, args)])


def read_dataset(out: Path) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    report = json.loads((out / "report.json").read_text())
    return rows, report


def captions(rows: list[dict]) -> list[str]:
    return sorted(row["text"] for row in rows)


def test_a_folder_of_images_with_txt_captions_becomes_square_rgb_images_and_metadata(tmp_path, config_file):
    src = tmp_path / "pictures"
    (src / "nested").mkdir(parents=True)
    picture(1).save(src / "fox.png")
    (src / "fox.txt").write_text("a red fox\n in the snow\n")
    picture(2).save(src / "nested" / "owl.jpg", quality=95)
    (src / "nested" / "owl.txt").write_text("an owl at night")
    picture(3).save(src / "uncaptioned.webp")

    result = run_import(config_file, src, tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert "kept 3 images, dropped none" in result.output
    rows, report = read_dataset(tmp_path / "out")
    assert captions(rows) == ["", "a red fox in the snow", "an owl at night"]
    assert report["format"] == "folder" and report["kept_count"] == 3
    for row in rows:
        with Image.open(tmp_path / "out" / row["file_name"]) as image:
            assert image.size == (RESOLUTION, RESOLUTION) and image.mode == "RGB"
    assert sorted(k["source"] for k in report["kept"]) == ["fox.png", "nested/owl.jpg", "uncaptioned.webp"]
    written = (tmp_path / "out" / "dataset_hash").read_text().strip()
    assert written == report["dataset_hash"] == dataset_hash(tmp_path / "out")
    assert not list(tmp_path.glob(".out.importing-*")), "the staging folder is cleaned up"


def test_a_metadata_jsonl_folder_is_read_with_its_captions(tmp_path, config_file):
    src = tmp_path / "hf"
    src.mkdir()
    for seed, name in [(1, "a.png"), (2, "b.png")]:
        picture(seed).save(src / name)
    (src / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "text": "first picture"}\n\n{"file_name": "b.png"}\n'
    )

    result = run_import(config_file, src, tmp_path / "out")

    assert result.exit_code == 0, result.output
    rows, report = read_dataset(tmp_path / "out")
    assert report["format"] == "metadata"
    assert captions(rows) == ["", "first picture"]


def test_dreambooth_folders_are_captioned_from_their_names(tmp_path, config_file):
    src = tmp_path / "instance"
    (src / "sks_dog").mkdir(parents=True)
    (src / "10_ohwx_red_car").mkdir()
    picture(1).save(src / "sks_dog" / "1.png")
    picture(2).save(src / "sks_dog" / "2.png")
    picture(3).save(src / "10_ohwx_red_car" / "1.png")
    picture(4).save(src / "10_ohwx_red_car" / "2.png")
    (src / "10_ohwx_red_car" / "2.txt").write_text("ohwx red car parked at night")

    result = run_import(config_file, src, tmp_path / "out")

    assert result.exit_code == 0, result.output
    rows, report = read_dataset(tmp_path / "out")
    assert report["format"] == "dreambooth"
    assert captions(rows) == ["ohwx red car", "ohwx red car parked at night", "sks dog", "sks dog"]


def test_a_csv_is_read_through_the_columns_named_on_the_command_line(tmp_path, config_file):
    (tmp_path / "img").mkdir()
    picture(1).save(tmp_path / "img" / "a.png")
    picture(2).save(tmp_path / "img" / "b.png")
    source = tmp_path / "list.csv"
    source.write_text('path,text,likes\nimg/a.png,"a cat, sleeping",3\nimg/b.png,a dog,1\n')

    result = run_import(config_file, source, tmp_path / "out", "--image-column", "path", "--caption-column", "text")

    assert result.exit_code == 0, result.output
    rows, _ = read_dataset(tmp_path / "out")
    assert captions(rows) == ["a cat, sleeping", "a dog"]


def test_a_csv_without_the_configured_columns_fails_before_any_work_naming_the_columns_it_has(tmp_path, config_file):
    source = tmp_path / "list.csv"
    source.write_text("path,text\nimg/a.png,a cat\n")

    result = run_import(config_file, source, tmp_path / "out")

    assert result.exit_code != 0
    assert "no column 'image', 'caption'" in result.output and "columns: path, text" in result.output
    assert "--image-column" in result.output
    assert not (tmp_path / "out").exists()


def serve_pictures(app: web.Application, oversized: bytes) -> None:
    async def image(request: web.Request) -> web.Response:
        seed = int(request.match_info["seed"])
        return web.Response(body=png_bytes(picture(seed)), content_type="image/png")

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=oversized, content_type="image/png")

    async def streamed_big(request: web.Request) -> web.StreamResponse:
        # No Content-Length: the limit has to be enforced while reading.
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(oversized)
        await response.write_eof()
        return response

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(body=png_bytes(picture(7)), content_type="image/png")

    async def page(request: web.Request) -> web.Response:
        return web.Response(text="<html>not a picture</html>", content_type="text/html")

    app.router.add_get("/img/{seed}.png", image)
    app.router.add_get("/big.png", big)
    app.router.add_get("/streamed.png", streamed_big)
    app.router.add_get("/page.html", page)
    app.router.add_get("/slow.png", slow)


async def test_a_url_list_is_downloaded_and_bad_downloads_are_dropped_with_the_reason(tmp_path, config_file,
                                                                                     aiohttp_server):
    app = web.Application()
    serve_pictures(app, oversized=png_bytes(picture(9, size=(400, 400))) + b"\0" * 300_000)
    server = await aiohttp_server(app)
    base = f"http://127.0.0.1:{server.port}"
    config_file.write_text(config_file.read_text() + "max_download_bytes = 200000\ndownload_timeout_s = 0.5\n")
    source = tmp_path / "urls.txt"
    source.write_text(
        "# pictures for the fox LoRA\n"
        f"{base}/img/1.png a red fox\n"
        f"{base}/img/2.png\n"
        f"{base}/img/1.png\n"
        f"{base}/missing.png\n"
        f"{base}/page.html\n"
        f"{base}/big.png\n"
        f"{base}/streamed.png\n"
        f"{base}/slow.png\n"
    )

    # The CLI runs its own event loop, so it goes on a thread while this loop serves.
    result = await asyncio.to_thread(run_import, config_file, source, tmp_path / "out",
                                     "--allow-private-host", "127.0.0.1")

    assert result.exit_code == 0, result.output
    rows, report = read_dataset(tmp_path / "out")
    assert report["format"] == "urls"
    assert captions(rows) == ["", "a red fox"]
    reasons = {entry["source"].removeprefix(base): (entry["reason"], entry["detail"]) for entry in report["dropped"]}
    assert reasons["/img/1.png"][0] == "duplicate"
    assert reasons["/missing.png"] == ("download_failed", "HTTP 404")
    assert reasons["/page.html"][0] == "download_failed" and "text/html" in reasons["/page.html"][1]
    assert reasons["/big.png"][0] == "download_failed" and "too large" in reasons["/big.png"][1]
    assert reasons["/streamed.png"][0] == "download_failed" and "too large" in reasons["/streamed.png"][1]
    assert reasons["/slow.png"] == ("download_failed", "timed out")
    assert "5 download failed, 1 duplicate" in result.output


async def test_a_json_list_mixes_local_paths_and_urls(tmp_path, config_file, aiohttp_server):
    app = web.Application()
    serve_pictures(app, oversized=b"")
    server = await aiohttp_server(app)
    picture(1).save(tmp_path / "local.png")
    source = tmp_path / "links.json"
    source.write_text(json.dumps([
        {"link": "local.png", "caption": "a local picture"},
        {"link": f"http://127.0.0.1:{server.port}/img/2.png", "caption": "a downloaded picture"},
    ]))

    result = await asyncio.to_thread(run_import, config_file, source, tmp_path / "out",
                                     "--allow-private-host", "127.0.0.0/8")

    assert result.exit_code == 0, result.output
    rows, report = read_dataset(tmp_path / "out")
    assert report["format"] == "json"
    assert captions(rows) == ["a downloaded picture", "a local picture"]


def test_unreadable_small_duplicate_and_badly_captioned_pictures_are_dropped_and_reported(tmp_path, config_file):
    src = tmp_path / "pictures"
    src.mkdir()
    picture(1).save(src / "keep.png")
    (src / "keep.txt").write_text("a picture to keep")
    shutil.copy(src / "keep.png", src / "copy.png")
    # Same picture, smaller and re-encoded: a different file that looks the same.
    picture(1).resize((90, 75)).save(src / "reencoded.jpg", quality=80)
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    picture(2, size=(40, 30)).save(src / "tiny.png")
    picture(3).save(src / "junk_caption.png")
    (src / "junk_caption.txt").write_text("x")

    result = run_import(config_file, src, tmp_path / "out")

    assert result.exit_code == 0, result.output
    rows, report = read_dataset(tmp_path / "out")
    assert captions(rows) == ["a picture to keep"]
    reasons = {entry["source"]: entry["reason"] for entry in report["dropped"]}
    assert reasons == {
        "copy.png": "duplicate",  # the captioned copy is the one kept
        "reencoded.jpg": "near_duplicate",
        "broken.jpg": "unreadable",
        "tiny.png": "too_small",
        "junk_caption.png": "caption_too_short",
    }
    assert report["dropped_count"] == 5 and report["dropped_by_reason"]["duplicate"] == 1
    assert "kept 1 image, dropped 5" in result.output
    assert "dropped tiny.png: too small (40x30, shorter side under 48)" in result.output


def test_exif_orientation_is_applied_before_cropping(tmp_path, config_file):
    src = tmp_path / "pictures"
    src.mkdir()
    # Stored sideways: red on the left, blue on the right, with "rotate 90° clockwise to view".
    stored = Image.new("RGB", (96, 64), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 48, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    stored.save(src / "phone.jpg", quality=95, exif=exif)

    result = run_import(config_file, src, tmp_path / "out")

    assert result.exit_code == 0, result.output
    rows, _ = read_dataset(tmp_path / "out")
    with Image.open(tmp_path / "out" / rows[0]["file_name"]) as image:
        # Upright, the left half is on top: red above blue.
        top, bottom = image.getpixel((5, 5)), image.getpixel((5, RESOLUTION - 5))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_transparent_palette_and_grey_pictures_come_out_rgb_with_transparency_on_white(tmp_path, config_file):
    src = tmp_path / "pictures"
    src.mkdir()
    cutout = Image.new("RGBA", (80, 80), (0, 0, 0, 0))
    ImageDraw.Draw(cutout).ellipse((30, 30, 50, 50), fill=(200, 30, 30, 255))
    cutout.save(src / "cutout.png")
    picture(2, mode="P").save(src / "palette.png", transparency=0)
    picture(3, mode="L").save(src / "grey.png")

    result = run_import(config_file, src, tmp_path / "out")

    assert result.exit_code == 0, result.output
    rows, report = read_dataset(tmp_path / "out")
    assert len(rows) == 3
    by_source = {k["source"]: k["file_name"] for k in report["kept"]}
    for name in by_source.values():
        with Image.open(tmp_path / "out" / name) as image:
            assert image.mode == "RGB"
    with Image.open(tmp_path / "out" / by_source["cutout.png"]) as image:
        assert image.getpixel((0, 0)) == (255, 255, 255)


def test_a_near_duplicate_index_matches_only_within_the_distance():
    index = NearDuplicateIndex(max_distance=4)
    original = perceptual_hash(picture(1))
    index.add(original, "one")
    assert index.closest(perceptual_hash(picture(1).resize((70, 60)))) is not None
    assert index.closest(perceptual_hash(picture(2))) is None
    for i in range(100):  # grows past its first allocation
        index.add(perceptual_hash(picture(100 + i)), f"p{i}")
    assert index.closest(original) == ("one", 0)


@pytest.mark.parametrize(
    ("make_source", "message"),
    [
        (lambda tmp: tmp / "missing", "no such file or folder"),
        (lambda tmp: (tmp / "data.xyz").write_text("?") and tmp / "data.xyz", "unknown source format"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "no images found"),
        (lambda tmp: (tmp / "u.txt").write_text("ftp://example/x.png\n") and tmp / "u.txt",
         "u.txt:1: not an http(s) URL"),
        (lambda tmp: (tmp / "l.json").write_text('{"link": "a.png"}') and tmp / "l.json", "expected a JSON list"),
        (lambda tmp: (tmp / "m.jsonl").write_text('{"text": "no file"}\n') and tmp / "m.jsonl",
         'm.jsonl:1: each line needs a "file_name"'),
        (lambda tmp: (tmp / "l.csv").write_bytes("image,caption\na.png,caf\u00e9\n".encode("latin-1"))
         and tmp / "l.csv",
         "l.csv: not UTF-8 text"),
    ],
    ids=["missing", "unknown-format", "empty-folder", "bad-url", "json-not-a-list", "metadata-without-file-name",
         "csv-not-utf8"],
)
def test_bad_sources_fail_with_a_clear_message_and_write_nothing(tmp_path, config_file, make_source, message):
    result = run_import(config_file, make_source(tmp_path), tmp_path / "out")

    assert result.exit_code == 1
    assert message in result.output
    assert not (tmp_path / "out").exists()


def test_an_import_where_everything_is_dropped_is_an_error_that_says_why(tmp_path, config_file):
    src = tmp_path / "pictures"
    src.mkdir()
    picture(1, size=(20, 20)).save(src / "small.png")
    (src / "broken.png").write_bytes(b"nope")

    result = run_import(config_file, src, tmp_path / "out")

    assert result.exit_code == 1
    assert "nothing left to import" in result.output
    assert "1 too small" in result.output and "1 unreadable" in result.output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.importing-*"))


def test_an_existing_non_empty_output_folder_is_never_overwritten(tmp_path, config_file):
    src = tmp_path / "pictures"
    src.mkdir()
    picture(1).save(src / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")

    result = run_import(config_file, src, out)

    assert result.exit_code == 1 and "not empty" in result.output
    assert (out / "precious.txt").read_text() == "mine"


def test_the_resolution_flag_overrides_the_config_and_is_validated(tmp_path, config_file):
    src = tmp_path / "pictures"
    src.mkdir()
    picture(1, size=(200, 120)).save(src / "a.png")

    assert run_import(config_file, src, tmp_path / "bad", "--resolution", "100").exit_code == 2
    result = run_import(config_file, src, tmp_path / "out", "--resolution", "96")

    assert result.exit_code == 0, result.output
    rows, report = read_dataset(tmp_path / "out")
    assert report["resolution"] == 96
    with Image.open(tmp_path / "out" / rows[0]["file_name"]) as image:
        assert image.size == (96, 96)


def test_several_workers_give_the_same_dataset_as_one(tmp_path, config_file):
    src = tmp_path / "pictures"
    src.mkdir()
    for seed in range(6):
        picture(seed).save(src / f"{seed}.png")
        (src / f"{seed}.txt").write_text(f"picture {seed}")
    shutil.copy(src / "0.png", src / "0-copy.png")
    picture(1).resize((90, 75)).save(src / "1-small.jpg", quality=80)
    (src / "broken.png").write_bytes(b"nope")

    serial = run_import(config_file, src, tmp_path / "serial", "--workers", "1")
    parallel = run_import(config_file, src, tmp_path / "parallel", "--workers", "2")

    assert serial.exit_code == 0 and parallel.exit_code == 0, serial.output + parallel.output
    serial_report, parallel_report = (read_dataset(tmp_path / name)[1] for name in ("serial", "parallel"))
    assert parallel_report["kept"] == serial_report["kept"]
    assert parallel_report["dropped"] == serial_report["dropped"]
    assert serial_report["dropped_by_reason"] == {"duplicate": 1, "near_duplicate": 1, "unreadable": 1}
    for row in serial_report["kept"]:
        serial, parallel = tmp_path / "serial" / row["file_name"], tmp_path / "parallel" / row["file_name"]
        assert serial.read_bytes() == parallel.read_bytes()


def claims_size(png: bytes, width: int, height: int) -> bytes:
    """The PNG with a header that claims another size (and a valid CRC): a few KB posing as gigapixels."""
    import struct
    import zlib

    data = bytearray(png)
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


def test_pictures_over_the_pixel_cap_are_dropped_from_their_header_after_jpegs_free_downscale(tmp_path, config_file):
    config_file.write_text(config_file.read_text() + "max_image_pixels = 5000\n")
    src = tmp_path / "pictures"
    src.mkdir()
    picture(1, size=(256, 256)).save(src / "photo.jpg", quality=90)  # decodes at 1/4: 64x64, 4,096 pixels
    picture(2, size=(96, 80)).save(src / "wide.png")  # 7,680 pixels: PNG has no cheap downscale
    # 13000x13000 in its header: decoding it peaked at 1 GB before the cap was checked first.
    (src / "bomb.png").write_bytes(claims_size(png_bytes(picture(3, size=(16, 16))), 13000, 13000))

    result = run_import(config_file, src, tmp_path / "out")

    assert result.exit_code == 0, result.output
    _, report = read_dataset(tmp_path / "out")
    assert [k["source"] for k in report["kept"]] == ["photo.jpg"]
    details = {d["source"]: d["detail"] for d in report["dropped"]}
    assert details == {"bomb.png": "13000x13000: at most 5000 pixels are accepted",
                       "wide.png": "96x80: at most 5000 pixels are accepted"}


def test_only_png_jpeg_and_webp_are_decoded_whatever_the_file_is_called(tmp_path, config_file):
    src = tmp_path / "pictures"
    src.mkdir()
    picture(1).save(src / "real.webp")
    picture(2).save(src / "photo.jpg", format="TIFF")  # a TIFF named .jpg
    picture(3).save(src / "old.bmp")
    picture(4).save(src / "anim.gif")
    # EPS makes Pillow run Ghostscript; named .png, it must never reach that decoder.
    (src / "trap.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\nshowpage\n")

    result = run_import(config_file, src, tmp_path / "out")

    assert result.exit_code == 0, result.output
    _, report = read_dataset(tmp_path / "out")
    assert [k["source"] for k in report["kept"]] == ["real.webp"]
    assert sorted(d["source"] for d in report["dropped"]) == ["anim.gif", "old.bmp", "photo.jpg", "trap.png"]
    for dropped in report["dropped"]:
        assert dropped["detail"] == "not an image in an accepted format (PNG, JPEG or WebP)", dropped


def test_the_format_flag_overrides_detection_and_checks_the_source_shape(tmp_path, config_file):
    src = tmp_path / "instance"
    (src / "sks_dog").mkdir(parents=True)
    (src / "holiday photos").mkdir()
    picture(1).save(src / "sks_dog" / "1.png")
    picture(2).save(src / "holiday photos" / "2.png")

    as_folder = run_import(config_file, src, tmp_path / "out", "--format", "folder")
    as_dreambooth = run_import(config_file, src, tmp_path / "db", "--format", "dreambooth")
    as_csv = run_import(config_file, src, tmp_path / "csv", "--format", "csv")

    assert as_folder.exit_code == 0, as_folder.output
    assert captions(read_dataset(tmp_path / "out")[0]) == ["", ""]
    assert as_dreambooth.exit_code == 1 and "must be named <trigger>_<class>" in as_dreambooth.output
    assert "holiday photos" in as_dreambooth.output
    assert as_csv.exit_code == 1 and "the csv format reads a file, not a folder" in as_csv.output


# ---------------------------------------------------------------------------------------------
# Hostile sources: no request to this machine or its LAN, no file outside the source, no endless
# read, one sentence for input the readers choke on. The servers run on loopback, so the tests
# that download allow 127.0.0.1 explicitly (as a person would allow their NAS) and check the
# refusals around it.


def picture_server(app: web.Application, redirects: dict[str, str] | None = None) -> None:
    async def image(request: web.Request) -> web.Response:
        return web.Response(body=png_bytes(picture(int(request.match_info["seed"]))), content_type="image/png")

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound((redirects or {})[request.match_info["name"]])

    app.router.add_get("/img/{seed}.png", image)
    app.router.add_get("/go/{name}", redirect)


def refusals(report: dict) -> dict[str, str]:
    return {d["source"]: d["detail"] for d in report["dropped"] if d["reason"] == "refused_host"}


@pytest.mark.parametrize(("address", "kind"), [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
    ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped: the kernel connects to 127.0.0.1
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"), ("fd00::1", "private"),
    ("::ffff:192.168.1.1", "private"),
    ("169.254.169.254", "link-local"), ("fe80::1%eth0", "link-local"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("240.0.0.1", "reserved"),
    ("100.64.0.1", "not a public"),  # carrier-grade NAT: neither private nor global
])
def test_every_non_public_range_is_refused(address, kind):
    refusal = HostPolicy().refusal(address)
    assert refusal is not None and kind in refusal, (address, refusal)


def test_public_addresses_and_the_networks_allowed_pass():
    policy = HostPolicy.allowing(["192.168.1.0/24", "::1"])
    for address in ("93.184.216.34", "2606:4700:4700::1111", "192.168.1.20", "::ffff:192.168.1.20", "::1"):
        assert policy.refusal(address) is None, address
    for address in ("192.168.2.20", "127.0.0.1", "169.254.169.254"):
        assert policy.refusal(address) is not None, address


async def test_loopback_is_refused_without_the_option_by_address_and_by_name(tmp_path, config_file, aiohttp_server):
    app = web.Application()
    picture_server(app)
    server = await aiohttp_server(app)
    port = server.port
    source = tmp_path / "urls.txt"
    source.write_text(f"http://127.0.0.1:{port}/img/1.png\n"
                      f"http://localhost:{port}/img/2.png\n"
                      f"http://[::ffff:127.0.0.1]:{port}/img/3.png\n")

    result = await asyncio.to_thread(run_import, config_file, source, tmp_path / "out")

    assert result.exit_code == 1 and "nothing left to import" in result.output, result.output
    assert "3 refused host" in result.output
    allowed = await asyncio.to_thread(run_import, config_file, source, tmp_path / "allowed",
                                      "--allow-private-host", "127.0.0.1")
    assert allowed.exit_code == 0, allowed.output


async def test_redirects_are_checked_on_every_hop(tmp_path, config_file, aiohttp_server):
    inner_app = web.Application()
    picture_server(inner_app)
    inner = await aiohttp_server(inner_app, host="127.0.0.2")  # loopback too, but not the address allowed
    outer_app = web.Application()
    picture_server(outer_app, {
        "loopback": f"http://127.0.0.2:{inner.port}/img/5.png",
        "mapped": f"http://[::ffff:127.0.0.2]:{inner.port}/img/6.png",
        "metadata": "http://169.254.169.254/latest/meta-data/",
        "unspecified": f"http://0.0.0.0:{inner.port}/img/7.png",
        "multicast": "http://224.0.0.1/img/8.png",
        "lan": "http://10.0.0.1/img/9.png",
        "same-host": "/img/10.png",
        "loop": "/go/loop",
    })
    server = await aiohttp_server(outer_app)
    outer = f"http://127.0.0.1:{server.port}"
    names = ("loopback", "mapped", "metadata", "unspecified", "multicast", "lan", "same-host", "loop")
    source = tmp_path / "urls.txt"
    source.write_text("".join(f"{outer}/go/{name}\n" for name in names))

    result = await asyncio.to_thread(run_import, config_file, source, tmp_path / "out",
                                     "--allow-private-host", "127.0.0.1")

    assert result.exit_code == 0, result.output
    _, report = read_dataset(tmp_path / "out")
    assert [k["source"] for k in report["kept"]] == [f"{outer}/go/same-host"]  # redirects still work
    refused = {source.removeprefix(f"{outer}/go/"): detail for source, detail in refusals(report).items()}
    hop = f"redirect to http://127.0.0.2:{inner.port}/img/5.png"
    assert refused["loopback"].startswith(f"{hop}: 127.0.0.2 is a loopback address")
    assert "127.0.0.2 is a loopback address" in refused["mapped"]
    assert "169.254.169.254 is a link-local address" in refused["metadata"]
    assert "0.0.0.0 is an unspecified address" in refused["unspecified"]
    assert "multicast" in refused["multicast"] and "10.0.0.1 is a private address" in refused["lan"]
    assert "--allow-private-host" in refused["lan"]
    failed = {d["source"].removeprefix(f"{outer}/go/"): d["detail"] for d in report["dropped"]
              if d["reason"] == "download_failed"}
    assert failed == {"loop": "more than 5 redirects"}


def test_local_entries_must_be_regular_files_under_the_size_cap(tmp_path, config_file):
    config_file.write_text(config_file.read_text() + "max_download_bytes = 20000\n"
                           "allow_paths_outside_source = true\n")
    src = tmp_path / "pictures"
    src.mkdir()
    picture(1).save(src / "fine.png")
    big = png_bytes(Image.frombytes("RGB", (100, 100), random.Random(2).randbytes(30_000)))  # noise: no compression
    assert len(big) > 20_000
    (src / "big.png").write_bytes(big)
    os.mkfifo(src / "fifo.png")  # a read would wait for a writer forever
    (src / "links.json").write_text(json.dumps([
        {"link": "fine.png", "caption": "a fine picture"},
        {"link": "big.png", "caption": "a big picture"},
        {"link": "fifo.png", "caption": "a named pipe"},
        {"link": "/dev/zero", "caption": "endless zeros"},  # read whole, it filled 21.5 GB
    ]))

    result = run_import(config_file, src / "links.json", tmp_path / "out")

    assert result.exit_code == 0, result.output
    _, report = read_dataset(tmp_path / "out")
    assert [k["source"] for k in report["kept"]] == ["fine.png"]
    details = {d["source"]: d["detail"] for d in report["dropped"]}
    assert details == {"big.png": "too large (over the 20000-byte limit)", "fifo.png": "not a regular file",
                       "/dev/zero": "not a regular file"}


def test_local_paths_stay_inside_the_sources_folder_unless_allowed(tmp_path, config_file):
    src = tmp_path / "pictures"
    src.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    picture(1).save(src / "inside.png")
    picture(2).save(elsewhere / "private.png")
    (src / "sneaky.png").symlink_to(elsewhere / "private.png")
    (src / "links.json").write_text(json.dumps([
        {"link": "inside.png", "caption": "inside"},
        {"link": "../elsewhere/private.png", "caption": "climbing out"},
        {"link": str(elsewhere / "private.png"), "caption": "an absolute path"},
        {"link": "sneaky.png", "caption": "a symlink out"},
    ]))

    confined = run_import(config_file, src / "links.json", tmp_path / "confined")
    allowed = run_import(config_file, src / "links.json", tmp_path / "allowed", "--allow-paths-outside-source")

    assert confined.exit_code == 0 and allowed.exit_code == 0, confined.output + allowed.output
    _, report = read_dataset(tmp_path / "confined")
    assert [k["source"] for k in report["kept"]] == ["inside.png"]
    assert {d["reason"] for d in report["dropped"]} == {"outside_source"} and len(report["dropped"]) == 3
    assert "--allow-paths-outside-source" in report["dropped"][0]["detail"]
    _, opened = read_dataset(tmp_path / "allowed")
    assert len(opened["kept"]) == 2 and opened["dropped_by_reason"] == {"duplicate": 2}


@pytest.mark.parametrize(("name", "content", "message"), [
    ("long.csv", "image,caption\na.png," + "x" * 200_000 + "\n", "long.csv:2: not a readable CSV row"),
    ("deep.json", "[" * 100_000 + "]" * 100_000, "deep.json: nests lists or objects too deeply"),
    ("number.json", '[{"link": "a.png", "caption": ' + "9" * 5000 + "}]", "number.json: holds a number"),
    ("metadata.jsonl", '{"file_name": "a.png", "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
     "metadata.jsonl:1: nests lists or objects too deeply"),
], ids=["csv-field-over-the-limit", "deep-json", "huge-integer", "deep-metadata-line"])
def test_input_the_readers_choke_on_is_one_sentence_not_a_traceback(tmp_path, config_file, name, content, message):
    (tmp_path / name).write_text(content)

    result = run_import(config_file, tmp_path / name, tmp_path / "out")

    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
