"""CNN construction/encoding and the shard -> matrix assembly of image features."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sand.pipeline.acquire.url_policy import UrlPolicy
from sand.pipeline.base.config import load_config
from sand.pipeline.base.errors import ConfigError, DataError
from sand.pipeline.features.image_encoder import build_cnn, encode_images
from sand.pipeline.features.image_shards import (
    ShardResult,
    assemble_features,
    load_shard,
    process_shard,
    save_shard,
    shard_items,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The CI box is shared; one intra-op thread keeps these tests predictable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Four distinct small images of different sizes and modes."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    out = []
    for i, (size, mode) in enumerate([((64, 48), "RGB"), ((40, 90), "L"), ((70, 70), "RGBA"), ((50, 50), "RGB")]):
        arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        img = Image.fromarray(arr, "RGB").convert(mode)
        path = root / f"img{i}.png"
        img.save(path)
        out.append(path)
    return out


@pytest.mark.parametrize(
    ("backbone", "size", "dim"), [("resnet18", 64, 512), ("resnet50", 64, 2048), ("vgg16", 32, 4096)]
)
def test_output_shape_per_backbone(images, backbone, size, dim):
    model, out_dim, desc = build_cnn(backbone, "random", seed=0)
    feats = encode_images(images[:2], model, image_size=size, batch_size=2, device="cpu", progress=False)
    assert out_dim == dim and feats.shape == (2, dim) and feats.dtype == np.float32
    assert np.isfinite(feats).all() and "seed 0" in desc
    assert not any(p.requires_grad for p in model.parameters())


def test_random_weights_are_deterministic_per_seed(images):
    state = torch.random.get_rng_state()
    kw = dict(image_size=32, batch_size=4, device="cpu", progress=False)
    a = encode_images(images, build_cnn("resnet18", "random", seed=7)[0], **kw)
    b = encode_images(images, build_cnn("resnet18", "random", seed=7)[0], **kw)
    c = encode_images(images, build_cnn("resnet18", "random", seed=8)[0], **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert torch.equal(torch.random.get_rng_state(), state)  # caller's RNG untouched


def test_rows_follow_input_order_and_batching(images):
    model = build_cnn("resnet18", "random", seed=1)[0]
    kw = dict(image_size=32, device="cpu", progress=False)
    fwd = encode_images(images, model, batch_size=3, **kw)
    rev = encode_images(images[::-1], model, batch_size=1, **kw)
    np.testing.assert_allclose(fwd, rev[::-1], rtol=1e-4, atol=1e-5)
    assert encode_images([], model, **kw).shape == (0, 512)


def test_batched_normalisation_gives_torchvision_per_image_bits(images, tmp_path):
    """Decode hands over uint8 pixels and a batch is normalised at once: the bits of torchvision's per-image
    ToTensor + Normalize, so no cached vector of the per-image recipe changes meaning."""
    from torchvision import transforms

    from sand.pipeline.features.image_encoder import IMAGENET_MEAN, IMAGENET_STD, ImageFileDataset, normalize_pixels
    from sand.pipeline.features.image_fetch import decoded_rgb

    wide = tmp_path / "wide.jpg"  # a JPEG large enough to decode at a reduced scale
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 700, 3), dtype=np.uint8)).save(wide, quality=90)
    paths, size = [*images, wide], 64
    dataset = ImageFileDataset(paths, size)
    reference = transforms.Compose([transforms.Resize(round(256 * size / 224), antialias=True),
                                    transforms.CenterCrop(size), transforms.ToTensor(),
                                    transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    expected = []
    for path in paths:
        with decoded_rgb(path.read_bytes(), draft_to=dataset.draft_to) as img:
            expected.append(reference(img))
    pixels = [dataset.decode(p) for p in paths]
    assert all(p.dtype == torch.uint8 and p.shape == (3, size, size) for p in pixels)
    assert torch.equal(normalize_pixels(torch.stack(pixels)), torch.stack(expected))
    assert torch.equal(dataset[len(paths) - 1], expected[-1])


def test_a_cpu_decodes_each_batch_on_every_core_between_forward_passes(images, monkeypatch):
    """Without decode threads beside the forward (a CPU's default), a batch's images are decoded on several threads,
    and never while a forward pass runs (it uses every core): the rows are those of one-at-a-time decoding."""
    import threading
    import time

    from sand.pipeline.features import image_encoder

    spans: list[tuple[str, float, float, str]] = []
    decode, call = image_encoder.ImageFileDataset.decode, image_encoder.Encoder.__call__

    def timed(kind, fn):
        def wrapper(*args):
            start = time.perf_counter()
            out = fn(*args)
            if kind == "decode":
                time.sleep(0.02)  # long enough that one thread cannot take a whole batch
            spans.append((kind, start, time.perf_counter(), threading.current_thread().name))
            return out
        return wrapper

    model = build_cnn("resnet18", "random", seed=1)[0]
    kw = dict(image_size=32, batch_size=4, device="cpu", progress=False)
    one_by_one = encode_images(images * 2, model, num_workers=0, **dict(kw, batch_size=1))
    monkeypatch.setattr(image_encoder.os, "cpu_count", lambda: 3)
    monkeypatch.setattr(image_encoder.ImageFileDataset, "decode", timed("decode", decode))
    monkeypatch.setattr(image_encoder.Encoder, "__call__", timed("forward", call))
    feats = encode_images(images * 2, model, **kw)
    np.testing.assert_allclose(feats, one_by_one, rtol=1e-4, atol=1e-5)
    decodes = [s for s in spans if s[0] == "decode"]
    forwards = [s for s in spans if s[0] == "forward"]
    assert len(decodes) == 8 and len({s[3] for s in decodes}) >= 2
    assert not [(d, f) for d in decodes for f in forwards if d[1] < f[2] and f[1] < d[2]]


def test_weights_from_local_state_dict_equal_the_saved_model(images, tmp_path):
    saved, _, _ = build_cnn("resnet18", "random", seed=3)
    path = tmp_path / "trunk.pt"
    torch.save(saved.state_dict(), path)
    loaded, dim, desc = build_cnn("resnet18", path, seed=99)
    assert str(path) in desc and dim == 512
    for (k1, v1), (k2, v2) in zip(saved.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)
    kw = dict(image_size=32, batch_size=4, device="cpu", progress=False)
    np.testing.assert_array_equal(encode_images(images, saved, **kw), encode_images(images, loaded, **kw))


def test_full_torchvision_checkpoint_with_classifier_loads(tmp_path):
    import torchvision

    torch.manual_seed(0)
    full = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18-full.pth"
    torch.save({"state_dict": full.state_dict()}, path)
    loaded = build_cnn("resnet18", path)[0]
    assert torch.equal(loaded.state_dict()["conv1.weight"], full.state_dict()["conv1.weight"])


def _assert_one_line(err: pytest.ExceptionInfo, *needles: str) -> None:
    text = str(err.value)
    assert "\n" not in text
    for needle in needles:
        assert needle in text


def test_missing_weights_file_is_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError) as err:
        build_cnn("resnet18", tmp_path / "nope.pt")
    _assert_one_line(err, "nope.pt", "does not exist")


def test_garbage_weights_file_is_one_line_config_error(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a checkpoint\n" * 10)
    with pytest.raises(ConfigError) as err:
        build_cnn("resnet18", path)
    _assert_one_line(err, "garbage.pth")


def test_weights_of_another_architecture_name_the_file(tmp_path):
    path = tmp_path / "r18.pt"
    torch.save(build_cnn("resnet18", "random")[0].state_dict(), path)
    with pytest.raises(ConfigError) as err:
        build_cnn("resnet50", path)
    _assert_one_line(err, "r18.pt", "resnet50")


def test_unknown_backbone_is_config_error():
    with pytest.raises(ConfigError) as err:
        build_cnn("alexnet", "random")
    _assert_one_line(err, "alexnet", "resnet50")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unobtainable_imagenet_weights_say_how_to_provide_them(tmp_path, monkeypatch):
    # The internet is faked as unreachable: an empty hub cache and a proxy that refuses connections.
    proxy = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, proxy)
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError) as err:
        build_cnn("resnet18", "imagenet")
    _assert_one_line(err, "--image-weights PATH", "random", "resnet18")


# --------------------------------------------------------------------------- shards


def test_shard_items_covers_everything_once():
    assert shard_items(10, 4) == [range(0, 4), range(4, 8), range(8, 10)]
    assert shard_items(0, 4) == []
    with pytest.raises(ConfigError, match="image_features.shard_size=0"):  # the stage never sees 0
        load_config(None, None, ["image_features.shard_size=0"])


def test_process_shard_encodes_usable_and_lists_missing(images, tmp_path):
    urls = [images[0].as_uri(), "", (tmp_path / "gone.png").as_uri(), str(images[3])]
    enc = dict(
        backbone="resnet18",
        weights="random",
        seed=0,
        image_size=32,
        batch_size=2,
        device="cpu",
        progress=False,
    )
    local = {"progress": False, "policy": UrlPolicy.for_origin("local")}
    res = process_shard([10, 11, 12, 13], urls, tmp_path / "cache", local, enc)
    assert res.item_ids.tolist() == [10, 13] and res.features.shape == (2, 512) and res.dim == 512
    assert res.missing == [(11, "", "empty-url"), (12, urls[2], "file-not-found")]
    model = build_cnn("resnet18", "random", seed=0)[0]
    expected = encode_images([images[0], images[3]], model, image_size=32, device="cpu", progress=False)
    np.testing.assert_allclose(res.features, expected, rtol=1e-5, atol=1e-6)

    path = tmp_path / "shards" / "shard-0001.npz"
    save_shard(res, path)
    back = load_shard(path)
    np.testing.assert_array_equal(back.item_ids, res.item_ids)
    np.testing.assert_array_equal(back.features, res.features)
    assert back.missing == res.missing and back.weights == res.weights
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


def test_shards_of_one_process_load_the_cnn_file_once_and_a_rebuilt_file_again(images, tmp_path, monkeypatch):
    """A large category has hundreds of shards, each of which used to load and hash the same CNN file."""
    from sand.pipeline.features import image_encoder
    from sand.pipeline.features.image_encoder import save_cnn

    cnn = tmp_path / "cnn.pt"
    save_cnn(build_cnn("resnet18", "random", seed=0)[0], cnn)
    real, loads = image_encoder.build_cnn, []
    monkeypatch.setattr(image_encoder, "build_cnn", lambda *a, **k: loads.append(k) or real(*a, **k))
    local = {"progress": False, "policy": UrlPolicy.for_origin("local")}
    enc = dict(backbone="resnet18", weights=str(cnn), image_size=32, batch_size=2, device="cpu")

    def shard(path: Path, **settings):
        return process_shard([0], [path.as_uri()], tmp_path / "bytes", local, {**enc, **settings})

    shard(images[0], engine="fast", precision="bf16")
    shard(images[3], engine="fast", precision="bf16")
    eager = shard(images[0], engine="eager", precision="fp32")
    assert len(loads) == 1
    # the fast bf16 encoder converted a copy: eager features from the shared module are those of a fresh load
    expected = encode_images([images[0]], real("resnet18", cnn)[0], image_size=32, batch_size=2, device="cpu",
                             progress=False)
    np.testing.assert_allclose(eager.features, expected, rtol=1e-5, atol=1e-6)

    save_cnn(build_cnn("resnet18", "random", seed=1)[0], cnn)  # the stage rebuilt its CNN file
    assert not np.allclose(shard(images[0], engine="eager", precision="fp32").features, eager.features)
    assert len(loads) == 2


def test_process_shard_without_usable_images_builds_nothing(tmp_path):
    res = process_shard(
        [0, 1],
        ["", ""],
        tmp_path,
        {"progress": False},
        {"backbone": "vgg16", "weights": tmp_path / "never-read.pt"},
    )
    assert res.features.shape == (0, 4096) and [m[2] for m in res.missing] == ["empty-url", "empty-url"]


def test_load_shard_rejects_a_foreign_file(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, a=np.arange(3))
    with pytest.raises(DataError, match="x.npz"):
        load_shard(path)


def _shards() -> list[ShardResult]:
    s1 = ShardResult(np.array([0, 2]), np.array([[1.0, 2.0], [3.0, 6.0]], np.float32), [(1, "u1", "http-404")])
    s2 = ShardResult(np.array([4]), np.array([[5.0, 1.0]], np.float32), [(3, "", "empty-url")])
    return [s2, s1]


def test_assemble_mean_fill():
    feat, missing = assemble_features(5, _shards(), dim=2, fill="mean")
    assert feat.dtype == np.float32 and feat.shape == (5, 2)
    np.testing.assert_allclose(feat[[0, 2, 4]], [[1, 2], [3, 6], [5, 1]])
    np.testing.assert_allclose(feat[1], [3.0, 3.0])
    np.testing.assert_allclose(feat[3], [3.0, 3.0])
    assert missing.to_dict("list") == {"item": [1, 3], "url": ["u1", ""], "reason": ["http-404", "empty-url"]}


def test_assemble_zeros_fill():
    feat, missing = assemble_features(5, _shards(), dim=2, fill="zeros")
    np.testing.assert_array_equal(feat[[1, 3]], np.zeros((2, 2)))
    np.testing.assert_allclose(feat[4], [5, 1])
    assert missing["item"].tolist() == [1, 3]


def test_assemble_without_any_usable_image_is_data_error():
    shard = ShardResult(
        np.zeros(0, np.int64), np.zeros((0, 2), np.float32), [(0, "", "empty-url"), (1, "x", "http-404")]
    )
    with pytest.raises(DataError, match="no item has a usable image"):
        assemble_features(2, [shard], dim=2)


def test_assemble_rejects_gaps_overlaps_and_wrong_dims():
    s1, s2 = _shards()[1], _shards()[0]
    with pytest.raises(DataError, match="cover 3 of 5"):
        assemble_features(5, [s1], dim=2)
    with pytest.raises(DataError, match="more than once"):
        assemble_features(5, [s1, s2, s1], dim=2)
    with pytest.raises(DataError, match="shape"):
        assemble_features(5, [s1, s2], dim=3)
    with pytest.raises(ConfigError, match="image_features.fill='median'"):  # the stage never sees it
        load_config(None, None, ["image_features.fill=median"])
