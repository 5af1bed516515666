"""The bundled offline sample: a small synthetic dataset in the raw Amazon 2014 format. Why: ``sand run`` with no
argument must work offline, in seconds, and still show that content beats IDs when IDs are data-starved (~500 items seen
~20 times each). So it writes what a real 2014 download looks like, dirt included, and plants structure only content can
exploit: items have a colour and a shape (image; some colours also named in the text), a material and a type (text), and
each user mostly picks items with the two attribute values they like. One seeded ``numpy`` generator drawn in a fixed
order and gzip headers without time or name make the files byte-identical for the same seed and directory."""

from __future__ import annotations

import argparse
import gzip
import io
import itertools
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from sand.pipeline.base.errors import ConfigError
from sand.pipeline.base.files import atomic_path

REVIEWS_NAME = "reviews_Sample_5.json.gz"
META_NAME = "meta_Sample.json.gz"
IMAGES_DIR = "images"
# name -> (RGB, named in the text?). Named colours are shared by image and text; the others are only in the image.
COLOURS: dict[str, tuple[tuple[int, int, int], bool]] = {
    "red": ((215, 35, 35), True), "blue": ((35, 75, 215), True), "green": ((35, 160, 55), True),
    "yellow": ((235, 200, 25), True), "purple": ((135, 55, 185), False), "orange": ((245, 125, 20), False),
    "teal": ((20, 150, 150), False), "pink": ((240, 105, 180), False),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond")
MATERIALS = ("wooden", "organic cotton", "silicone", "bamboo", "recycled plastic")
# product type -> (title noun, category path)
TYPES: dict[str, tuple[str, list[str]]] = {
    "teether": ("Teether", ["Baby", "Health & Baby Care", "Teethers"]),
    "blanket": ("Blanket", ["Baby", "Nursery", "Blankets"]),
    "rattle": ("Rattle", ["Baby", "Baby & Toddler Toys", "Rattles"]),
    "bib": ("Bib", ["Baby", "Feeding", "Bibs"]), "cup": ("Sippy Cup", ["Baby", "Feeding", "Cups"]),
    "stacker": ("Stacking Toy", ["Baby", "Baby & Toddler Toys", "Stacking Toys"]),
}
KINDS = ("colour", "shape", "material", "type")
VALUES: dict[str, list[str]] = {k: list(v) for k, v in zip(KINDS, (COLOURS, SHAPES, MATERIALS, TYPES), strict=True)}
# Noise: words that carry no preference signal (must not name a colour or shape).
ADJECTIVES = ("Soft", "Classic", "Premium", "Little", "Happy", "Cozy", "Deluxe", "Everyday", "Travel", "Mini")
BRANDS = (
    "Tiny Sprout", "Nestling", "Pebble & Co", "Moonbeam", "Little Otter", "Cuddle Cove",
    "Snugglebug", "Acorn Kids", "Hushaby", "Bumble Baby", "Wiggle Works", "Dandelion",
)
DESC_EXTRA = (
    "Easy to clean and built to last.", "A thoughtful gift for new parents.", "Designed with busy families in mind.",
    "Free of BPA, phthalates and lead.", "Lightweight enough to take anywhere.", "Tested to meet safety standards.",
)
REVIEW_OPENERS = (
    "My little one loves this {noun}.", "We bought this {noun} for our daughter.", "Got this {noun} as a shower gift.",
    "Second {noun} we have bought from this brand.", "This {noun} arrived quickly.",
)
REVIEW_BY_RATING = {
    1: ("Broke within a week.", "Would not buy again."), 2: ("Smaller than expected.", "Not great for the price."),
    3: ("It is okay.", "Does the job, nothing special."), 4: ("Works well.", "Good quality overall."),
    5: ("Absolutely love it!", "Highly recommend it."),
}
SUMMARY_BY_RATING = {
    1: ("Disappointed", "Poor quality"), 2: ("Meh", "Could be better"), 3: ("Okay", "Average"),
    4: ("Nice", "Pretty good"), 5: ("Love it", "Perfect"),
}
FIRST_NAMES = ("Anna", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jon", "Kemi", "Liam")

_ALNUM = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
_DAY = 86400
_FIRST_DAY = int(datetime(2011, 1, 1, tzinfo=UTC).timestamp()) // _DAY
_LAST_START_DAY = int(datetime(2014, 1, 1, tzinfo=UTC).timestamp()) // _DAY
# How many dirty records of each kind are planted; dirty items are distinct across kinds, keyed as in ``truth``.
N_MALFORMED = 2
N_DUPLICATES = 3
N_DIRTY = {"items_without_meta": 2, "missing_image_files": 2, "empty_imurl": 2, "corrupt_images": 2}
_N_DIRTY_ITEMS = sum(N_DIRTY.values())

TASTE_WEIGHT = 2.5  # logit per liked attribute value an item has
TASTE_SHARE = 0.8  # share of a user's picks from the taste softmax (rest uniform)
POPULARITY_SD = 0.5  # sd of the item popularity logit


@dataclass(frozen=True)
class SampleFiles:
    """Where the sample was written, and the facts planted in it (JSON-serialisable)."""

    reviews: Path
    meta: Path
    images_dir: Path
    truth: dict[str, Any] = field(default_factory=dict)


def generate_sample(out_dir: Path, *, seed: int = 0, n_users: int = 1000, n_items: int = 500,
                    interactions_per_user: tuple[int, int] = (6, 16), image_size: int = 64) -> SampleFiles:
    """Write the sample into ``out_dir`` (``interactions_per_user`` is an inclusive range)."""
    _check_args(n_users, n_items, interactions_per_user, image_size)
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir).resolve()
    images_dir = out_dir / IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)
    asins = _unique_ids(rng, n_items, "B00", 7)
    users = _unique_ids(rng, n_users, "A", 13)
    attrs = _item_attributes(rng, n_items)
    popularity = rng.normal(0.0, POPULARITY_SD, n_items)
    tastes = _user_tastes(rng, n_users)
    picks = _sample_interactions(rng, attrs, popularity, tastes, interactions_per_user)
    order = iter(rng.permutation(n_items)[:_N_DIRTY_ITEMS].tolist())
    dirty = {key: sorted(itertools.islice(order, n)) for key, n in N_DIRTY.items()}
    no_meta, missing_file, empty_url, corrupt = dirty.values()
    records = _review_records(rng, users, asins, attrs, tastes, picks)
    lines, duplicates, malformed = _review_lines(rng, records)
    _write_gz(out_dir / REVIEWS_NAME, lines)

    meta_lines = []
    for i in np.argsort(asins, kind="stable").tolist():
        if i in no_meta:
            continue
        image_path = images_dir / f"{asins[i]}.png"
        im_url = "" if i in empty_url else image_path.as_uri()
        if i in missing_file:
            image_path.unlink(missing_ok=True)
        elif i in corrupt:
            image_path.write_bytes(_corrupt_bytes(rng))
        elif i not in empty_url:
            image_path.write_bytes(_draw_image(rng, attrs[i], image_size))
        meta_lines.append(repr(_meta_record(rng, asins[i], attrs[i], popularity[i], im_url)))
    _write_gz(out_dir / META_NAME, meta_lines)

    truth = {
        "seed": seed, "n_users": n_users, "n_items": n_items,
        "n_interactions": int(sum(len(p) for p in picks)), "n_review_lines": len(lines),
        "malformed_review_lines": malformed, "duplicate_reviews": duplicates,
        **{key: sorted(asins[i] for i in items) for key, items in dirty.items()},
        "named_colours": [c for c, (_, named) in COLOURS.items() if named],
        "item_attributes": {asins[i]: dict(attrs[i]) for i in range(n_items)},
        "user_tastes": {users[u]: [list(t) for t in tastes[u]] for u in range(n_users)},
    }
    return SampleFiles(out_dir / REVIEWS_NAME, out_dir / META_NAME, images_dir, truth)


