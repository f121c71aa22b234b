"""prepare_data: Oxford-IIIT Pet conversion on a fabricated copy, --from-folder import, clear errors."""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path

import pytest
import torchvision.datasets
from PIL import Image

from scripts.lib.cli import EXIT_USER_ERROR, UserError, run_main
from scripts.lib.data import scan_image_folder
from scripts.prepare_data import PrepareDataConfig, main

OXFORD_FILES = (
    "Abyssinian_1",
    "Abyssinian_2",
    "British_Shorthair_7",
    "Siamese_3",
    "beagle_3",
    "great_pyrenees_1",
)


def _tiny_jpeg(path: Path, shade: int = 120) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade, 80, 40)).save(path, "JPEG")


def _fake_oxford(root: Path) -> Path:
    """The layout torchvision unpacks: oxford-iiit-pet/images/*.jpg + annotations/{trainval,test}.txt."""
    base = root / "oxford-iiit-pet"
    for i, stem in enumerate(OXFORD_FILES):
        _tiny_jpeg(base / "images" / f"{stem}.jpg", shade=40 + 30 * i)
    (base / "images" / "Abyssinian_5.mat").write_bytes(b"not an image")
    species = {stem: 1 if stem[0].isupper() else 2 for stem in OXFORD_FILES}
    (base / "annotations").mkdir()
    (base / "annotations" / "trainval.txt").write_text(
        "".join(f"{stem} 1 {species[stem]} 1\n" for stem in OXFORD_FILES[::2])
    )
    (base / "annotations" / "test.txt").write_text(
        "".join(f"{stem} 1 {species[stem]} 1\n" for stem in OXFORD_FILES[1::2])
    )
    return root


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_oxford_becomes_breed_and_cat_vs_other_folders(tmp_path: Path) -> None:
    root, out = _fake_oxford(tmp_path / "oxford"), tmp_path / "data"
    counts = main(PrepareDataConfig(root=str(root), out_dir=str(out), download=False))
    assert counts["cats"] == {"Abyssinian": 2, "British_Shorthair": 1, "Siamese": 1}
    assert counts["cat-vs-other"] == {"cat": 4, "other": 2}
    assert _tree(out) == sorted(
        [
            "cats/Abyssinian/Abyssinian_1.jpg",
            "cats/Abyssinian/Abyssinian_2.jpg",
            "cats/British_Shorthair/British_Shorthair_7.jpg",
            "cats/Siamese/Siamese_3.jpg",
            "cat-vs-other/cat/Abyssinian_1.jpg",
            "cat-vs-other/cat/Abyssinian_2.jpg",
            "cat-vs-other/cat/British_Shorthair_7.jpg",
            "cat-vs-other/cat/Siamese_3.jpg",
            "cat-vs-other/other/beagle_3.jpg",
            "cat-vs-other/other/great_pyrenees_1.jpg",
        ]
    )
    source = root / "oxford-iiit-pet/images/Siamese_3.jpg"
    assert (out / "cats/Siamese/Siamese_3.jpg").read_bytes() == source.read_bytes()


def test_rerun_is_idempotent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = PrepareDataConfig(root=str(_fake_oxford(tmp_path / "oxford")), out_dir=str(tmp_path / "data"), download=False)
    first = main(cfg)
    before = _tree(tmp_path / "data")
    capsys.readouterr()
    assert main(cfg) == first
    assert _tree(tmp_path / "data") == before
    assert "0 new files (10 already in place)" in capsys.readouterr().out


def test_link_shares_the_file_and_no_link_copies(tmp_path: Path) -> None:
    root = _fake_oxford(tmp_path / "oxford")
    source = root / "oxford-iiit-pet/images/beagle_3.jpg"
    main(PrepareDataConfig(root=str(root), out_dir=str(tmp_path / "linked"), download=False, link=True))
    main(PrepareDataConfig(root=str(root), out_dir=str(tmp_path / "copied"), download=False, link=False))
    assert (tmp_path / "linked/cat-vs-other/other/beagle_3.jpg").samefile(source)
    copied = tmp_path / "copied/cat-vs-other/other/beagle_3.jpg"
    assert not copied.samefile(source) and copied.read_bytes() == source.read_bytes()


def _rewrite_same_size(path: Path, replace_file: bool) -> bytes:
    """New bytes of the same length in `path`: edited in place (same inode) or written anew and renamed over it."""
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the JPEG's last bytes: same size, different content
    if replace_file:
        fresh = path.with_name(path.name + ".new")
        fresh.write_bytes(bytes(data))
        fresh.replace(path)
    else:
        path.write_bytes(bytes(data))
    return bytes(data)


