"""Turn what the user names (a preset, a category, URLs, a folder, a file) into concrete sources. Why: the acquire stage
should not care what the user typed; all of it resolves here into one :class:`SourceSpec` (which files, which format),
and every mistake becomes one :class:`ConfigError` line naming the value and the valid choices, before any download.
Formats are told apart by content, not file name, because people rename dumps; the sniffer reads lines as the readers do
and votes over the first few good records, so a dirty first line does not condemn a file the readers would accept."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import orjson

from sand.pipeline.base import formats
from sand.pipeline.base.config import InteractionsConfig
from sand.pipeline.base.errors import ConfigError, DataError
from sand.pipeline.base.lines import DEFAULT_MAX_LINE_BYTES, DirtyLine, iter_lines, parse_literal_line
from sand.pipeline.base.locations import REMOTE_SCHEMES, local_path, url_scheme

#: Format names and raw-dump formats, from the format table (functions here ask the table itself).
FORMATS: tuple[str, ...] = formats.format_names()
RAW_FORMATS: tuple[str, ...] = formats.raw_formats()
#: The 2014 release's per-category CNN image features (10-byte ASIN + 4,096 float32 per record).
AMAZON2014_IMAGE_FEATURES_URL = (
    "http://snap.stanford.edu/data/amazon/productGraph/image_features/categoryFiles/image_features_{cat}.b"
)
_CATEGORY = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_REVIEWS_2014_URL = formats.FORMATS["amazon2014"].urls[0]  # type: ignore[index]
_PUBLISHED_2014_REVIEWS = re.compile(
    re.escape(_REVIEWS_2014_URL).replace(re.escape("{cat}"), "([A-Za-z][A-Za-z0-9_]*)"))
_SCAN_LINES = 1000  # blank lines tolerated before the first record
#: Good records the sniffer votes over; dirty lines it tolerates first (readers' default; the configured budget applies
#: when the file is read).
SNIFF_RECORDS = 5
SNIFF_BAD_LINES: int = InteractionsConfig.model_fields["max_bad_lines"].default


@dataclass(frozen=True)
class Preset:
    """A named dataset: its category in each release that has it, and the release used by default."""

    description: str
    default_format: str
    categories: Mapping[str, str]  # format -> category name in that release


PRESETS: Mapping[str, Preset] = MappingProxyType({
    "baby": Preset("Amazon Baby 5-core (the SAND paper's dataset)", "amazon2014",
                   {"amazon2014": "Baby", "amazon2023": "Baby_Products"}),
    "sports": Preset("Amazon Sports and Outdoors 5-core", "amazon2014",
                     {f: "Sports_and_Outdoors" for f in RAW_FORMATS}),
    "clothing": Preset("Amazon Clothing, Shoes and Jewelry 5-core", "amazon2014",
                       {f: "Clothing_Shoes_and_Jewelry" for f in RAW_FORMATS}),
    "sample": Preset("bundled synthetic sample, generated offline (nothing to download)", "sample", {}),
})


@dataclass(frozen=True)
class SourceSpec:
    """Concrete sources: ``reviews``/``meta`` are URLs or local paths; ``mmrec_dir`` for MMRec folders."""

    name: str
    format: str
    reviews: str | None = None
    meta: str | None = None
    mmrec_dir: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mmrec_dir": str(self.mmrec_dir) if self.mmrec_dir is not None else None}


def category_urls(fmt: str, category: str) -> tuple[str, str]:
    """(reviews URL, meta URL) of ``category`` in release ``fmt`` (as published by the authors)."""
    urls = formats.FORMATS[fmt].urls if fmt in formats.FORMATS else None
    if urls is None:
        raise ConfigError(f"format '{fmt}' has no published category files (valid: {', '.join(formats.raw_formats())})")
    if not _CATEGORY.match(category):
        raise ConfigError(f"invalid category name '{category}' (letters, digits and '_', e.g. Baby_Products)")
    return urls[0].format(cat=category), urls[1].format(cat=category)


def amazon2014_category(spec: SourceSpec) -> str | None:
    """The 2014 category of a resolved dataset (a preset, or a category with the published reviews URL), else None."""
    if spec.format != "amazon2014":
        return None
    preset = PRESETS.get(spec.name)
    if preset is not None and "amazon2014" in preset.categories:
        return preset.categories["amazon2014"]
    match = _PUBLISHED_2014_REVIEWS.fullmatch(spec.reviews or "")
    return match.group(1) if match else None


def amazon2014_image_features_url(spec: SourceSpec) -> str | None:
    return AMAZON2014_IMAGE_FEATURES_URL.format(cat=category) if (category := amazon2014_category(spec)) else None


def resolve_source(dataset: str, fmt: str | None = None, reviews: str | None = None,
                   meta: str | None = None) -> SourceSpec:
    """Resolve, in order: a preset; an existing path (MMRec folder, folder of dumps, reviews file); a category name when
    ``fmt`` is a raw format; a free name with explicit ``reviews``, which (with ``meta``) replace what a preset or
    folder gives."""
    fmt = _check_format(fmt)
    key = dataset.strip()
    if not key:
        raise ConfigError(f"dataset must not be empty (presets: {', '.join(PRESETS)}, or a path)")
    if key.lower() in PRESETS:
        spec = _from_preset(key.lower(), fmt)
    elif Path(key).expanduser().exists():
        spec = _from_path(Path(key).expanduser(), fmt)
    elif _looks_like_path(key):
        raise ConfigError(f"dataset path does not exist: {key}")
    elif fmt in formats.raw_formats() and _CATEGORY.match(key):
        spec = SourceSpec(_category_name(key, fmt), fmt, *category_urls(fmt, key))
    elif reviews is not None:
        spec = SourceSpec(_sanitise_name(key), fmt or "", None, None)
    else:
        hint = f"; with --format {fmt} a category name such as Baby_Products" if fmt in formats.raw_formats() else ""
        raise ConfigError(f"unknown dataset '{key}' (valid: presets {', '.join(PRESETS)}, an existing path, a category "
                          f"name with a format of {', '.join(formats.raw_formats())}, or explicit reviews{hint})")
    return spec if reviews is None and meta is None else _override(spec, fmt, reviews, meta)


def _check_format(fmt: str | None) -> str | None:
    if fmt is None:
        return None
    norm = fmt.strip().lower()
    if norm not in formats.format_names():
        raise ConfigError(f"unknown format '{fmt}' (valid: {', '.join(formats.format_names())})")
    return norm


def _from_preset(name: str, fmt: str | None) -> SourceSpec:
    preset = PRESETS[name]
    if preset.default_format == "sample":
        if fmt not in (None, "sample"):
            raise ConfigError(f"dataset 'sample' is generated in its own format, not '{fmt}'")
        return SourceSpec("sample", "sample")
    fmt = fmt or preset.default_format
    if fmt not in preset.categories:
        raise ConfigError(f"preset '{name}' has no {fmt} files (available: {', '.join(preset.categories)})")
    return SourceSpec(name, fmt, *category_urls(fmt, preset.categories[fmt]))


def _category_name(category: str, fmt: str | None) -> str:
    """The preset name when the category is a preset's (so ``Baby`` and ``baby`` agree), else lowercased."""
    for name, preset in PRESETS.items():
        if fmt is not None and preset.categories.get(fmt) == category:
            return name
    return category.lower()