def _check_args(n_users: int, n_items: int, per_user: tuple[int, int], image_size: int) -> None:
    if n_users < 1:
        raise ConfigError(f"sample: n_users must be >= 1, got {n_users}")
    if n_items < _N_DIRTY_ITEMS + 1:
        raise ConfigError(f"sample: n_items must be >= {_N_DIRTY_ITEMS + 1}, got {n_items}")
    if not 1 <= per_user[0] <= per_user[1] <= n_items:
        raise ConfigError(f"sample: interactions_per_user needs 1 <= lo <= hi <= n_items, got {per_user}")
    if image_size < 16:
        raise ConfigError(f"sample: image_size must be >= 16, got {image_size}")


def _unique_ids(rng: np.random.Generator, n: int, prefix: str, length: int) -> list[str]:
    """Random Amazon-looking IDs, unique, in draw order."""
    out: dict[str, None] = {}
    while len(out) < n:
        for chars in rng.choice(_ALNUM, size=(n - len(out), length)):
            out.setdefault(prefix + "".join(chars))
    return list(out)


def _item_attributes(rng: np.random.Generator, n_items: int) -> list[dict[str, Any]]:
    draws = {k: rng.integers(0, len(VALUES[k]), n_items) for k in KINDS}
    attrs = [{k: VALUES[k][int(draws[k][i])] for k in KINDS} for i in range(n_items)]
    return [{**a, "colour_in_text": COLOURS[a["colour"]][1]} for a in attrs]


