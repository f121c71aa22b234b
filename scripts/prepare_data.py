"""Turn real photos into the ImageFolder data sets the training scripts read.

Oxford-IIIT Pet (default; `ROOT/oxford-iiit-pet/images/*.jpg`, downloaded by torchvision when missing and --download
is on): the 12 cat breeds become `OUT_DIR/cats/<Breed>/`, every cat vs every dog `OUT_DIR/cat-vs-other/{cat,other}/`.
--from-folder DIR imports any tree of `DIR/<class>/**/image` into `OUT_DIR/<name>/<class>/`. Files are hard-linked (no
extra disk space) or copied (--no-link); a re-run skips files already in place and replaces those whose source changed.

    python scripts/prepare_data.py --root data/oxford-pets --out-dir data
    python scripts/prepare_data.py --from-folder ~/Pictures/my-cats --name my-cats
"""

from __future__ import annotations

import contextlib
import filecmp
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from scripts.lib.cli import IMAGE_EXTENSIONS, UserError, check_class_names, class_folders, is_hidden_name, name_problem
from scripts.lib.cli import option, printable, refuse_foreign_classes, run_main

CAT_BREEDS = ("Abyssinian", "Bengal", "Birman", "Bombay", "British_Shorthair", "Egyptian_Mau", "Maine_Coon",
              "Persian", "Ragdoll", "Russian_Blue", "Siamese", "Sphynx")  # fmt: skip


def place_all(files: list[tuple[Path, Path]], link: bool) -> None:
    """Hard-link or copy each (src, dst) and say how many were new. Files already in place are skipped: a hard link
    (the same file) and an earlier copy (copy2 keeps the time) have src's size and modification time until src
    changes, and on any doubt the bytes are compared. A changed source replaces the stale file."""
    new = 0
    for src, dst in files:
        if dst.exists():
            old, now = dst.stat(), src.stat()
            same_time = old.st_mtime_ns == now.st_mtime_ns
            if old.st_size == now.st_size and (same_time or filecmp.cmp(src, dst, shallow=False)):
                continue
            dst.unlink()
        dst.parent.mkdir(parents=True, exist_ok=True)
        new += 1
        if link:
            with contextlib.suppress(OSError):  # another file system, or links not allowed there: a copy still works
                os.link(src, dst)
                continue
        shutil.copy2(src, dst)
    print(f"{new} new files ({len(files) - new} already in place)")


def oxford_images(root: Path, download: bool) -> list[Path]:
    """The Oxford-IIIT Pet photos under root, fetched and unpacked there by torchvision first (~800 MB) if allowed."""
    images_dir = root / "oxford-iiit-pet" / "images"
    if not images_dir.is_dir() and not download:
        raise UserError(
            f"Oxford-IIIT Pet not found at {printable(images_dir)} — run with --download on a machine with internet, "
            "or pass --from-folder"
        )
    if not images_dir.is_dir():
        from torchvision.datasets import OxfordIIITPet

        print(f"downloading Oxford-IIIT Pet into {printable(root)} ...")
        try:
            OxfordIIITPet(str(root), split="trainval", download=True)
        except (OSError, RuntimeError) as error:  # URLError is an OSError; a bad checksum is a RuntimeError
            raise UserError(
                f"downloading Oxford-IIIT Pet into {printable(root)} failed ({printable(error)}) — check the "
                "internet connection, or pass --from-folder with images you already have"
            ) from error
    images = sorted(images_dir.glob("*.jpg"))
    if not images:
        raise UserError(
            f"no .jpg images in {printable(images_dir)} — delete {printable(root / 'oxford-iiit-pet')} and run "
            "with --download, or pass --from-folder"
        )
    return images