def _sanitise_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", text).strip("._")
    return name[:80] or "dataset"


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.startswith(("~", ".")) or bool(Path(text).suffix)


def _override(spec: SourceSpec, fmt: str | None, reviews: str | None, meta: str | None) -> SourceSpec:
    if spec.format in ("sample", "mmrec"):
        raise ConfigError(f"explicit reviews/meta files cannot be combined with a {spec.format} dataset")
    for field, value in (("reviews", reviews), ("meta", meta)):
        if value is None:
            continue
        scheme = url_scheme(value)
        if scheme and scheme not in (*REMOTE_SCHEMES, "file"):
            raise ConfigError(f"{field}: unsupported URL scheme '{scheme}' in {value} (valid: http, https, file)")
        local = local_path(value)
        if local is not None and not local.is_file():
            raise ConfigError(f"{field} file does not exist: {value}")
    new_reviews = reviews if reviews is not None else spec.reviews
    new_meta = meta if meta is not None else spec.meta
    if new_reviews is None:
        raise ConfigError(f"dataset '{spec.name}' needs a reviews file or URL (only meta was given)")
    out_fmt = fmt or spec.format
    if not out_fmt:  # sniff the files
        local = local_path(new_reviews)
        if local is None:
            raise ConfigError(f"format is required for a remote reviews URL ({new_reviews}); "
                              f"valid: {', '.join(formats.raw_formats())}")
        out_fmt = _agree(local, local_path(new_meta) if new_meta is not None else None)
    if out_fmt not in formats.raw_formats():
        raise ConfigError(f"format '{out_fmt}' cannot read reviews/meta files "
                          f"(valid: {', '.join(formats.raw_formats())})")
    return SourceSpec(spec.name, out_fmt, new_reviews, new_meta)