def _user_tastes(rng: np.random.Generator, n_users: int) -> list[list[tuple[str, str]]]:
    out = []
    for _ in range(n_users):
        kinds = [KINDS[k] for k in rng.choice(len(KINDS), size=2, replace=False)]
        out.append([(k, VALUES[k][int(rng.integers(len(VALUES[k])))]) for k in kinds])
    return out


def _sample_interactions(rng: np.random.Generator, attrs: list[dict[str, Any]], popularity: np.ndarray,
                         tastes: list[list[tuple[str, str]]], per_user: tuple[int, int]) -> list[np.ndarray]:
    """Distinct item indices per user from TASTE_SHARE * softmax(affinity) + rest * uniform."""
    n_items = len(attrs)
    columns = {k: np.array([a[k] for a in attrs]) for k in KINDS}
    uniform = np.full(n_items, 1.0 / n_items)
    out = []
    for liked in tastes:
        matches = sum((columns[k] == v).astype(np.float64) for k, v in liked)
        logits = TASTE_WEIGHT * matches + popularity
        taste = np.exp(logits - logits.max())
        p = TASTE_SHARE * taste / taste.sum() + (1.0 - TASTE_SHARE) * uniform
        k = int(rng.integers(per_user[0], per_user[1] + 1))
        out.append(rng.choice(n_items, size=k, replace=False, p=p / p.sum()))
    return out


def _review_records(rng: np.random.Generator, users: list[str], asins: list[str], attrs: list[dict[str, Any]],
                    tastes: list[list[tuple[str, str]]], picks: list[np.ndarray]) -> list[dict[str, Any]]:
    records = []
    for u, items in enumerate(picks):
        name = f"{FIRST_NAMES[int(rng.integers(len(FIRST_NAMES)))]} {chr(65 + int(rng.integers(26)))}."
        day = int(rng.integers(_FIRST_DAY, _LAST_START_DAY))
        for i in items.tolist():
            day += int(rng.integers(1, 45))
            liked = sum(attrs[i][k] == v for k, v in tastes[u])
            rating = int(np.clip(round(3.3 + 0.6 * liked + rng.normal(0, 0.9)), 1, 5))
            records.append(_review(rng, users[u], name, asins[i], attrs[i], rating, day))
    return records


