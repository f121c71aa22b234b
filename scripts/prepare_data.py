"""Turn real photos into the ImageFolder data sets the training scripts read.

Oxford-IIIT Pet (default): the 12 cat breeds become `OUT_DIR/cats/<Breed>/` (for the DiT and a
breed classifier), and every cat vs every dog becomes `OUT_DIR/cat-vs-other/{cat,other}/`. In
Oxford's file names cat breeds are Capitalised (`Abyssinian_1.jpg`) and dog breeds lowercase
(`beagle_3.jpg`). The conversion reads `ROOT/oxford-iiit-pet/images/*.jpg` from disk; torchvision
downloads it there first when it is missing and --download is on.

--from-folder DIR imports any tree of `DIR/<class>/**/image` into `OUT_DIR/<name>/<class>/`.

Files are hard-linked (no extra disk space) or copied (--no-link). Re-running skips files that are
already in place, so it never duplicates anything, and replaces those whose source changed since (even at the
same size).

    python scripts/prepare_data.py --root data/oxford-pets --out-dir data
    python scripts/prepare_data.py --from-folder ~/Pictures/my-cats --name my-cats
"""

from __future__ import annotations

import filecmp
import os
import shutil
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from scripts.lib.cli import UserError, option, printable, run_main
from scripts.lib.data import IMAGE_EXTENSIONS, class_name_problem, is_hidden_name, refuse_foreign_classes

CAT_BREEDS = (
    "Abyssinian",
    "Bengal",
    "Birman",
    "Bombay",
    "British_Shorthair",
    "Egyptian_Mau",
    "Maine_Coon",
    "Persian",
    "Ragdoll",
    "Russian_Blue",
    "Siamese",
    "Sphynx",
)


def same_content(src: Path, dst: Path) -> bool:
    """Whether dst holds exactly src's bytes. A hard link is the same file; a copy made by an earlier run has
    src's size and modification time (copy2 keeps it) until src changes; on any doubt the bytes are compared."""
    if dst.samefile(src):
        return True
    src_stat, dst_stat = src.stat(), dst.stat()
    if src_stat.st_size != dst_stat.st_size:
        return False
    return src_stat.st_mtime_ns == dst_stat.st_mtime_ns or filecmp.cmp(src, dst, shallow=False)


def place_file(src: Path, dst: Path, link: bool) -> bool:
    """Hard-link or copy src to dst; False when dst already holds the same content (re-runs are no-ops), and a
    changed source replaces the stale copy."""
    if dst.exists():
        if same_content(src, dst):
            return False
        dst.unlink()
    if link:
        try:
            os.link(src, dst)
            return True
        except OSError:  # another file system, or links not allowed there: a copy still works
            pass
    shutil.copy2(src, dst)
    return True


def _place_all(files: Iterable[tuple[Path, Path]], link: bool) -> int:
    """Place (src, dst) pairs, creating folders; returns how many files were new."""
    new = 0
    for src, dst in files:
        dst.parent.mkdir(parents=True, exist_ok=True)
        new += place_file(src, dst, link)
    return new


def _download_oxford(root: Path) -> None:
    """Let torchvision fetch and unpack Oxford-IIIT Pet into root/oxford-iiit-pet (~800 MB)."""
    from torchvision.datasets import OxfordIIITPet

    print(f"downloading Oxford-IIIT Pet into {printable(root)} ...")
    try:
        OxfordIIITPet(str(root), split="trainval", download=True)
    except (OSError, RuntimeError) as error:  # URLError is an OSError; a bad checksum is a RuntimeError
        raise UserError(
            f"downloading Oxford-IIIT Pet into {printable(root)} failed ({printable(error)}) — check the internet "
            "connection, or pass --from-folder with images you already have"
        ) from error


def oxford_images(root: Path, download: bool) -> list[Path]:
    """The Oxford-IIIT Pet photos under root, downloading them first if allowed."""
    images_dir = root / "oxford-iiit-pet" / "images"
    if not images_dir.is_dir():
        if not download:
            raise UserError(
                f"Oxford-IIIT Pet not found at {printable(images_dir)} — run with --download on a machine with "
                "internet, or pass --from-folder"
            )
        _download_oxford(root)
    images = sorted(images_dir.glob("*.jpg")) if images_dir.is_dir() else []
    if not images:
        raise UserError(
            f"no .jpg images in {printable(images_dir)} — delete {printable(root / 'oxford-iiit-pet')} and run "
            "with --download, or pass --from-folder"
        )
    return images