def _from_path(path: Path, fmt: str | None) -> SourceSpec:
    path = path.resolve()
    if path.is_dir():
        return _from_dir(path, fmt)
    if path.suffix == ".inter":
        _expect(fmt, "mmrec", path)
        return SourceSpec(path.stem, "mmrec", mmrec_dir=path.parent)
    if fmt == "mmrec":
        raise ConfigError(f"format mmrec needs a folder holding <name>.inter, got file {path}")
    kind_fmt, kind = _sniff_file(path)
    if kind == "meta":
        raise ConfigError(f"{path} looks like a metadata file; pass the reviews file (and this one as meta)")
    return SourceSpec(_name_from_file(path), fmt or kind_fmt, str(path), None)


def _from_dir(path: Path, fmt: str | None) -> SourceSpec:
    inters = sorted(path.glob("*.inter"))
    if inters:
        _expect(fmt, "mmrec", path)
        chosen = [p for p in inters if p.stem == path.name] if len(inters) > 1 else inters
        if len(chosen) != 1:
            names = ", ".join(p.name for p in inters)
            raise ConfigError(f"MMRec folder {path} holds several .inter files ({names}); pass one of them")
        return SourceSpec(chosen[0].stem, "mmrec", mmrec_dir=path)
    if fmt == "mmrec":
        raise ConfigError(f"format mmrec needs a folder holding <name>.inter; none in {path}")
    files = sorted(p for p in path.iterdir() if p.is_file() and _is_data_file(p))
    metas = [p for p in files if p.name.startswith("meta_")]
    reviews = [p for p in files if p not in metas]
    if len(reviews) > 1:
        prefixed = [p for p in reviews if p.name.startswith("reviews_")]
        reviews = prefixed if len(prefixed) == 1 else reviews
    if not reviews:
        raise ConfigError(f"no reviews file in {path} (expected reviews_*.json[.gz], <Cat>_5.json[.gz], "
                          "<Cat>.jsonl[.gz] or an MMRec <name>.inter)")
    if len(reviews) > 1:
        names = ", ".join(p.name for p in reviews)
        raise ConfigError(f"several reviews files in {path} ({names}); pass one with --reviews")
    review = reviews[0]
    meta = _matching_meta(review, metas, path)
    return SourceSpec(_name_from_file(review), fmt or _agree(review, meta), str(review), str(meta) if meta else None)


def _expect(fmt: str | None, found: str, path: Path) -> None:
    if fmt is not None and fmt != found:
        raise ConfigError(f"{path} is a {found} dataset, but format '{fmt}' was requested")


def _is_data_file(path: Path) -> bool:
    name = path.name.lower().removesuffix(".gz")
    return not name.startswith(".") and name.endswith((".json", ".jsonl"))


def _category_of(path: Path) -> str:
    """``reviews_Baby_5.json.gz`` / ``Baby_5.json`` / ``meta_Baby.jsonl.gz`` -> ``Baby``."""
    name = path.name
    for ext in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(ext)
    for prefix in ("reviews_", "meta_"):
        name = name.removeprefix(prefix)
    return name.removesuffix("_5")


