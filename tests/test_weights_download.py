"""Pretrained weights by name (cdmix.models.weights): a local HTTP server on 127.0.0.1, started here and
speaking Range, serves a tiny state dict. The download lands in the cache and is reused; a cut download
resumes; a wrong sha256 is refused in one line and not kept; an unreachable address is one line; the CLI
says it in one `error:` line (exit 2); and a run starts from the named weights."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from cdmix.errors import UserError
from cdmix.models import weights
from cdmix.models.weights import TorchvisionWeights, fetch, fetch_weights


class _Handler(BaseHTTPRequestHandler):
    """GET /NAME of ``server.files``, honouring ``Range: bytes=N-``. ``server.cut`` first answers: the
    whole Content-Length announced, half the bytes sent, the connection dropped. ``server.ignore_range``:
    every answer is the whole file (200)."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802 (http.server's name)
        server = self.server
        server.log.append((self.path, self.headers.get("Range")))
        data = server.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_error(404)
            return
        start = 0
        ranged = self.headers.get("Range")
        if ranged and not server.ignore_range:
            start = int(ranged.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = data[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if server.cut > 0:
            server.cut -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.log, httpd.cut, httpd.ignore_range = {}, [], 0, False
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _tiny_state_dict() -> bytes:
    buffer = io.BytesIO()
    torch.save({"conv.weight": torch.arange(24000, dtype=torch.float32).reshape(10, 2400),
                "fc.bias": torch.ones(3)}, buffer)
    return buffer.getvalue()


@pytest.fixture
def tiny(server):
    """A tiny weights file served as tiny-<sha8>.pth, and its table entry."""
    data = _tiny_state_dict()
    digest = hashlib.sha256(data).hexdigest()
    entry = TorchvisionWeights("resnet18", "TEST", f"tiny-{digest[:8]}.pth", digest)
    server.files[entry.file] = data
    return entry, data


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_the_table_pins_full_sha256s_that_agree_with_torchvision_file_names():
    for w in weights.TORCHVISION.values():
        assert len(w.sha256) == 64 and int(w.sha256, 16) >= 0
        assert w.file == f"{w.arch}-{w.sha256[:8]}.pth"  # torchvision's own check_hash compares this prefix
    assert weights.torchvision_weights("torchvision:resnet50").file == "resnet50-11ad3fa6.pth"  # DEFAULT = V2
    assert weights.torchvision_weights("torchvision:resnet50.IMAGENET1K_V1").file == "resnet50-0676ba61.pth"
    assert weights.torchvision_weights("torchvision:resnet18").file == "resnet18-f37072fd.pth"
    with pytest.raises(UserError, match="known: torchvision:resnet18"):
        weights.torchvision_weights("torchvision:resnet101")
    with pytest.raises(UserError, match="unknown pretrained weights"):
        weights.torchvision_weights("torchvision:resnet50.IMAGENET1K_V3")


def test_download_lands_in_the_cache_and_is_reused(server, tiny, tmp_path):
    entry, data = tiny
    path = fetch_weights(entry, url_base=server.url, cache=tmp_path, progress=False)
    assert path == tmp_path / "torchvision" / entry.file and path.read_bytes() == data
    assert not path.with_name(path.name + ".part").exists()
    assert server.log == [(f"/{entry.file}", None)]
    again = fetch_weights(entry, url_base=server.url, cache=tmp_path, progress=False)
    assert again == path and len(server.log) == 1  # from the cache: no request
    assert set(torch.load(path, weights_only=True)) == {"conv.weight", "fc.bias"}


def test_a_cut_download_resumes_with_a_range_request(server, tiny, tmp_path):
    entry, data = tiny
    server.cut = 1  # the first answer stops halfway and drops the connection
    path = fetch_weights(entry, url_base=server.url, cache=tmp_path, progress=False)
    assert path.read_bytes() == data
    assert server.log == [(f"/{entry.file}", None), (f"/{entry.file}", f"bytes={len(data) // 2}-")]


def test_a_part_left_by_an_earlier_run_is_resumed(server, tiny, tmp_path):
    entry, data = tiny
    part = tmp_path / "torchvision" / f"{entry.file}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:1000])
    assert fetch_weights(entry, url_base=server.url, cache=tmp_path, progress=False).read_bytes() == data
    assert server.log == [(f"/{entry.file}", "bytes=1000-")] and not part.exists()


def test_a_server_that_ignores_range_is_read_from_the_start(server, tiny, tmp_path):
    entry, data = tiny
    server.cut, server.ignore_range = 1, True
    assert fetch_weights(entry, url_base=server.url, cache=tmp_path, progress=False).read_bytes() == data
    assert len(server.log) == 2


def test_a_download_cut_every_time_keeps_the_part_and_says_so(server, tiny, tmp_path):
    entry, data = tiny
    server.cut = 10
    with pytest.raises(UserError) as exc:
        fetch_weights(entry, url_base=server.url, cache=tmp_path, progress=False)
    text = _one_line(exc)
    part = tmp_path / "torchvision" / f"{entry.file}.part"
    assert "run again to resume" in text and str(part) in text and 0 < part.stat().st_size < len(data)
    server.cut = 0
    assert fetch_weights(entry, url_base=server.url, cache=tmp_path, progress=False).read_bytes() == data


def test_a_wrong_file_is_refused_in_one_line_and_not_kept(server, tiny, tmp_path):
    entry, data = tiny
    server.files[entry.file] = data[:-1] + bytes([data[-1] ^ 1])  # one bit off
    with pytest.raises(UserError) as exc:
        fetch_weights(entry, url_base=server.url, cache=tmp_path, progress=False)
    text = _one_line(exc)
    assert text.startswith("refused the file from") and entry.sha256[:12] in text and "deleted" in text
    assert not [p for p in (tmp_path / "torchvision").iterdir() if not p.name.endswith(".lock")]


def test_a_wrong_file_put_in_the_cache_by_hand_is_not_used(server, tiny, tmp_path):
    entry, data = tiny
    placed = tmp_path / "torchvision" / entry.file
    placed.parent.mkdir(parents=True)
    placed.write_bytes(b"not the weights")
    with pytest.raises(UserError) as exc:
        fetch_weights(entry, url_base=server.url, cache=tmp_path, progress=False)
    assert f"{placed} is not" in _one_line(exc) and server.log == []


def test_an_unreachable_address_is_one_line_naming_url_and_cache_path(tmp_path, monkeypatch):
    port = _closed_port()
    monkeypatch.setenv(weights.URL_BASE_ENV, f"http://127.0.0.1:{port}/mirror")
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(UserError) as exc:
        fetch("torchvision:resnet50", progress=False)
    text = _one_line(exc)
    dest = tmp_path / "cache" / "torchvision" / "resnet50-11ad3fa6.pth"
    assert text.startswith("could not fetch torchvision:resnet50.IMAGENET1K_V2 from "
                           f"http://127.0.0.1:{port}/mirror/resnet50-11ad3fa6.pth")
    assert f"put it at {dest}" in text and weights.TORCHVISION["resnet50", "IMAGENET1K_V2"].sha256 in text
    assert not dest.exists()


def test_an_http_error_is_one_line(server, tmp_path):
    with pytest.raises(UserError) as exc:
        fetch("torchvision:resnet34", url_base=server.url, cache=tmp_path, progress=False)
    assert "HTTP 404" in _one_line(exc) and "resnet34-b627a593.pth" in str(exc.value)


def test_cli_train_with_an_unreachable_mirror_exits_2_with_one_error_line(tmp_path, monkeypatch, capsys):
    from cdmix.cli import main

    monkeypatch.setenv(weights.URL_BASE_ENV, f"http://127.0.0.1:{_closed_port()}/")
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "cache"))
    code = main(["train", "--dataset", "digits", "--method", "standard", "--epochs", "1", "--device", "cpu",
                 "--no-progress", "--pretrained", "torchvision:resnet18", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: could not fetch torchvision:resnet18")
    assert str(tmp_path / "cache" / "torchvision" / "resnet18-f37072fd.pth") in err[0]


def test_a_run_starts_from_named_weights(server, tmp_path, monkeypatch, one_thread):
    """torchvision:resnet18 (its table entry replaced by a tiny resnet18 for this test): downloaded into the
    cache, --model follows the name, the body loaded, a fresh 10-class head, the name in pretrained.json."""
    from cdmix.models import create_model
    from cdmix.engine import start_run
    from cdmix.config import build_config

    state = create_model("resnet18", 1000, in_channels=1, width=4).state_dict()  # digits: grey
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    entry = TorchvisionWeights("resnet18", "IMAGENET1K_V1", f"resnet18-{digest[:8]}.pth", digest)
    monkeypatch.setitem(weights.TORCHVISION, ("resnet18", "IMAGENET1K_V1"), entry)
    server.files[entry.file] = data
    monkeypatch.setenv(weights.URL_BASE_ENV, server.url)
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "cache"))
    config = build_config(dataset="digits", method="standard", epochs=1, width=4, device="cpu", progress=False,
                          pretrained="torchvision:resnet18", out=str(tmp_path / "run"))
    trainer = start_run(config)
    try:
        net = trainer.method.nets[0]
        assert trainer.config.model == "resnet18" and trainer.config.normalization == "imagenet"
        assert torch.equal(net.layer4[1].conv2.weight.detach().cpu(), state["layer4.1.conv2.weight"])
        assert net.fc.weight.shape[0] == 10
    finally:
        trainer.release_lock()
    cached = tmp_path / "cache" / "torchvision" / entry.file
    assert cached.read_bytes() == data and trainer.config.pretrained == str(cached)
    record = json.loads((tmp_path / "run" / "pretrained.json").read_text())
    assert record["pretrained_name"] == "torchvision:resnet18.IMAGENET1K_V1" and record["pretrained_sha256"] == digest


