"""Turn item images into CNN feature vectors with a torchvision backbone.

``vgg16`` reproduces MMRec's published Amazon image features (4096-d fc7); ``resnet50``/``resnet18`` give cheaper
pooled features. Pretrained weights cannot be downloaded everywhere, so a local ``state_dict`` file and seeded random
weights are first-class options; a failure to get weights is a one-line :class:`ConfigError` saying what to pass.

Determinism: no global RNG (architectures are built on the ``meta`` device, then filled from a state_dict or a private
seeded generator, so building a CNN cannot race another thread or deadlock a forked child), and every CNN call sees the
same batch shape, so a row's features depend neither on the thread nor on its batch-mates.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import logging
import os
import platform
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from sand.pipeline.base.devices import resolve_device
from sand.pipeline.base.errors import ConfigError, DataError, one_line
from sand.pipeline.base.files import sha256_file
from sand.pipeline.base.torch_files import load_tensors, save_tensors
from sand.pipeline.features.image_fetch import MAX_PIXELS, TooManyPixels, decoded_rgb, read_regular_file
from sand.pipeline.features.text import torch_threads

# torchvision: imported inside the functions that use them, so importing this module (and `sand --help`) stays fast.

log = logging.getLogger(__name__)

BACKBONES = ("resnet50", "resnet18", "vgg16")
#: How the CNN runs (see :class:`Encoder`).
ENGINES = ("eager", "fast")
#: Bumped whenever decoding or preprocessing changes what a pixel tensor holds: part of the per-item cache identity,
#: so cached vectors of the old recipe are never served.
PREPROCESS_VERSION = 1
OUT_DIMS = {"resnet50": 2048, "resnet18": 512, "vgg16": 4096}
#: Pretrained weights per backbone (the torchvision enum member names).
IMAGENET_WEIGHTS = {
    "resnet50": ("ResNet50_Weights", "IMAGENET1K_V2"), "resnet18": ("ResNet18_Weights", "IMAGENET1K_V1"),
    "vgg16": ("VGG16_Weights", "IMAGENET1K_V1"),
}
#: Classifier parameters that the feature extractor drops (allowed to be absent or present in a file).
_HEAD_KEYS = {"resnet50": ("fc.weight", "fc.bias"), "resnet18": ("fc.weight", "fc.bias"),
              "vgg16": ("classifier.6.weight", "classifier.6.bias")}
#: One CNN forward at a time per process on a CPU. Why: image shards run side by side in the threads runner (so their
#: downloads overlap), and each forward already uses every core through torch's intra-op threads; two at once only
#: thrash OpenMP teams. The gate orders nothing that reaches the output: each batch's rows are computed alone.
_CPU_FORWARD_GATE = threading.Lock()

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _architecture(backbone: str) -> nn.Module:
    """The torchvision module with no storage yet (``meta``): its own init would draw global random numbers."""
    import torchvision

    with torch.device("meta"):
        return getattr(torchvision.models, backbone)(weights=None)


def _random_init(model: nn.Module, seed: int) -> nn.Module:
    """Materialise ``model`` on the CPU with torchvision's init schemes (kaiming-normal fan_out convolutions, unit/zero
    batch norms, N(0, 0.01) linear layers), drawn from a private generator: reproducible from ``seed`` alone."""
    gen = torch.Generator().manual_seed(int(seed))
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu", generator=gen)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                module.reset_running_stats()
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01, generator=gen)
            elif any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(False)):
                raise ConfigError(f"random init does not know how to initialise {name} ({type(module).__name__})")
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                nn.init.zeros_(bias)
    return model


def _strip_head(backbone: str, model: nn.Module) -> nn.Module:
    """Cut the ImageNet classifier: resnet -> pooled features, vgg16 -> fc7 after its ReLU."""
    if backbone.startswith("resnet"):
        model.fc = nn.Identity()
    else:
        # classifier = [fc6, ReLU, Dropout, fc7, ReLU, Dropout, fc8]; keep up to the second ReLU.
        # Slicing keeps the original indices ("classifier.0", "classifier.3") in the state_dict.
        model.classifier = model.classifier[:5]
    return model


def _imagenet_state_dict(backbone: str) -> tuple[dict[str, torch.Tensor], str]:
    import torchvision

    enum_name, member = IMAGENET_WEIGHTS[backbone]
    weights = getattr(getattr(torchvision.models, enum_name), member)
    try:
        state = weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"image weights 'imagenet' for {backbone}: cannot obtain {weights.url} ({one_line(exc)}); "
            f"download that file elsewhere and pass --image-weights PATH (or copy it into "
            f"{torch.hub.get_dir()}/checkpoints), or use --image-weights random"
        ) from None
    return state, f"torchvision {enum_name}.{member}"


def _file_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"image weights file {path} does not exist; pass a .pt/.pth state_dict, 'imagenet' "
                          "or 'random'")
    try:
        state = load_tensors(path)
    except Exception as exc:  # torch raises many types for non-checkpoint files
        raise ConfigError(f"image weights file {path} is not a readable state_dict: {one_line(exc)}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"image weights file {path} does not hold a state_dict (name -> tensor)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], backbone: str, source: str) -> None:
    """Load a backbone state_dict, with or without its classifier head, or fail naming the source."""
    state = {k: v for k, v in state.items() if k not in _HEAD_KEYS[backbone]}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misfit = f"image weights {source} do not fit {backbone}"
    if missing or unexpected:
        raise ConfigError(f"{misfit}: {len(missing)} missing keys (e.g. {missing[:2]}), "
                          f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise ConfigError(f"{misfit}: shape of {bad[0]} is {tuple(state[bad[0]].shape)}, "
                          f"expected {tuple(expected[bad[0]].shape)}")
    model.load_state_dict(state, strict=True, assign=True)


def build_cnn(backbone: str, weights: str | Path, seed: int = 0) -> tuple[nn.Module, int, str]:
    """A feature extractor in eval mode, its output dimension and a description of its weights. ``weights``:
    ``"imagenet"`` (via the torch hub cache), ``"random"`` (seeded by ``seed``) or a ``.pt``/``.pth`` state_dict path
    (a full torchvision checkpoint or one saved from the module returned here)."""
    if backbone not in BACKBONES:
        raise ConfigError(f"image backbone {backbone!r} is not one of {', '.join(BACKBONES)}")
    model = _strip_head(backbone, _architecture(backbone))
    if str(weights) == "random":
        model = _random_init(model, seed)
        description = f"random init (seed {seed})"
    elif str(weights) == "imagenet":
        state, description = _imagenet_state_dict(backbone)
        _load_into(model, state, backbone, description)
    else:
        path = Path(weights).expanduser()
        _load_into(model, _file_state_dict(path), backbone, f"file {path}")
        # The content hash makes the description (and so any cache key built from it) change with the file.
        description = f"state_dict {path} (sha256 {sha256_file(path)[:16]})"
    model.eval().requires_grad_(False)
    log.debug("image CNN %s, weights: %s", backbone, description)
    return model, OUT_DIMS[backbone], description


def image_transform(image_size: int = 224):
    """ImageNet evaluation preprocessing scaled to ``image_size`` (256/224 resize, centre crop) up to uint8 pixels;
    :func:`normalize_pixels` finishes it for a whole batch."""
    from torchvision import transforms

    resize = round(256 * image_size / 224)
    return transforms.Compose([transforms.Resize(resize, antialias=True), transforms.CenterCrop(image_size),
                               transforms.PILToTensor()])


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 ``(n, 3, h, w)`` pixels as float32 in ImageNet's normalisation: the arithmetic of torchvision's
    ``ToTensor`` and ``Normalize`` (divide by 255, subtract the mean, divide by the std), so the bits are theirs. Why
    per batch: one vectorised pass instead of four small ones per image, and decode threads hand over a quarter of
    the bytes."""
    from torchvision.transforms import functional

    return functional.normalize(pixels.to(torch.float32).div_(255), IMAGENET_MEAN, IMAGENET_STD, inplace=True)


