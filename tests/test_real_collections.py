"""Real image collections as users keep them: folders with sidecar captions, Tux Paint stamps, imagefolder
metadata, names as captions, and the image formats such collections hold (transparency, palettes, EXIF, SVG)."""

from __future__ import annotations

import base64
import gzip
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simla.data import svg as svg_module
from simla.data.svg import looks_like_svg
from simla.data.folders import FolderCaptions, caption_from_path, read_folder
from simla.data.images import BAD_SAMPLE_KINDS, BadSampleError, load_image
from simla.data.readers import DataFormatError, read_records
from simla.data.retrieval import read_retrieval_eval, read_retrieval_train
from simla.train.pretrain import run_pretraining
from simla.train.recipe import load_recipe

from conftest import one_line_error
from test_train_pretrain import tiny_overrides



def png(path: Path, colour=(200, 30, 30), size=(20, 20), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def text(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------- sidecar folders
@pytest.fixture
def sidecar_folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    png(root / "b" / "dog.png")
    text(root / "b" / "dog.txt", "\nA dog on grass.\nA brown dog.\n")
    png(root / "a" / "cat.png")
    text(root / "a" / "cat.txt", "A sleeping cat.\nfr.utf8=Un chat qui dort.\npt_BR.utf8=Um gato.\n")
    png(root / "a" / "nocaption.png")
    text(root / "orphan.txt", "nobody's caption")
    png(root / ".hidden" / "secret.png")
    text(root / ".hidden" / "secret.txt", "never read")
    return root


def test_sidecar_first_line_sorted_with_relative_origins(sidecar_folder: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="simla.data.folders"):
        records = read_folder(sidecar_folder)
    assert [r.origin for r in records] == ["a/cat.png", "b/dog.png"]
    assert [r.captions for r in records] == [("A sleeping cat.",), ("A dog on grass.",)]
    assert records[0].image == os.path.join(str(sidecar_folder), "a", "cat.png")
    summary = next(m for m in caplog.messages if "images" in m)
    assert "3 images, 2 with captions" in summary and "1 left out" in summary and "a/nocaption.png" in summary
    assert "1 .txt files without an image" in summary


def test_every_line_mode_and_other_line(sidecar_folder: Path) -> None:
    every = read_folder(sidecar_folder, FolderCaptions(line=None))
    assert every[1].captions == ("A dog on grass.", "A brown dog.")
    assert every[0].captions == ("A sleeping cat.",)  # language lines are never plain captions
    second = read_folder(sidecar_folder, FolderCaptions(line=1))
    assert [r.origin for r in second] == ["b/dog.png"] and second[0].captions == ("A brown dog.",)


def test_language_line_and_counted_fallback(sidecar_folder: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="simla.data.folders"):
        records = read_folder(sidecar_folder, FolderCaptions(language="fr"))
    assert [r.captions for r in records] == [("Un chat qui dort.",), ("A dog on grass.",)]
    assert any("1 captions fell back to line 0" in m and "fr.utf8=" in m for m in caplog.messages)
    regional = read_folder(sidecar_folder, FolderCaptions(language="pt"))
    assert regional[0].captions == ("Um gato.",)


def test_tux_paint_style_sidecar_gives_its_english_first_line(tmp_path: Path) -> None:
    png(tmp_path / "food" / "potato.png", mode="RGBA", colour=(120, 80, 20, 255))
    text(tmp_path / "food" / "potato.txt",
         "A brown potato.\nach.utf8=Icok ma rema rema.\nca@valencia.utf8=Una creïlla rossa.\n"
         "fr.utf8=Une pomme de terre.\nzh_TW.utf8=馬鈴薯\n")
    (tmp_path / "food" / "potato_desc_fr.ogg").write_bytes(b"OggS")  # sounds beside stamps are ignored
    assert read_folder(tmp_path)[0].captions == ("A brown potato.",)
    assert read_folder(tmp_path, FolderCaptions(language="ca"))[0].captions == ("Una creïlla rossa.",)
    assert read_folder(tmp_path, FolderCaptions(language="zh_TW"))[0].captions == ("馬鈴薯",)


def test_caption_from_path_on_real_looking_names() -> None:
    name = "recreation/sports/table_tennis_omar_abo-na_01.png"
    assert caption_from_path(name, "name") == "table tennis omar abo na"
    assert caption_from_path(name, "path") == "recreation sports table tennis omar abo na"
    assert caption_from_path("medicina_dottore_archite_01.png", "name") == "medicina dottore archite"
    assert caption_from_path("RedApple.v2.JPG", "name") == "red apple v2"
    assert caption_from_path("scans/IMG_0042.jpg", "name") == "img"
    assert caption_from_path("0042.jpg", "name") == ""
    with pytest.raises(ValueError, match="mode"):
        caption_from_path("a.png", "stem")


def test_from_path_captions_images_without_sidecar(sidecar_folder: Path) -> None:
    records = read_folder(sidecar_folder, FolderCaptions(from_path="path"))
    assert {r.origin: r.captions for r in records}["a/nocaption.png"] == ("a nocaption",)
    assert {r.origin: r.captions for r in records}["a/cat.png"] == ("A sleeping cat.",)  # the sidecar wins


def test_raster_is_preferred_over_svg_of_the_same_name(tmp_path: Path) -> None:
    png(tmp_path / "heart.png")
    text(tmp_path / "heart.svg", '<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>')
    png(tmp_path / "star.PNG")
    text(tmp_path / "star.svg", '<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>')
    text(tmp_path / "moon.svgz", "")
    records = read_folder(tmp_path, FolderCaptions(from_path="name"))
    assert [r.origin for r in records] == ["heart.png", "moon.svgz", "star.PNG"]


# ------------------------------------------------------------------------------------ imagefolder layout
def test_imagefolder_metadata_jsonl_and_csv(tmp_path: Path) -> None:
    root = tmp_path / "set"
    png(root / "train" / "0001.png")
    png(root / "train" / "sub" / "0002.png")
    png(root / "train" / "unlisted.png")
    text(root / "train" / "unlisted.txt", "a sidecar is not used under a metadata folder")
    png(root / "other.png")
    text(root / "other.txt", "outside the metadata folder, sidecars still count")
    text(root / "train" / "metadata.jsonl",
         json.dumps({"file_name": "0001.png", "text": "a red square"}) + "\n\n"
         + json.dumps({"file_name": "sub/0002.png", "text": ["one", "two"], "extra": 1}) + "\n")
    png(tmp_path / "val" / "x.png")
    text(tmp_path / "val" / "metadata.csv", "file_name,caption\nx.png,\"a square, red\"\n")
    records = read_folder(root, FolderCaptions(metadata_column="text"))
    assert [(r.origin, r.captions) for r in records] == [
        ("other.png", ("outside the metadata folder, sidecars still count",)),
        ("train/0001.png", ("a red square",)),
        ("train/sub/0002.png", ("one", "two"))]  # train/unlisted.png is left out: its folder has metadata
    records = read_records(tmp_path / "val", folder=FolderCaptions(metadata_column="caption"))
    assert [(r.origin, r.captions) for r in records] == [("x.png", ("a square, red",))]


@pytest.mark.parametrize("name, body, record, field", [
    ("metadata.jsonl", '{"file_name": "a.png", "text": "ok"}\n{"file_name": 3, "text": "x"}\n', "line 2", "file_name"),
    ("metadata.jsonl", '{"file_name": "a.png"}\n', "line 1", "text"),
    ("metadata.jsonl", '{"file_name": "a.png", "text": "ok"}\n{oops\n', "line 2", None),
    ("metadata.csv", "file_name,text\na.png,ok\n,empty name\n", "line 3", "file_name"),
    ("metadata.csv", "file_name,caption\na.png,ok\n", "line 1", "text"),
])
def test_bad_metadata_names_file_line_and_field(tmp_path: Path, name, body, record, field) -> None:
    png(tmp_path / "a.png")
    text(tmp_path / name, body)
    with pytest.raises(DataFormatError) as info:
        read_folder(tmp_path)
    assert info.value.path == str(tmp_path / name) and info.value.record == record and info.value.field == field
    assert str(tmp_path / name) in str(info.value) and record in str(info.value)


# ----------------------------------------------------------------------------------------------- errors
def test_empty_folder_and_folder_without_captions_are_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    text(tmp_path / "empty" / "notes.txt", "no images here")
    with pytest.raises(DataFormatError, match="no images found"):
        read_records(tmp_path / "empty")
    png(tmp_path / "bare" / "IMG_0001.png")
    with pytest.raises(DataFormatError, match="none of the 1 images has a caption.*caption_from_path"):
        read_records(str(tmp_path / "bare"))
    with pytest.raises(ValueError, match="caption_from_path"):
        FolderCaptions(from_path="stem")


def test_non_utf8_sidecar_names_file_and_line(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"fine\nbad \xff byte\n")
    with pytest.raises(DataFormatError, match=r"a\.txt, line 2: not UTF-8"):
        read_folder(tmp_path)


def test_read_records_mixes_folders_and_files_and_names_unknown_files(tmp_path: Path) -> None:
    png(tmp_path / "imgs" / "a.png")
    text(tmp_path / "imgs" / "a.txt", "a caption")
    text(tmp_path / "pairs.jsonl", json.dumps({"image": "x.png", "caption": "from json"}) + "\n")
    records = read_records([tmp_path / "imgs", tmp_path / "pairs.jsonl"], image_root=tmp_path)
    assert [r.captions[0] for r in records] == ["a caption", "from json"]
    with pytest.raises(DataFormatError, match="expected an image folder or a file ending in"):
        read_records(tmp_path / "ann.yaml")


def test_tux_paint_stamps_read_with_english_first_lines(real_collections) -> None:
    records = read_folder(real_collections[0])
    assert len(records) >= 700
    captions = {r.origin: r.captions for r in records}
    assert captions["food/vegetables/potato.png"] == ("A brown potato.",)
    assert not any(".utf8=" in c for caps in captions.values() for c in caps)


# ---------------------------------------------------------------------------------------- image formats
def loaded(path: Path, **kwargs) -> tuple[np.ndarray, list[str]]:
    notes: list[str] = []
    image = load_image(path, notes=notes, **kwargs)
    assert image.mode == "RGB"
    return np.asarray(image), notes


def test_transparent_pixels_are_white_by_default_and_configurable(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))  # transparent black, as drawing programs leave it
    rgba.putpixel((1, 1), (0, 0, 255, 255))
    rgba.save(tmp_path / "drawing.png")
    array, notes = loaded(tmp_path / "drawing.png")
    assert tuple(array[0, 0]) == (255, 255, 255) and tuple(array[1, 1]) == (0, 0, 255)
    assert notes == ["transparent"]
    array, _ = loaded(tmp_path / "drawing.png", background=(10, 20, 30))
    assert tuple(array[0, 0]) == (10, 20, 30)
    with pytest.raises(ValueError, match="background"):
        load_image(tmp_path / "drawing.png", background=(0, 0, 256))
    Image.new("RGBA", (20, 20), (9, 9, 9, 255)).save(tmp_path / "opaque.png")
    assert loaded(tmp_path / "opaque.png")[1] == []  # an alpha channel that hides nothing is not noted


def test_palette_with_trns_and_grey_with_alpha(tmp_path: Path) -> None:
    pal = Image.new("P", (20, 20), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    pal.putpixel((0, 0), 0)
    pal.save(tmp_path / "p.png", transparency=0)
    array, notes = loaded(tmp_path / "p.png")
    assert tuple(array[0, 0]) == (255, 255, 255) and tuple(array[5, 5]) == (0, 255, 0)
    assert sorted(notes) == ["palette", "transparent"]
    la = Image.new("LA", (20, 20), (40, 255))
    la.putpixel((0, 0), (0, 0))
    la.save(tmp_path / "la.png")
    array, notes = loaded(tmp_path / "la.png")
    assert tuple(array[0, 0]) == (255, 255, 255) and tuple(array[3, 3]) == (40, 40, 40)
    assert sorted(notes) == ["grey", "transparent"]
    Image.fromarray(np.full((4, 30), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")
    array, notes = loaded(tmp_path / "deep.png")
    assert array.max() == 255 and sorted(notes) == ["grey", "sixteen_bit", "small"]


def test_exif_orientation_is_applied_by_default(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display", as phones tag portrait photos
    img.save(tmp_path / "phone.jpg", exif=exif.tobytes())
    array, notes = loaded(tmp_path / "phone.jpg")
    assert array.shape[:2] == (40, 20) and notes == ["exif_rotated"]
    array, notes = loaded(tmp_path / "phone.jpg", exif_transpose=False)
    assert array.shape[:2] == (20, 40) and notes == []


SVG = ('<svg xmlns="http://www.w3.org/2000/svg" width="40" height="20">'
       '<rect x="0" y="0" width="20" height="20" fill="#ff0000"/></svg>')


def test_svg_rendered_to_svg_size_on_white(tmp_path: Path) -> None:
    pytest.importorskip("cairosvg")
    text(tmp_path / "flag.svg", SVG)
    array, notes = loaded(tmp_path / "flag.svg", svg_size=64)
    assert array.shape[:2] == (32, 64)  # the longer side is svg_size, the aspect ratio kept
    assert tuple(array[16, 8]) == (255, 0, 0) and tuple(array[16, 56]) == (255, 255, 255)
    assert notes[0] == "svg" and "transparent" in notes
    text(tmp_path / "tall.svg", SVG.replace('width="40" height="20"', 'width="10" height="40"'))
    assert loaded(tmp_path / "tall.svg", svg_size=64)[0].shape[:2] == (64, 16)
    # Sniffed by content: an SVG without its suffix, with a BOM and an XML declaration first.
    data = b"\xef\xbb\xbf  <?xml version='1.0'?>\n" + SVG.encode()
    assert np.asarray(load_image(data, name="member.bin", svg_size=40)).shape[:2] == (20, 40)
    (tmp_path / "flag.svgz").write_bytes(gzip.compress(SVG.encode()))
    assert loaded(tmp_path / "flag.svgz", svg_size=40)[0].shape[:2] == (20, 40)
    text(tmp_path / "broken.svg", "<svg><rect")
    with pytest.raises(BadSampleError) as info:
        load_image(tmp_path / "broken.svg")
    assert info.value.kind == "corrupt"


def test_svg_without_cairosvg_is_an_unsupported_bad_sample(tmp_path: Path, monkeypatch) -> None:
    def missing():
        raise svg_module.SvgUnavailable("no module named 'cairosvg'")

    monkeypatch.setattr(svg_module, "_cairosvg", missing)
    text(tmp_path / "flag.svg", SVG)
    with pytest.raises(BadSampleError) as info:
        load_image(tmp_path / "flag.svg")
    assert info.value.kind == "unsupported" and 'pip install "simla[svg]"' in info.value.reason
    assert "unsupported" in BAD_SAMPLE_KINDS


@pytest.mark.parametrize("href", ["file:///etc/passwd", "http://127.0.0.1:9/x.png", "secret.png"])
def test_svg_never_reads_or_fetches_external_resources(tmp_path: Path, monkeypatch, href) -> None:
    pytest.importorskip("cairosvg")
    secret = png(tmp_path / "secret.png", colour=(0, 255, 0), size=(8, 8))
    opened = []
    real_open = open

    def watching_open(file, *args, **kwargs):
        opened.append(os.fspath(file) if isinstance(file, (str, os.PathLike)) else file)
        return real_open(file, *args, **kwargs)

    def no_network(*args, **kwargs):
        raise AssertionError("the SVG renderer tried to reach the network")

    monkeypatch.setattr("builtins.open", watching_open)
    monkeypatch.setattr("urllib.request.urlopen", no_network)
    monkeypatch.setattr("cairosvg.url.urlopen", no_network)
    body = SVG.replace("</svg>", f'<image href="{href}" width="8" height="8"/></svg>')
    (tmp_path / "sneaky.svg").write_text(body, encoding="utf-8")
    with pytest.raises(BadSampleError) as info:
        load_image(tmp_path / "sneaky.svg")
    assert info.value.kind == "unsupported" and "external resource" in info.value.reason
    assert not any(str(f).endswith(("passwd", "secret.png")) for f in opened), opened
    assert secret.is_file()


def test_svg_with_an_embedded_data_url_image_renders(tmp_path: Path) -> None:
    pytest.importorskip("cairosvg")
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 255, 0)).save(buffer, "PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    body = SVG.replace("</svg>", f'<image x="20" y="0" href="{data_url}" width="20" height="20"/></svg>')
    text(tmp_path / "embedded.svg", body)
    array, _ = loaded(tmp_path / "embedded.svg", svg_size=40)
    assert tuple(array[10, 30]) == (0, 255, 0)


def test_small_images_are_kept_and_noted(tmp_path: Path) -> None:
    png(tmp_path / "icon.png", size=(12, 40))
    array, notes = loaded(tmp_path / "icon.png")
    assert array.shape[:2] == (40, 12) and notes == ["small"]


# ------------------------------------------------------------------------------------------ pretraining
def test_pretraining_on_a_folder_counts_what_the_images_were(tmp_path: Path, minilm_dir: str) -> None:
    root = tmp_path / "photos"
    for i in range(8):
        colour = (30 * i, 100, 255 - 30 * i)
        if i % 2:
            rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
            rgba.paste(Image.new("RGBA", (16, 16), (*colour, 255)), (8, 8))
            (root / "drawings").mkdir(parents=True, exist_ok=True)
            rgba.save(root / "drawings" / f"shape_{i}.png")
            text(root / "drawings" / f"shape_{i}.txt", f"a drawn shape number {i}\nfr.utf8=une forme\n")
        else:
            png(root / "photos" / f"photo_{i}.png", colour=colour, size=(32, 24))
            text(root / "photos" / f"photo_{i}.txt", f"a plain photo number {i}")
    recipe = load_recipe(None, tiny_overrides(tmp_path, minilm_dir, train_file=str(root), max_steps=2,
                                              kmeans_fit_images=8, caption_line=0))
    result = run_pretraining(recipe)
    assert result.state.step == 2
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    images = log[-1]["images"]
    # 2 steps x 4 samples = 8 images read, half of them drawings with transparent surroundings.
    assert images.get("transparent", 0) >= 1 and set(images) <= {"transparent"}
    assert log[-1]["skipped_total"] == 0 and log[-1]["samples_seen"] == 8
    assert result.state.images == images


def test_retrieval_reads_folders_with_every_sidecar_line(sidecar_folder: Path) -> None:
    train = read_retrieval_train(sidecar_folder)
    assert [(r.origin, r.captions, r.image_id) for r in train] == [
        ("a/cat.png", ("A sleeping cat.",), 0), ("b/dog.png", ("A dog on grass.", "A brown dog."), 1)]
    evaluation = read_retrieval_eval(sidecar_folder, image_root="/ignored")
    assert evaluation.images == [os.path.join(str(sidecar_folder), "a", "cat.png"),
                                 os.path.join(str(sidecar_folder), "b", "dog.png")]
    assert evaluation.texts == ["a sleeping cat", "a dog on grass", "a brown dog"]
    assert evaluation.txt2img == [0, 1, 1] and evaluation.img2txt == [[0], [1, 2]]


def test_cli_reports_folder_problems_in_one_line(tmp_path: Path, capsys) -> None:
    png(tmp_path / "bare" / "IMG_0001.png")
    common = ["model=simla_tiny", "text_encoder=null", "vision_encoder=null", "device=cpu",
              f"output_dir={tmp_path / 'run'}"]
    one_line_error(capsys, ["pretrain", f"train_file={tmp_path / 'bare'}", *common], "bare", "caption_from_path")
    one_line_error(capsys, ["pretrain", f"train_file={tmp_path / 'bare'}", "caption_from_path=stem", *common],
                   "caption_from_path", "stem")


def test_symbolic_links_are_followed_once_even_in_a_loop(tmp_path: Path) -> None:
    root = tmp_path / "root"
    png(root / "a.png")
    text(root / "a.txt", "an image")
    png(tmp_path / "elsewhere" / "b.png")
    text(tmp_path / "elsewhere" / "b.txt", "linked in")
    os.symlink(tmp_path / "elsewhere", root / "linked")
    os.symlink(root, root / "loop")
    assert [r.origin for r in read_folder(root)] == ["a.png", "linked/b.png"]


def test_svg_sniffing() -> None:
    assert looks_like_svg(b"\xef\xbb\xbf\n  <svg xmlns='http://www.w3.org/2000/svg'/>")
    assert looks_like_svg(b"<!DOCTYPE svg PUBLIC '-//W3C//DTD SVG 1.1//EN' ''><svg/>")
    assert looks_like_svg(b"<!-- CC0 -->\n<svg/>") and looks_like_svg(b"\x1f\x8b...", "a.SVGZ")
    assert not looks_like_svg(b"\x89PNG\r\n\x1a\n") and not looks_like_svg(b"<html><svg/></html>")


ILLUSTRATOR = ('<?xml version="1.0"?>\n<!-- Generator: Adobe Illustrator 12.0.1 -->\n'
               "<!DOCTYPE svg PUBLIC '-//W3C//DTD SVG 1.1//EN' 'http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd' [\n"
               '\t<!ENTITY ns_svg "http://www.w3.org/2000/svg">\n\t<!ENTITY fill "#ff0000">\n]>\n'
               '<svg xmlns="&ns_svg;" width="20" height="20"><rect width="20" height="20" fill="&fill;"/></svg>')


def test_illustrator_entities_are_expanded_but_unsafe_ones_refused(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("cairosvg")
    text(tmp_path / "illustrator.svg", ILLUSTRATOR)
    assert tuple(np.asarray(load_image(tmp_path / "illustrator.svg", svg_size=20))[5, 5]) == (255, 0, 0)
    external = ILLUSTRATOR.replace('<!ENTITY fill "#ff0000">', '<!ENTITY fill SYSTEM "file:///etc/hostname">')
    nested = ILLUSTRATOR.replace('<!ENTITY fill "#ff0000">', '<!ENTITY a "ff"><!ENTITY fill "#&a;&a;&a;">')
    for name, body in (("external.svg", external), ("nested.svg", nested)):
        text(tmp_path / name, body)
        with pytest.raises(BadSampleError) as info:
            load_image(tmp_path / name)
        assert info.value.kind == "unsupported" and "refused for safety" in info.value.reason, info.value
