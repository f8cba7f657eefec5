"""Pretrained weights by name: ``--pretrained torchvision:ARCH[.VERSION]`` and ``--pretrained timm:NAME``.

``torchvision:resnet18 | resnet34 | resnet50`` (optionally with torchvision's weights version,
``torchvision:resnet50.IMAGENET1K_V1``; without one, torchvision's ``DEFAULT``) is the official
torchvision file, downloaded once into the cache (``$CDMIX_CACHE``, default ``~/.cache/cdmix``;
files in ``<cache>/torchvision/``) with a progress bar. A cut download is kept as ``<file>.part``
and resumed (HTTP Range), within the same call and by the next one. Every file is checked against
the full sha256 pinned below before it is used; a file that does not match is refused (a
download's ``.part`` is deleted). Offline, one :class:`UserError` line names what could not be
fetched, from where, and the path to put the file at by hand.

``$CDMIX_WEIGHTS_URL_BASE`` replaces ``https://download.pytorch.org/models/`` (a mirror holding the
same file names; the tests point it at a local server). The sha256 check is the same.

``timm:NAME`` is left to timm's own pretrained loader (``timm.create_model(NAME, pretrained=True)``,
its Hugging Face hub cache), used by the model builder: see :func:`timm_name`.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cdmix.errors import UserError

__all__ = ["CACHE_ENV", "URL_BASE_ENV", "TORCHVISION_URL", "TORCHVISION", "TorchvisionWeights", "cache_dir",
           "fetch", "fetch_weights", "is_weights_name", "named_model", "name_of_sha256", "timm_name", "torchvision_weights",
           "weights_names"]

logger = logging.getLogger(__name__)

CACHE_ENV = "CDMIX_CACHE"
URL_BASE_ENV = "CDMIX_WEIGHTS_URL_BASE"  # a mirror of download.pytorch.org/models (same file names)
TORCHVISION_URL = "https://download.pytorch.org/models/"
TORCHVISION_PREFIX = "torchvision:"
TIMM_PREFIX = "timm:"
_CHUNK = 1 << 20
_ATTEMPTS = 3  # connections per fetch: a cut download is resumed this many times in one call


@dataclass(frozen=True)
class TorchvisionWeights:
    arch: str  # cdmix's (= torchvision's) model name
    version: str  # torchvision's weights enum member, e.g. IMAGENET1K_V1
    file: str  # the file name under download.pytorch.org/models/ (carries the sha256's first 8 hex digits)
    sha256: str  # the full sha256 of that file

    @property
    def name(self) -> str:
        return f"{TORCHVISION_PREFIX}{self.arch}.{self.version}"


# The official files of torchvision.models.ResNet{18,34,50}_Weights. torchvision itself checks only
# the 8 hex digits in the file name (load_state_dict_from_url(check_hash=True)); the full sha256s
# below start with those digits and were each found identical in several independent public
# projects that pin these exact files by URL (a Rust/burn ResNet checkpoint table holding all of
# resnet18/34/50 V1; download scripts and manifests with URL, sha256 and size: resnet18 46,830,571
# bytes, resnet50 V1 102,530,333, V2 102,540,417). They were not recomputed here (no network).
TORCHVISION: dict[tuple[str, str], TorchvisionWeights] = {
    (w.arch, w.version): w for w in (
        TorchvisionWeights("resnet18", "IMAGENET1K_V1", "resnet18-f37072fd.pth",
                           "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec"),
        TorchvisionWeights("resnet34", "IMAGENET1K_V1", "resnet34-b627a593.pth",
                           "b627a593bcbe140c234610266fe4f8ae95ea42fc881d091c9b6052e6b1d0590f"),
        TorchvisionWeights("resnet50", "IMAGENET1K_V1", "resnet50-0676ba61.pth",
                           "0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a"),
        TorchvisionWeights("resnet50", "IMAGENET1K_V2", "resnet50-11ad3fa6.pth",
                           "11ad3fa62ca79e40addfd354a8ec4b7c75143b3038b8d2a807fbc68deab379ca"),
    )
}
# torchvision's ``Weights.DEFAULT`` per model: what ``torchvision:ARCH`` without a version means.
DEFAULT_VERSION = {"resnet18": "IMAGENET1K_V1", "resnet34": "IMAGENET1K_V1", "resnet50": "IMAGENET1K_V2"}


def weights_names() -> list[str]:
    """Every ``torchvision:`` name accepted (with and without the version)."""
    return [*(f"{TORCHVISION_PREFIX}{arch}" for arch in DEFAULT_VERSION), *(w.name for w in TORCHVISION.values())]


def is_weights_name(spec: object) -> bool:
    """True for ``torchvision:...`` / ``timm:...`` (unless a file or folder of that very name exists)."""
    return (isinstance(spec, str) and spec.startswith((TORCHVISION_PREFIX, TIMM_PREFIX))
            and not Path(spec).expanduser().exists())


def timm_name(spec: object) -> str | None:
    """``NAME`` of ``--pretrained timm:NAME``, else None."""
    if is_weights_name(spec) and spec.startswith(TIMM_PREFIX):  # type: ignore[union-attr]
        name = spec[len(TIMM_PREFIX):]  # type: ignore[index]
        if not name:
            raise UserError("--pretrained timm: needs a model name, e.g. timm:resnet50.a1_in1k")
        return name
    return None


def torchvision_weights(spec: str) -> TorchvisionWeights:
    """The table entry of ``torchvision:ARCH[.VERSION]``; one :class:`UserError` for an unknown name."""
    arch, _, version = spec[len(TORCHVISION_PREFIX):].partition(".")
    weights = TORCHVISION.get((arch, version or DEFAULT_VERSION.get(arch, "")))
    if weights is None:
        raise UserError(f"unknown pretrained weights {spec!r}; known: {', '.join(weights_names())} "
                        "(or timm:NAME, or a local .pth/.pt/.safetensors file or cdmix pretrain run folder)")
    return weights


def named_model(spec: object) -> str | None:
    """The ``--model`` a weights name is for (``resnet50`` for ``torchvision:resnet50``, ``timm:NAME`` for
    ``timm:NAME``): the default model when ``--model`` is not given; None for files and folders."""
    if not is_weights_name(spec):
        return None
    name = timm_name(spec)
    return f"{TIMM_PREFIX}{name}" if name else torchvision_weights(spec).arch  # type: ignore[arg-type]


def name_of_sha256(digest: str) -> str | None:
    """The ``torchvision:`` name of the file with this sha256 (for pretrained.json), else None."""
    return next((w.name for w in TORCHVISION.values() if w.sha256 == digest), None)


def cache_dir() -> Path:
    """``$CDMIX_CACHE``, else ``~/.cache/cdmix``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cdmix").expanduser()