def oxford_breed(image: Path) -> str:
    """`British_Shorthair_12.jpg` -> `British_Shorthair`."""
    return image.stem.rsplit("_", 1)[0]


def prepare_oxford(root: Path, out_dir: Path, download: bool, link: bool) -> dict[str, Counter[str]]:
    """Write OUT_DIR/cats/<Breed>/ and OUT_DIR/cat-vs-other/{cat,other}/; return counts per data set."""
    images = oxford_images(root, download)
    cats_dir, binary_dir = out_dir / "cats", out_dir / "cat-vs-other"
    refuse_foreign_classes(cats_dir, CAT_BREEDS)
    refuse_foreign_classes(binary_dir, ("cat", "other"))
    breed_files, binary_files = [], []
    for image in images:
        breed = oxford_breed(image)
        is_cat = breed in CAT_BREEDS  # every other Oxford breed (all lowercase names) is a dog
        if is_cat:
            breed_files.append((image, cats_dir / breed / image.name))
        binary_files.append((image, binary_dir / ("cat" if is_cat else "other") / image.name))
    new = _place_all(breed_files + binary_files, link)
    print(f"{new} new files ({len(breed_files) + len(binary_files) - new} already in place)")
    return {
        "cats": Counter(dst.parent.name for _, dst in breed_files),
        "cat-vs-other": Counter(dst.parent.name for _, dst in binary_files),
    }


def folder_images(source: Path) -> list[tuple[str, Path]]:
    """(class, image) pairs of a `source/<class>/**/image` tree, skipping hidden entries and non-images."""

    pairs = []
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if (
            len(relative.parts) >= 2
            and not any(is_hidden_name(part) for part in relative.parts)
            and path.suffix.lower() in IMAGE_EXTENSIONS
            and path.is_file()
        ):
            pairs.append((relative.parts[0], path))
    return pairs


def import_folder(source: Path, out: Path, link: bool) -> dict[str, Counter[str]]:
    """Copy/link a `source/<class>/**/image` tree into out/<class>/ (nested names joined with `__`)."""
    if not source.is_dir():
        raise UserError(f"--from-folder {printable(source)} is not a folder")
    pairs = folder_images(source)
    if not pairs:
        raise UserError(
            f"no images found under {printable(source)} — expected {printable(source)}/<class>/<image>.jpg "
            "(one subfolder per class, images as .jpg, .png, .webp, ...)"
        )
    for name in sorted({name for name, _ in pairs}):
        problem = class_name_problem(name)
        if problem:  # the trainers would refuse the data set: say so before anything is copied
            raise UserError(f"class folder {printable(source / name)}: the name {problem} — rename the folder")
    refuse_foreign_classes(out, {name for name, _ in pairs})
    # Flatten nested folders into the file name so two `img1.jpg` in different subfolders stay distinct.
    files = [(path, out / name / "__".join(path.relative_to(source / name).parts)) for name, path in pairs]
    new = _place_all(files, link)
    print(f"{new} new files ({len(files) - new} already in place)")
    return {out.name: Counter(name for name, _ in pairs)}


@dataclass
class PrepareDataConfig:
    root: str = option("data/oxford-pets", "where Oxford-IIIT Pet is (or is downloaded to): ROOT/oxford-iiit-pet/")
    out_dir: str = option("data", "output folder for the ImageFolder data sets")
    download: bool = option(True, "download Oxford-IIIT Pet with torchvision when it is not under --root")
    from_folder: str = option(
        "", "import this folder of <class>/ subfolders instead of Oxford-IIIT Pet; empty = Oxford"
    )
    name: str = option("", "data set name for --from-folder; empty = the folder's own name")
    link: bool = option(True, "hard-link files instead of copying them (--no-link copies)")


def main(cfg: PrepareDataConfig) -> dict[str, Counter[str]]:
    out_dir = Path(cfg.out_dir)
    if cfg.from_folder:
        source = Path(cfg.from_folder).expanduser()
        counts = import_folder(source, out_dir / (cfg.name or source.resolve().name), cfg.link)
    else:
        counts = prepare_oxford(Path(cfg.root), out_dir, cfg.download, cfg.link)
    for dataset, per_class in counts.items():
        summary = ", ".join(f"{printable(name)} {count}" for name, count in sorted(per_class.items()))
        print(
            f"{printable(out_dir / dataset)}: {sum(per_class.values())} images in {len(per_class)} classes ({summary})"
        )
    return counts


if __name__ == "__main__":
    run_main(
        main, PrepareDataConfig, "Prepare ImageFolder data sets from Oxford-IIIT Pet or any folder of class subfolders."
    )