def _review(rng: np.random.Generator, user: str, name: str, asin: str, attr: dict[str, Any], rating: int,
            day: int) -> dict[str, Any]:
    noun = TYPES[attr["type"]][0].lower()
    opener = REVIEW_OPENERS[int(rng.integers(len(REVIEW_OPENERS)))].format(noun=noun)
    comment = REVIEW_BY_RATING[rating][int(rng.integers(2))]
    ts = day * _DAY
    return {
        "reviewerID": user, "asin": asin, "reviewerName": name, "helpful": [0, 0], "reviewText": f"{opener} {comment}",
        "overall": float(rating), "summary": SUMMARY_BY_RATING[rating][int(rng.integers(2))], "unixReviewTime": ts,
        "reviewTime": datetime.fromtimestamp(ts, tz=UTC).strftime("%m %d, %Y"),
    }


def _review_lines(rng: np.random.Generator,
                  records: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]], list[int]]:
    """JSON lines sorted by (asin, time, reviewer), plus planted duplicates and malformed lines."""
    records = list(records)
    duplicates = []
    for j in sorted(rng.choice(len(records), size=min(N_DUPLICATES, len(records)), replace=False).tolist()):
        dup = dict(records[j])
        dup["unixReviewTime"] = records[j]["unixReviewTime"] + _DAY * int(rng.integers(1, 60))
        dup["reviewTime"] = datetime.fromtimestamp(dup["unixReviewTime"], tz=UTC).strftime("%m %d, %Y")
        records.append(dup)
        times = [records[j]["unixReviewTime"], dup["unixReviewTime"]]
        duplicates.append({"reviewerID": dup["reviewerID"], "asin": dup["asin"], "unixReviewTime": times})
    records.sort(key=lambda r: (r["asin"], r["unixReviewTime"], r["reviewerID"]))
    lines = [json.dumps(r) for r in records]
    # A malformed line looks like a line cut off mid-write: a truncated copy of a real one (never valid JSON).
    positions = sorted(rng.choice(len(lines) + 1, size=N_MALFORMED, replace=False).tolist())
    for pos in reversed(positions):
        src = lines[int(rng.integers(len(lines)))]
        lines.insert(pos, src[: len(src) // 2])
    # 1-based; inserting from the back moves each line down by the insertions before it
    return lines, duplicates, [pos + k + 1 for k, pos in enumerate(positions)]


def _meta_record(rng: np.random.Generator, asin: str, attr: dict[str, Any], popularity: float,
                 im_url: str) -> dict[str, Any]:
    noun, path = TYPES[attr["type"]]
    material = attr["material"]
    colour = attr["colour"] if attr["colour_in_text"] else ""
    adjective = ADJECTIVES[int(rng.integers(len(ADJECTIVES)))]
    brand = BRANDS[int(rng.integers(len(BRANDS)))]
    words = [colour.title(), material.title(), adjective, noun]
    title = " ".join(w for w in words if w) + f" - {brand}"
    made = f"A {adjective.lower()} {noun.lower()} made from {material}"
    made += f" in {colour}." if colour else "."
    description = f"{made} {DESC_EXTRA[int(rng.integers(len(DESC_EXTRA)))]}"
    # Popular items get a better (smaller) sales rank, as in the real data.
    rank = int(max(1, round(np.exp(10.0 - 1.5 * popularity + rng.normal(0, 0.3)))))
    return {
        "asin": asin, "title": title, "imUrl": im_url, "brand": brand, "categories": [list(path)],
        "description": description, "price": round(float(rng.uniform(4.0, 60.0)), 2), "salesRank": {"Baby": rank},
    }


def _draw_image(rng: np.random.Generator, attr: dict[str, Any], size: int) -> bytes:
    pixels = np.clip(rng.integers(232, 250) + rng.integers(-6, 7, size=(size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)  # H x W x 3 uint8 -> RGB
    rgb = np.array(COLOURS[attr["colour"]][0]) + rng.integers(-10, 11, size=3)
    fill = tuple(int(c) for c in np.clip(rgb, 0, 255))
    radius = size * rng.uniform(0.26, 0.36)
    cx, cy = size / 2 + rng.uniform(-0.08, 0.08, size=2) * size
    draw = ImageDraw.Draw(img)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if attr["shape"] == "circle":
        draw.ellipse(box, fill=fill)
    elif attr["shape"] == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon(_polygon(attr["shape"], cx, cy, radius), fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        angles, radii = np.deg2rad([-90, 30, 150]), [r] * 3
    elif shape == "diamond":  # taller than wide, so it is not a rotated square
        angles, radii = np.deg2rad([-90, 0, 90, 180]), [r, r * 0.65, r, r * 0.65]
    else:  # star: alternating outer and inner radius
        angles = np.deg2rad(-90 + 36 * np.arange(10))
        radii = [r if k % 2 == 0 else r * 0.45 for k in range(10)]
    return [(cx + rr * np.cos(a), cy + rr * np.sin(a)) for a, rr in zip(angles, radii, strict=True)]


def _corrupt_bytes(rng: np.random.Generator) -> bytes:
    """Bytes that no image decoder accepts (an HTML error page, as dead hosts return)."""
    return b"<html><body>404 Not Found</body></html>\n" + rng.bytes(16).hex().encode()


def _write_gz(path: Path, lines: list[str]) -> None:
    """Gzip with no name or time in the header, written beside and renamed, so reruns are byte-identical."""
    with atomic_path(path) as tmp, open(tmp, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            gz.write(("\n".join(lines) + "\n").encode("utf-8"))


def write_user_share(generated: Path, out_dir: Path, share: float) -> set[str]:
    """Write the reviews of a generated sample's first ``share`` of users (file order) to ``out_dir``; returns them.
    Why: a growing dataset is what scheduled retraining sees; two shares of one sample are two snapshots, the larger
    holding the smaller."""
    if not 0 < share <= 1:
        raise ConfigError(f"invalid share {share}: must be in (0, 1]")
    lines = gzip.decompress((Path(generated) / REVIEWS_NAME).read_bytes()).decode().splitlines()
    owners = []
    for line in lines:
        try:
            owners.append(json.loads(line)["reviewerID"])
        except (ValueError, KeyError, TypeError):
            owners.append(None)  # a planted malformed line: kept with the full sample only
    order = list(dict.fromkeys(user for user in owners if user is not None))
    keep = set(order[: int(len(order) * share)])
    kept = lines if share == 1 else [ln for ln, user in zip(lines, owners, strict=True) if user in keep]
    out_dir = Path(out_dir)
    _write_gz(out_dir / REVIEWS_NAME, kept)
    with atomic_path(out_dir / META_NAME) as tmp:
        tmp.write_bytes((Path(generated) / META_NAME).read_bytes())
    return keep


def main(argv: list[str] | None = None) -> None:
    """``python -m sand.pipeline.acquire.bundled_sample OUT [--seed N]``: write the sample, print the planted dirt."""
    parser = argparse.ArgumentParser(prog="python -m sand.pipeline.acquire.bundled_sample", description=main.__doc__)
    parser.add_argument("out_dir", type=Path)
    for flag, default in (("--seed", 0), ("--users", 1000), ("--items", 500)):
        parser.add_argument(flag, type=int, default=default)
    args = parser.parse_args(argv)
    files = generate_sample(args.out_dir, seed=args.seed, n_users=args.users, n_items=args.items)
    t = files.truth
    print(f"reviews: {files.reviews} ({t['n_review_lines']} lines, {t['n_interactions']} interactions)")
    print(f"meta:    {files.meta}")
    print(f"images:  {files.images_dir}")
    for key in ("malformed_review_lines", "items_without_meta", "missing_image_files", "empty_imurl", "corrupt_images"):
        print(f"{key}: {t[key]}")
    print(f"duplicate_reviews: {[(d['reviewerID'], d['asin']) for d in t['duplicate_reviews']]}")


if __name__ == "__main__":
    main()