def _url_base(url_base: str | None) -> str:
    base = url_base or os.environ.get(URL_BASE_ENV) or TORCHVISION_URL
    return base if base.endswith("/") else base + "/"


def fetch(spec: str, *, url_base: str | None = None, cache: str | Path | None = None,
          progress: bool = True, timeout: float = 30.0) -> Path:
    """The local path of the weights ``torchvision:ARCH[.VERSION]``: the cached file, after checking its
    sha256, else downloaded into the cache first (resuming a ``.part`` left by a cut download).

    ``url_base``: where the files are (default ``$CDMIX_WEIGHTS_URL_BASE``, else download.pytorch.org);
    ``cache``: the cache folder (default :func:`cache_dir`). Raises one :class:`UserError` line when the
    name is unknown, the file cannot be fetched (offline, HTTP error, cut too often) or is not the
    file pinned here."""
    return fetch_weights(torchvision_weights(spec), url_base=url_base, cache=cache, progress=progress,
                         timeout=timeout)


def fetch_weights(weights: TorchvisionWeights, *, url_base: str | None = None, cache: str | Path | None = None,
                  progress: bool = True, timeout: float = 30.0) -> Path:
    """:func:`fetch` for one entry (of :data:`TORCHVISION`, or any file and sha256 under ``url_base``)."""
    from cdmix.models.pretrained import sha256_file

    dest = Path(cache).expanduser() if cache is not None else cache_dir()
    dest = dest / "torchvision" / weights.file
    url = _url_base(url_base) + weights.file
    if not dest.is_file():
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the weights cache {dest.parent} ({exc.strerror or exc}); set "
                            f"${CACHE_ENV} to a writable folder") from None
        with _locked(dest):  # one download per file at a time (several processes of a distributed run)
            if not dest.is_file():
                _download(url, dest, weights, progress=progress, timeout=timeout)
                return dest  # checked as it was downloaded
    digest = sha256_file(dest)
    if digest != weights.sha256:
        raise UserError(f"{dest} is not {weights.name} (sha256 {digest[:12]}..., expected "
                        f"{weights.sha256[:12]}...): delete it to download it again, or put {url} there")
    return dest