@pytest.mark.parametrize(
    "link, replace_file",
    [(False, False), (False, True), (True, True)],
    ids=["copy-edited", "copy-replaced", "link-replaced"],
)
def test_reimport_replaces_a_source_that_changed_at_the_same_size(
    tmp_path: Path, capsys, link: bool, replace_file: bool
) -> None:
    source = tmp_path / "pets"
    for name in ("a", "b"):
        _tiny_jpeg(source / "tabby" / f"{name}.jpg")
    cfg = PrepareDataConfig(from_folder=str(source), out_dir=str(tmp_path / "data"), link=link)
    main(cfg)
    changed = _rewrite_same_size(source / "tabby" / "a.jpg", replace_file)
    capsys.readouterr()
    main(cfg)
    assert (tmp_path / "data/pets/tabby/a.jpg").read_bytes() == changed
    assert "1 new files (1 already in place)" in capsys.readouterr().out


def test_a_touched_but_unchanged_source_is_not_copied_again(tmp_path: Path, capsys) -> None:
    source = tmp_path / "pets"
    _tiny_jpeg(source / "tabby" / "a.jpg")
    cfg = PrepareDataConfig(from_folder=str(source), out_dir=str(tmp_path / "data"), link=False)
    main(cfg)
    os.utime(source / "tabby" / "a.jpg", ns=(1, 1))  # only the time changed: the bytes are compared
    capsys.readouterr()
    main(cfg)
    assert "0 new files (1 already in place)" in capsys.readouterr().out


def test_missing_oxford_without_download_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="run with --download on a machine with internet, or pass --from-folder"):
        main(PrepareDataConfig(root=str(tmp_path / "nothing"), out_dir=str(tmp_path / "data"), download=False))


def test_download_failure_is_a_clear_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "OxfordIIITPet", offline)
    with pytest.raises(UserError, match="downloading Oxford-IIIT Pet .* failed .*name resolution.*internet"):
        main(PrepareDataConfig(root=str(tmp_path / "oxford"), out_dir=str(tmp_path / "data"), download=True))


def test_download_puts_oxford_where_the_conversion_reads_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_download(root: str, split: str, download: bool) -> None:
        calls.append((split, download))
        _fake_oxford(Path(root))

    monkeypatch.setattr(torchvision.datasets, "OxfordIIITPet", fake_download)
    counts = main(PrepareDataConfig(root=str(tmp_path / "oxford"), out_dir=str(tmp_path / "data"), download=True))
    assert calls == [("trainval", True)]
    assert sum(counts["cats"].values()) == 4


def test_refuses_to_mix_with_other_classes(tmp_path: Path) -> None:
    (tmp_path / "data/cats/orange_tabby").mkdir(parents=True)
    with pytest.raises(UserError, match="already holds other classes \\(orange_tabby\\)"):
        main(
            PrepareDataConfig(
                root=str(_fake_oxford(tmp_path / "oxford")), out_dir=str(tmp_path / "data"), download=False
            )
        )


def test_from_folder_imports_class_tree_skipping_hidden_and_non_images(tmp_path: Path) -> None:
    source = tmp_path / "my-pets"
    _tiny_jpeg(source / "tabby" / "a.jpg")
    _tiny_jpeg(source / "tabby" / "2024" / "a.jpg")
    Image.new("RGB", (8, 8)).save(source / "tabby" / "b.PNG")
    _tiny_jpeg(source / "ginger" / "c.jpeg")
    _tiny_jpeg(source / ".ipynb_checkpoints" / "x.jpg")
    _tiny_jpeg(source / "ginger" / ".thumbs" / "y.jpg")
    _tiny_jpeg(source / "__MACOSX" / "tabby" / "z.jpg")
    _tiny_jpeg(source / "loose.jpg")
    (source / "ginger" / "notes.txt").write_text("not an image")

    counts = main(PrepareDataConfig(from_folder=str(source), out_dir=str(tmp_path / "data")))
    assert counts == {"my-pets": {"tabby": 3, "ginger": 1}}
    assert _tree(tmp_path / "data") == [
        "my-pets/ginger/c.jpeg",
        "my-pets/tabby/2024__a.jpg",
        "my-pets/tabby/a.jpg",
        "my-pets/tabby/b.PNG",
    ]
    main(PrepareDataConfig(from_folder=str(source), out_dir=str(tmp_path / "data"), name="renamed", link=False))
    assert len(_tree(tmp_path / "data/renamed")) == 4