def _name_from_file(path: Path) -> str:
    category = _category_of(path)
    preset = next((name for name, p in PRESETS.items() if category in p.categories.values()), None)
    return preset or _sanitise_name(category).lower()


def _matching_meta(review: Path, metas: list[Path], folder: Path) -> Path | None:
    if len(metas) <= 1:
        return metas[0] if metas else None
    same = [m for m in metas if _category_of(m) == _category_of(review)]
    if len(same) == 1:
        return same[0]
    names = ", ".join(p.name for p in metas)
    raise ConfigError(f"several meta files in {folder} ({names}) and none matches {review.name}; pass --meta")


def _agree(reviews: Path, meta: Path | None) -> str:
    """Format of a reviews file, confirmed by its meta file (2014 and 2018 reviews look alike; 2014 meta settles it)."""
    rev_fmt, rev_kind = _sniff_file(reviews)
    if rev_kind == "meta":
        raise ConfigError(f"{reviews} looks like a metadata file, not reviews")
    if meta is None:
        return rev_fmt
    meta_fmt, _ = _sniff_file(meta)
    if meta_fmt == rev_fmt:
        return rev_fmt
    if {meta_fmt, rev_fmt} == {"amazon2014", "amazon2018"}:
        return "amazon2014"
    raise ConfigError(f"reviews {reviews.name} look like {rev_fmt} but meta {meta.name} looks like {meta_fmt}")


def detect_format(path: Path | str) -> str:
    """Format of a raw Amazon file (gzip or plain) from its first good records, or of a folder as :func:`resolve_source`
    would resolve it; :class:`DataError` names the file and line when the content matches no known release."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"path does not exist: {path}")
    if path.is_dir():
        return _from_dir(path.resolve(), None).format
    return "mmrec" if path.suffix == ".inter" else _sniff_file(path)[0]


def _sniff_file(path: Path) -> tuple[str, str]:
    """(format, kind) most of the first ``SNIFF_RECORDS`` good records agree on, after up to ``SNIFF_BAD_LINES`` dirty
    lines; with no good record the first line's problem is the error, as it names what is wrong with the file."""
    votes: Counter[tuple[str, str]] = Counter()
    first_error: DataError | None = None
    bad = 0
    for lineno, line in iter_lines(path, DEFAULT_MAX_LINE_BYTES):
        if lineno > _SCAN_LINES + SNIFF_BAD_LINES:
            break
        try:
            if line is None:
                raise DataError(f"{path} line {lineno}: line too long (over {DEFAULT_MAX_LINE_BYTES} bytes)")
            text = line.strip()
            if not text:
                continue
            votes[_classify(text, path, lineno)] += 1
            if votes.total() >= SNIFF_RECORDS:
                break
        except DataError as err:
            first_error = first_error or err
            bad += 1
            if bad > SNIFF_BAD_LINES:
                break
    if votes:
        return votes.most_common(1)[0][0]  # ties: the first record seen
    if first_error is not None:
        raise first_error
    raise DataError(f"{path}: no record found (file is empty)")


def _classify(line: bytes, path: Path, lineno: int) -> tuple[str, str]:
    """(format, 'reviews' | 'meta') of one raw record line."""
    record: Any
    try:
        record, strict_json = orjson.loads(line), True
    except orjson.JSONDecodeError:
        try:
            record, strict_json = parse_literal_line(line), False  # 2014 meta lines are Python literals; never eval
        except DirtyLine as exc:
            shown = line[:60].decode("utf-8", errors="replace")
            raise DataError(f"{path} line {lineno}: neither JSON nor a Python literal ({exc.reason}): "
                            f"{shown!r}") from None
    if not isinstance(record, dict):
        raise DataError(f"{path} line {lineno}: expected one object per line, got {type(record).__name__}")
    claimed = formats.classify_keys(set(record), strict_json)
    if claimed is None:
        found = ", ".join(sorted(map(str, record))[:8])
        raise DataError(f"{path} line {lineno}: unknown record (no 'asin' or 'parent_asin' field; found {found})")
    return claimed