def save_cnn(model: nn.Module, path: Path) -> Path:
    """Save ``model``'s state_dict atomically: the one CNN definition every shard of a stage loads."""
    save_tensors(model.state_dict(), path)
    return Path(path)


class ImageFileDataset(Dataset):
    """Images by path, decoded upright in RGB within the byte and pixel limits. JPEGs decode at a reduced scale that
    still covers the resize target (``draft``); decoding holds the pixel budget until the image is a small tensor.
    Items are normalised ``(3, size, size)`` tensors; :meth:`decode` gives the uint8 pixels a batch is made of."""

    def __init__(self, paths: Sequence[Path], image_size: int, *, max_bytes: int = 10_000_000,
                 max_pixels: int = MAX_PIXELS) -> None:
        self.paths = [Path(p) for p in paths]
        self.transform = image_transform(image_size)
        self.draft_to = round(256 * image_size / 224)
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return normalize_pixels(self.decode(self.paths[i])[None])[0]

    def decode(self, path: Path) -> torch.Tensor:
        """One image file as uint8 ``(3, size, size)`` pixels, or a one-line :class:`DataError`."""
        reason, data = read_regular_file(path, self.max_bytes)
        if reason is not None or data is None:
            raise DataError(f"{path}: image cannot be read ({reason}); delete it to refetch")
        try:
            with decoded_rgb(data, max_pixels=self.max_pixels, draft_to=self.draft_to) as img:
                return self.transform(img)
        except (OSError, SyntaxError, ValueError, TooManyPixels) as exc:
            raise DataError(f"{path}: image cannot be decoded ({one_line(exc)}); delete it to refetch") from None