def prepare_oxford(root: Path, out_dir: Path, download: bool, link: bool) -> dict[str, Counter[str]]:
    """Write OUT_DIR/cats/<Breed>/ and OUT_DIR/cat-vs-other/{cat,other}/; return counts per data set."""
    images = oxford_images(root, download)
    refuse_foreign_classes(out_dir / "cats", CAT_BREEDS)
    refuse_foreign_classes(out_dir / "cat-vs-other", ("cat", "other"))
    placements = []  # (image, data set, class)
    for image in images:
        breed = image.stem.rsplit("_", 1)[0]  # British_Shorthair_12 -> British_Shorthair
        if breed in CAT_BREEDS:  # Oxford capitalises cat breeds; every other (all lowercase: beagle_3) is a dog
            placements += [(image, "cats", breed), (image, "cat-vs-other", "cat")]
        else:
            placements.append((image, "cat-vs-other", "other"))
    place_all([(image, out_dir / dataset / name / image.name) for image, dataset, name in placements], link)
    return {key: Counter(name for _, dataset, name in placements if dataset == key) for key in ("cats", "cat-vs-other")}


def import_folder(source: Path, out_dir: Path, name: str | None, link: bool) -> dict[str, Counter[str]]:
    """Copy/link a `source/<class>/**/image` tree into out_dir/<name>/<class>/, skipping hidden entries and
    non-images; every refusal comes before anything is written."""
    if not source.is_dir():
        raise UserError(f"--from-folder {printable(source)} is not a folder")
    name = source.resolve().name if name is None else name
    if problem := name_problem(name):
        raise UserError(f"data set name '{printable(name)}' {problem} — pass --name with a plain folder name")
    if out_dir.resolve().is_relative_to(source.resolve()):
        raise UserError(
            f"--out-dir {printable(out_dir)} is inside --from-folder {printable(source)}, so the next import would "
            "take its own output for a class — choose an --out-dir outside it"
        )
    # A class folder may be a symlink, as the trainers follow one; links further down are not followed (no loops).
    # Nested folders go into the file name, so two `img1.jpg` in different subfolders stay distinct.
    files = []  # (class, image, its file name in the class folder)
    for class_dir in class_folders(source):
        for path in sorted(class_dir.rglob("*")):
            parts = path.relative_to(class_dir).parts
            if not any(map(is_hidden_name, parts)) and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                files.append((class_dir.name, path, "__".join(parts)))
    if not files:
        raise UserError(
            f"no images found under {printable(source)} — expected {printable(source)}/<class>/<image>.jpg "
            "(one subfolder per class, images as .jpg, .png, .webp, ...)"
        )
    classes = sorted({class_name for class_name, _, _ in files})
    check_class_names(source, classes)  # the trainers would refuse the data set
    refuse_foreign_classes(out_dir / name, classes)
    place_all([(path, out_dir / name / class_name / file_name) for class_name, path, file_name in files], link)
    return {name: Counter(class_name for class_name, _, _ in files)}


@dataclass
class PrepareDataConfig:
    root: str = option("data/oxford-pets", "where Oxford-IIIT Pet is (or is downloaded to): ROOT/oxford-iiit-pet/")
    out_dir: str = option("data", "output folder for the ImageFolder data sets")
    download: bool = option(True, "download Oxford-IIIT Pet with torchvision when it is not under --root")
    from_folder: str = option("", "a folder of <class>/ folders to import instead of Oxford-IIIT Pet (empty: Oxford)")
    name: str | None = option(None, "name of the --from-folder data set (None: the source folder's own name)")
    link: bool = option(True, "hard-link files instead of copying them (--no-link copies)")


def main(cfg: PrepareDataConfig) -> dict[str, Counter[str]]:
    out_dir = Path(cfg.out_dir)
    if cfg.from_folder:
        counts = import_folder(Path(cfg.from_folder).expanduser(), out_dir, cfg.name, cfg.link)
    elif cfg.name is not None:
        raise UserError("--name names a --from-folder import; Oxford-IIIT Pet always becomes cats and cat-vs-other")
    else:
        counts = prepare_oxford(Path(cfg.root), out_dir, cfg.download, cfg.link)
    for dataset, per_class in counts.items():
        summary = ", ".join(f"{printable(name)} {count}" for name, count in sorted(per_class.items()))
        total = sum(per_class.values())
        print(f"{printable(out_dir / dataset)}: {total} images in {len(per_class)} classes ({summary})")
    return counts


if __name__ == "__main__":
    run_main(main, PrepareDataConfig, "Make ImageFolder data sets from Oxford-IIIT Pet or a folder of class folders.")