@contextlib.contextmanager
def _locked(dest: Path):
    """An exclusive lock on ``<dest>.lock`` (POSIX; elsewhere no lock)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(dest.with_name(dest.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _reason(exc: BaseException) -> str:
    """The cause of a failed request, in a few words."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        if not isinstance(exc.reason, BaseException):
            return str(exc.reason)
        exc = exc.reason
    text = (str(exc).strip().splitlines() or [""])[0]
    return text or type(exc).__name__


def _download(url: str, dest: Path, weights: TorchvisionWeights, *, progress: bool, timeout: float) -> None:
    """Download ``url`` to ``dest`` through ``<dest>.part`` (resumed when present), check the sha256, rename."""
    import hashlib

    from tqdm import tqdm

    part = dest.with_name(dest.name + ".part")
    by_hand = f"download it elsewhere and put it at {dest} (sha256 {weights.sha256})"
    failure = ""
    for _ in range(_ATTEMPTS):
        start = part.stat().st_size if part.is_file() else 0
        headers = {"User-Agent": "cdmix", "Accept-Encoding": "identity"}
        if start:
            headers["Range"] = f"bytes={start}-"
        try:
            response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and start:  # the part is already whole (or the server's file is shorter)
                break
            raise UserError(f"could not fetch {weights.name} from {url} ({_reason(exc)}); {by_hand}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
            kept = f"; run again to resume {part}" if start else ""
            raise UserError(f"could not fetch {weights.name} from {url} ({_reason(exc)}){kept}; {by_hand}") from None
        with response:
            if start and response.status != 206:  # the server ignored the Range header: start over
                start = 0
            length = response.headers.get("Content-Length")
            total = start + int(length) if length and length.isdigit() else None
            done = start
            try:
                with open(part, "ab" if start else "wb") as out, tqdm(
                        total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                        desc=f"{weights.name} {'resuming' if start else 'downloading'}",
                        disable=None if progress else True) as bar:  # None: no bar when not a terminal
                    while chunk := response.read(_CHUNK):
                        out.write(chunk)
                        done += len(chunk)
                        bar.update(len(chunk))
            except (OSError, http.client.HTTPException, socket.timeout) as exc:
                failure = _reason(exc)
                continue
        if total is None or done >= total:
            break
        failure = f"the connection closed after {done} of {total} bytes"
    else:
        raise UserError(f"could not fetch {weights.name} from {url}: cut {_ATTEMPTS} times ({failure}); run again "
                        f"to resume {part}, or {by_hand}")
    digest = hashlib.sha256()
    with open(part, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    if digest.hexdigest() != weights.sha256:
        part.unlink(missing_ok=True)
        raise UserError(f"refused the file from {url}: its sha256 {digest.hexdigest()[:12]}... is not "
                        f"{weights.name}'s {weights.sha256[:12]}... (deleted it); {by_hand}")
    os.replace(part, dest)
    logger.info(f"{weights.name}: downloaded to {dest} (sha256 checked)")