def onednn_graph_available() -> bool:
    """Whether this torch can fuse a frozen graph with oneDNN Graph: its x86 CPU builds (fp32 and bf16)."""
    return platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()


@contextmanager
def _onednn_fusion(on: bool) -> Iterator[None]:
    """oneDNN Graph fusion switched on for one forward, then back as it was. Why per call: the switch is process-wide
    and read when the graph executor optimises a graph (its first calls), so it is held only inside the forward gate,
    where no other graph runs; eager modules and other TorchScript in the process never see it."""
    if not on:
        yield
        return
    before = torch.jit.onednn_fusion_enabled()
    torch.jit.enable_onednn_fusion(True)
    try:
        yield
    finally:
        torch.jit.enable_onednn_fusion(before)


def _batch(pixels: list[torch.Tensor], batch_size: int) -> torch.Tensor:
    """A full, normalised batch: the images' rows, then zero rows (computed and dropped; every forward sees one
    shape)."""
    batch = normalize_pixels(torch.stack(pixels))
    if len(pixels) < batch_size:
        batch = torch.cat([batch, batch.new_zeros((batch_size - len(pixels), *batch.shape[1:]))])
    return batch


class Encoder:
    """A CNN ready for inference. ``engine="eager"`` runs the module as torchvision defines it (NCHW): the reference.
    ``engine="fast"`` converts it to channels-last, traces it and freezes the graph, which folds each batch norm into
    its convolution; on an x86 CPU its forwards run with oneDNN Graph fusion (convolutions fused with their ReLUs and
    residual adds), elsewhere ``optimize_for_inference`` lays the weights out for oneDNN. Its features equal eager's
    only within float tolerance, so the engine is part of the stage key and the cache identity."""

    def __init__(self, model: nn.Module, *, engine: str, precision: str, device: torch.device,
                 batch_size: int, image_size: int, threads: int | None = None) -> None:
        if engine not in ENGINES:
            raise ConfigError(f"image_features.engine must be one of {', '.join(ENGINES)}; got {engine!r}")
        if precision not in ("fp32", "bf16"):
            raise ConfigError(f"image encoder precision must be fp32 or bf16 (resolved), got {precision!r}")
        self.engine, self.precision, self.device, self.batch_size = engine, precision, device, batch_size
        self.threads = threads  # torch intra-op threads per forward (None: as torch is); see torch_threads
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.memory_format = torch.channels_last if engine == "fast" else torch.contiguous_format
        self.fuse = engine == "fast" and device.type == "cpu" and onednn_graph_available()
        if engine == "fast" or self.dtype != torch.float32 or device.type != "cpu":
            model = copy.deepcopy(model)  # converted in place below; the caller's module may be shared (shards)
        model = model.to(device=device, dtype=self.dtype).eval()
        if engine == "fast":
            model = model.to(memory_format=torch.channels_last)
            # Traced with one image: the recorded ops do not depend on the batch size (resnet and vgg flatten from
            # dim 1), and tracing runs an eager forward, 1/batch_size the cost.
            example = self._prepare(torch.zeros(1, 3, image_size, image_size))
            with torch.no_grad(), warnings.catch_warnings():
                # optimize_for_inference is deprecated in favour of torch.compile, which was no faster here and adds
                # a long compilation to every process.
                warnings.simplefilter("ignore", FutureWarning)
                graph = torch.jit.freeze(torch.jit.trace(model, example, check_trace=False).eval())
                if device.type == "cpu" and not self.fuse:
                    graph = torch.jit.optimize_for_inference(graph)
            self.forward: Callable[[torch.Tensor], torch.Tensor] = graph
            # The graph executor's first call profiles an unfused graph, whose bits differ from the optimised one's:
            # spent on zeros here, so that no image's features depend on whether its batch came first.
            self(torch.zeros(batch_size, 3, image_size, image_size))
        else:
            self.forward = model

    def _prepare(self, batch: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        batch = batch.to(self.device, dtype=self.dtype, non_blocking=True)
        return batch.contiguous(memory_format=self.memory_format)

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        """float32 features of one full batch (``batch_size`` rows)."""
        with torch.inference_mode():
            x = self._prepare(batch)
            if self.device.type == "cpu":
                with _CPU_FORWARD_GATE, torch_threads(self.threads), _onednn_fusion(self.fuse):
                    out = self.forward(x)
            else:
                out = self.forward(x)
            return out.reshape(out.shape[0], -1).float().cpu().numpy()


def encode_stream(
    paths: Iterable[Path], encoder: Encoder, *, image_size: int, num_workers: int,
    max_bytes: int = 10_000_000, max_pixels: int = MAX_PIXELS,
) -> Iterator[np.ndarray]:
    """Features of ``paths`` as they arrive, one array of real rows per full batch (the last one padded with zeros).
    Why a stream: the shard's fetcher yields images while earlier ones are encoded. ``num_workers`` threads decode up
    to two batches ahead, beside the forward pass (for a GPU, which leaves the cores free); with none (a CPU, whose
    forward uses every core), each batch is decoded on every core between two forward passes, never beside one.
    Pillow and the resize release the GIL. Threads, not forked workers: a child forked while other threads (shards,
    HTTP) run can inherit a held lock and hang forever."""
    dataset = ImageFileDataset([], image_size, max_bytes=max_bytes, max_pixels=max_pixels)
    size = encoder.batch_size
    if num_workers > 0:
        with ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="decode") as pool:
            pending: deque[Future[torch.Tensor]] = deque()
            for path in paths:
                pending.append(pool.submit(dataset.decode, Path(path)))
                if len(pending) >= 2 * size:
                    yield encoder(_batch([pending.popleft().result() for _ in range(size)], size))
            while pending:
                rows = [pending.popleft().result() for _ in range(min(size, len(pending)))]
                yield encoder(_batch(rows, size))[: len(rows)]
        return
    stream = (Path(p) for p in paths)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="decode") as pool:
        for chunk in iter(lambda: list(itertools.islice(stream, size)), []):
            rows = list(pool.map(dataset.decode, chunk))
            yield encoder(_batch(rows, size))[: len(rows)]