def test_from_folder_without_images_or_folder_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    with pytest.raises(UserError, match="no images found under .*empty"):
        main(PrepareDataConfig(from_folder=str(tmp_path / "empty"), out_dir=str(tmp_path / "data")))
    with pytest.raises(UserError, match="is not a folder"):
        main(PrepareDataConfig(from_folder=str(tmp_path / "missing"), out_dir=str(tmp_path / "data")))


def test_command_line_turns_the_error_into_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_main(
            main,
            PrepareDataConfig,
            "prepare",
            argv=["--root", str(tmp_path / "none"), "--no-download", "--out-dir", str(tmp_path / "data")],
        )
    assert exit_info.value.code == EXIT_USER_ERROR
    assert capsys.readouterr().err.startswith("error: Oxford-IIIT Pet not found")


def test_folder_names_are_escaped_in_what_it_prints(tmp_path: Path, capsys) -> None:
    _tiny_jpeg(tmp_path / "pets" / "tabby" / "a.jpg")
    main(PrepareDataConfig(from_folder=str(tmp_path / "pets"), out_dir=str(tmp_path / "data\n\x1b[2J")))
    out = capsys.readouterr().out
    assert "\x1b" not in out and "data\\n\\x1b[2J/pets: 1 images in 1 classes (tabby 1)" in out
    assert len(out.splitlines()) == 2  # "N new files" and the summary: the name split no line


def test_a_class_folder_that_is_a_symlink_is_followed_as_the_trainers_do(tmp_path: Path) -> None:
    _tiny_jpeg(tmp_path / "elsewhere" / "ginger" / "a.jpg")
    _tiny_jpeg(tmp_path / "pets" / "tabby" / "b.jpg")
    (tmp_path / "pets" / "ginger").symlink_to(tmp_path / "elsewhere" / "ginger", target_is_directory=True)
    assert scan_image_folder(tmp_path / "pets").class_names == ["ginger", "tabby"]
    counts = main(PrepareDataConfig(from_folder=str(tmp_path / "pets"), out_dir=str(tmp_path / "data")))
    assert counts == {"pets": {"ginger": 1, "tabby": 1}}
    assert _tree(tmp_path / "data") == ["pets/ginger/a.jpg", "pets/tabby/b.jpg"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"name": "../escaped"}, "data set name '../escaped' is a path, not a plain name"),
        ({"name": "/abs/x"}, "data set name '/abs/x' is a path"),
        ({"name": ".."}, "data set name '..' is a path"),
        ({"name": ""}, "data set name '' is not a name of 1 to"),
        ({"name": "a\tb"}, "data set name 'a\\\\tb' holds a control"),
        ({"from_folder": "", "name": "cats"}, "--name names a --from-folder import"),
        ({"out_dir": "{source}"}, "--out-dir .*pets is inside --from-folder .*pets"),
        ({"out_dir": "{source}/tabby/../data"}, "is inside --from-folder"),
        ({"class_dirs": ["tab\nby"]}, "class folders of .*pets: 'tab.+nby': the name holds a control"),
        ({"class_dirs": ["caf\u00e9", "cafe\u0301"]}, "one name in two Unicode spellings"),
    ],
    ids=["parent", "absolute", "dot-dot", "empty", "control", "oxford", "out-is-source", "out-in", "class", "nfc-nfd"],
)
def test_refused_in_one_line_before_anything_is_written(tmp_path: Path, overrides: dict, message: str) -> None:
    source, overrides = tmp_path / "pets", dict(overrides)
    class_dirs = overrides.pop("class_dirs", ["tabby"])
    for class_dir in class_dirs:
        _tiny_jpeg(source / class_dir / "a.jpg")
    if len(list(source.iterdir())) < len(class_dirs):
        pytest.skip("this file system folds Unicode spellings into one name")
    before = sorted(tmp_path.rglob("*"))
    values = {"from_folder": str(source), "out_dir": str(tmp_path / "data"), "root": str(tmp_path), "download": False}
    values |= {key: value.format(source=source) for key, value in overrides.items()}
    with pytest.raises(UserError, match=message) as refused:
        main(PrepareDataConfig(**values))
    assert "\n" not in str(refused.value) and sorted(tmp_path.rglob("*")) == before