def test_presets_default_to_named_weights_and_a_local_file_or_none_overrides(tmp_path, capsys):
    from cdmix.cli import main
    from cdmix.config import build_config

    expected = {"dividemix-clothing1m": "torchvision:resnet50.IMAGENET1K_V1",
                "josrc-clothing1m": "torchvision:resnet18.IMAGENET1K_V1",
                "josrc-food101n": "torchvision:resnet50.IMAGENET1K_V1"}
    for preset, name in expected.items():
        assert build_config(preset=preset).pretrained == name  # a name only: nothing fetched yet
        assert build_config(preset=preset, pretrained=str(tmp_path / "w.pth")).pretrained == str(tmp_path / "w.pth")
        assert build_config(preset=preset, pretrained="none").pretrained is None
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "weights: --pretrained torchvision:resnet50.IMAGENET1K_V1" in out


def test_timm_names_need_timm_and_use_its_pretrained_loader(monkeypatch):
    from cdmix.models.timm_models import create_timm_model

    monkeypatch.setitem(sys.modules, "timm", None)  # not installed
    with pytest.raises(UserError, match=r"--pretrained timm:resnet50 needs timm: pip install timm"):
        create_timm_model("resnet50", 10, pretrained=True)

    calls = []

    def create_model(name, pretrained, num_classes, in_chans):
        calls.append((name, pretrained, num_classes, in_chans))
        if name == "offline":
            raise OSError("We couldn't connect to 'https://huggingface.co' to load this file")
        return torch.nn.Linear(in_chans, num_classes)

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    assert isinstance(create_timm_model("resnet50.a1_in1k", 10, pretrained=True), torch.nn.Linear)
    assert calls == [("resnet50.a1_in1k", True, 10, 3)]
    with pytest.raises(UserError) as exc:
        create_timm_model("offline", 10, pretrained=True)
    assert _one_line(exc).startswith("could not fetch timm's pretrained weights for 'offline'")
    assert weights.named_model("timm:resnet50.a1_in1k") == "timm:resnet50.a1_in1k"
    assert weights.named_model("torchvision:resnet34") == "resnet34" and weights.named_model("w.pth") is None


def test_timm_weights_choose_the_model_and_imagenet_normalisation():
    from cdmix.config import Config, resolve

    resolved = resolve(Config(pretrained="timm:resnet50.a1_in1k"), 10, 32)
    assert resolved.model == "timm:resnet50.a1_in1k" and resolved.normalization == "imagenet"
    assert resolved.pretrained == "timm:resnet50.a1_in1k"  # timm's loader fetches them when the nets are built
    with pytest.raises(UserError, match="timm's weights for --model timm:resnet50.a1_in1k, not --model resnet18"):
        resolve(Config(pretrained="timm:resnet50.a1_in1k", model="resnet18"), 10, 32)