def encode_images(
    paths: Sequence[Path], model: nn.Module, *, image_size: int = 224, batch_size: int = 32,
    num_workers: int | None = None, device: str | torch.device | None = None, progress: bool = True,
    max_bytes: int = 10_000_000, max_pixels: int = MAX_PIXELS, engine: str = "eager", precision: str = "fp32",
) -> np.ndarray:
    """Features of ``paths`` (rows in the same order) as a float32 array; the model moves to ``device``.
    ``num_workers=None``: no decode thread beside the forward pass on a CPU, where it would compete with the CNN for
    the cores, and 2 on CUDA, where it overlaps GPU work (see :func:`encode_stream`)."""
    from tqdm.auto import tqdm

    dev = resolve_device(device)
    if num_workers is None:
        num_workers = 2 if dev.type == "cuda" else 0
    encoder = Encoder(model, engine=engine, precision=precision, device=dev, batch_size=batch_size,
                      image_size=image_size)
    if len(paths) == 0:
        return np.zeros((0, encoder(torch.zeros(batch_size, 3, image_size, image_size)).shape[1]), np.float32)
    stream = encode_stream(paths, encoder, image_size=image_size, num_workers=num_workers, max_bytes=max_bytes,
                           max_pixels=max_pixels)
    n_batches = -(-len(paths) // batch_size)
    chunks = list(tqdm(stream, total=n_batches, desc="encode images", unit="batch", disable=not progress))
    return np.concatenate(chunks, axis=0).astype(np.float32, copy=False)


def weights_digest(model: nn.Module) -> str:
    """sha256 over a module's state (names, dtypes, shapes, bytes): the weights' part of a cache identity. Not the
    file's hash: the same weights saved twice need not give the same bytes, and every snapshot shares the cache."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
