"""``orwcfm-fast reward-server`` and its client HTTPReward, against real server processes.

Two servers run for the module (``python -m orwcfm_fast.cli reward-server ... --port 0``): the built-in
``jpeg_compressibility`` (jpeg_quality from --config/--set) and ``prompt_brightness`` from
tests/_reward_server_rewards.py (``--import``), a prompt-taking reward on [0, 1] images whose special
prompts make it slow or flaky on purpose. The finalizers stop them with SIGINT / SIGTERM and check
they exit 0. The jpeg server runs with tight limits (--max-body-mb 1 --max-connections 3) for the
hostile-input tests; the prompt server with the defaults (the zip bomb fits under its 1 GiB cap).
"""

import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from orwcfm_fast import ORWCFMTrainer, cli
from orwcfm_fast.reward_server import host_header_is_loopback, is_loopback, make_server
from orwcfm_fast.rewards import CallableReward, HTTPReward, JPEGCompressibility, make_reward, score_terms
from orwcfm_fast.rewards.base import WeightedSum
from orwcfm_fast.rewards.http import RewardServerError, encode_batch

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
from _reward_server_rewards import PromptBrightness  # noqa: E402

_STARTUP_S = 60.0
_SLOTS = 3  # the jpeg server's --max-connections
_NPZ = {"Content-Type": "application/x-npz"}
#: GET /health after every earlier connection was read to its close: only the asking one holds a slot
_HEALTHY = {"ok": True, "connections": {"served": 1, "refused": 0}}


def _start(tmp_dir: Path, *args: str):
    """A reward-server process and its URL, read from its ready line."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    log = open(tmp_dir / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "orwcfm_fast.cli", "reward-server", "--port", "0",
                             "--device", "cpu", *args],
                            stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=str(tmp_dir))
    deadline = time.monotonic() + _STARTUP_S
    line = ""
    while time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            break
    if not line.startswith("reward-server: serving "):
        proc.kill()
        proc.wait()
        log.seek(0)
        pytest.fail(f"reward server did not start (stdout {line!r}); its stderr:\n{log.read()}")
    return proc, line.rsplit(" on ", 1)[1].strip(), log


def _stop(proc, log, signum):
    """Stops the server with ``signum``; it must exit 0 (killed anyway if it does not)."""
    try:
        if proc.poll() is None:
            proc.send_signal(signum)
        rc = proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        log.seek(0)
        text = log.read()
        log.close()
    assert rc == 0, f"reward server exited {rc} on {signal.Signals(signum).name}; stderr:\n{text}"


@pytest.fixture(scope="module")
def jpeg_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("jpeg_server")
    (tmp / "reward.json").write_text(json.dumps({"jpeg_quality": 10, "reward_batch_size": 2}))
    proc, url, log = _start(tmp, "--reward", "jpeg-compressibility", "--config", "reward.json",
                            "--set", "jpeg_quality=50", "--max-body-mb", "1", "--max-connections", str(_SLOTS))
    yield url, proc
    _stop(proc, log, signal.SIGINT)


@pytest.fixture(scope="module")
def prompt_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prompt_server")
    proc, url, log = _start(tmp, "--import", "_reward_server_rewards", "--reward", "prompt_brightness")
    yield url
    _stop(proc, log, signal.SIGTERM)


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no http_proxy for loopback


def _get(url):
    with _DIRECT.open(url, timeout=10) as answer:
        return json.loads(answer.read())


def _post(url, body, headers=_NPZ):
    try:
        request = urllib.request.Request(url, data=body, method="POST", headers=headers)
        with _DIRECT.open(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- results and protocol


def test_info_mirrors_the_served_reward(jpeg_server, prompt_server, monkeypatch):
    url, proc = jpeg_server
    info = _get(url + "/info")
    assert info["reward"] == "jpeg_compressibility" and info["pid"] == proc.pid
    assert info["input_range"] == [-1.0, 1.0] and info["takes_prompts"] is False
    health = _get(url + "/health")  # the /info connection may still be closing: served is 1 or 2
    assert health["ok"] is True and health["connections"]["refused"] == 0 and health["connections"]["served"] >= 1
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # a cluster's proxy: not used for loopback servers
    jpeg = HTTPReward(url + "/")
    assert (jpeg.name, jpeg.input_range, jpeg.takes_prompts, jpeg.url) == ("jpeg_compressibility", (-1.0, 1.0), False, url)
    prompted = make_reward(prompt_server, {"reward_timeout": 5.0})
    assert isinstance(prompted, HTTPReward) and prompted.timeout == 5.0
    assert (prompted.name, prompted.input_range, prompted.takes_prompts) == ("prompt_brightness", (0.0, 1.0), True)


def test_jpeg_equals_the_local_reward_exactly(jpeg_server):
    url, _ = jpeg_server
    x = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    want = JPEGCompressibility(quality=50)(x)  # --set jpeg_quality=50 overrides the --config file's 10
    got = make_reward(url, None)(x)
    assert got.dtype == torch.float32 and got.shape == (5,)
    assert torch.equal(got, want)
    assert not torch.equal(got, JPEGCompressibility(quality=10)(x))


def test_prompt_reward_through_score_terms(prompt_server):
    remote, local = HTTPReward(prompt_server), PromptBrightness()
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    prompts = ["a cat", "a dog", "", "a handwritten 7"]
    got, _ = score_terms(remote, images, prompts, samples_range=(0.0, 1.0))
    want, _ = score_terms(local, images, prompts, samples_range=(0.0, 1.0))
    assert torch.equal(got, want)
    # images in [-1, 1]: converted to the served reward's [0, 1] on the client, as for a local reward
    got, _ = score_terms(remote, images * 2 - 1, prompts, samples_range=(-1.0, 1.0))
    want, _ = score_terms(local, images * 2 - 1, prompts, samples_range=(-1.0, 1.0))
    assert torch.equal(got, want)
    assert not torch.equal(got, images.mean(dim=(1, 2, 3)))  # the prompts did reach the server


def test_batches_of_reward_batch_size(prompt_server):
    images = torch.rand(7, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    prompts = [f"prompt {'x' * k}" for k in range(7)]
    whole = HTTPReward(prompt_server)
    batched = HTTPReward.from_config(prompt_server, {"reward_batch_size": 3})
    want = whole(images, prompts)
    assert whole.score_requests == 1
    assert torch.equal(batched(images, prompts), want)
    assert batched.score_requests == 3  # 3 + 3 + 1
    assert torch.equal(want, PromptBrightness()(images, prompts))


def test_samples_of_any_shape_with_an_in_process_server():
    server = make_server(CallableReward(lambda x: x.sum(dim=1), name="coordinate_sum"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        remote = HTTPReward(server.url)
        assert (remote.name, remote.input_range, remote.takes_prompts) == ("coordinate_sum", None, False)
        x = torch.randn(6, 2)
        assert torch.equal(remote(x, ["ignored"] * 6), x.sum(dim=1))
        assert remote(x[:0]).shape == (0,) and remote.score_requests == 1
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# ----------------------------------------------------------------------------- failures


def test_timeout_is_a_clear_error_quickly(prompt_server):
    remote = HTTPReward(prompt_server, timeout=0.3, retries=0)
    start = time.monotonic()
    with pytest.raises(RewardServerError, match=r"no answer within 0.3 s .*after 1 attempt .*raise config reward_timeout"):
        remote(torch.rand(2, 3, 4, 4), ["sleep=1.5", "a"])
    assert time.monotonic() - start < 1.2


def test_retries_after_a_server_error(prompt_server):
    images = torch.rand(3, 3, 4, 4)
    prompts = [f"fail-once={uuid.uuid4()}", "b", "c"]
    remote = HTTPReward(prompt_server, retries=2)
    want = images.mean(dim=(1, 2, 3)) + 0.01 * torch.tensor([len(p) for p in prompts], dtype=torch.float32)
    assert torch.equal(remote(images, prompts), want)
    assert remote.score_requests == 2  # HTTP 500, then the answer
    no_retry = HTTPReward(prompt_server, retries=0)
    with pytest.raises(RewardServerError, match=r"HTTP 500: reward 'prompt_brightness' raised RuntimeError: flaky failure"):
        no_retry(images, [f"fail-once={uuid.uuid4()}", "b", "c"])
    with pytest.raises(RewardServerError, match=r"returned a bad output: reward returned shape \[2\]"):
        no_retry(images, ["bad-output", "b", "c"])


def test_server_down_is_a_clear_error():
    port = _free_port()
    start = time.monotonic()
    with pytest.raises(RewardServerError) as info:
        HTTPReward.from_config(f"http://127.0.0.1:{port}", {"reward_retries": 1})
    msg = str(info.value)
    assert f"reward server http://127.0.0.1:{port} is not reachable (connection refused) after 2 attempts" in msg
    assert f"`orwcfm-fast reward-server --reward NAME --port {port}`" in msg and "config `reward`" in msg
    assert time.monotonic() - start < 5
    with pytest.raises(ValueError, match="looks like http://127.0.0.1:PORT"):
        HTTPReward("http://")


def test_bad_input_is_400_with_the_servers_message(jpeg_server):
    url, _ = jpeg_server
    remote = HTTPReward(url, retries=3)
    with pytest.raises(ValueError, match=r"rejected a batch of samples \[2, 2, 8, 8\]: .*C in \{1, 3\}"):
        remote(torch.zeros(2, 2, 8, 8))
    assert remote.score_requests == 1  # a 4xx is not retried
    code, answer = _post(url + "/score", b"not an npz")
    assert code == 400 and "not an .npz" in answer["error"]
    code, answer = _post(url + "/score", encode_batch(torch.zeros(2, 3, 8, 8), ["only one prompt"]))
    assert code == 400 and "2 strings" in answer["error"]
    code, answer = _post(url + "/nothing", b"")
    assert code == 404 and "POST /score" in answer["error"]


def test_command_line_refusals(capsys):
    base = ["reward-server", "--reward", "jpeg_compressibility"]
    assert cli.main(base + ["--host", "0.0.0.0"]) == 2
    assert "unauthenticated" in capsys.readouterr().err
    assert cli.main(base + ["--set", "jpeg_qualty=50"]) == 2
    assert "did you mean 'jpeg_quality'" in capsys.readouterr().err
    assert cli.main(["reward-server", "--reward", "jpeg_compresibility"]) == 2
    assert "did you mean 'jpeg_compressibility'" in capsys.readouterr().err
    assert cli.main(["reward-server", "--reward", "x", "--import", "no_such_module_here"]) == 2
    assert "no module named 'no_such_module_here'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unauthenticated"):
        make_server(JPEGCompressibility(), host="192.168.1.10")
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.com")


# ----------------------------------------------------------------------------- the trainer


class TinyPixelVelocity(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, t, x):
        return self.conv(x) + t[:, None, None, None]


def _trainer_config(reward, savedir):
    return {"reward": reward, "sample_shape": (3, 8, 8), "batch_size": 4, "ode_steps": 2, "warmup_steps": 0,
            "seed": 0, "savedir": str(savedir), "jpeg_quality": 50, "reward_batch_size": 3}


def test_trainer_with_a_reward_server(jpeg_server, tmp_path):
    url, _ = jpeg_server
    torch.manual_seed(0)
    trainer = ORWCFMTrainer(TinyPixelVelocity(), _trainer_config(url, tmp_path), "cpu")
    assert isinstance(trainer.reward_fn, HTTPReward) and trainer.reward_fn.batch_size == 3
    metrics = trainer.training_step()
    assert trainer.reward_fn.score_requests == 2
    assert torch.isfinite(torch.tensor([metrics["reward"], metrics["total_loss"]])).all()

    trainer = ORWCFMTrainer(TinyPixelVelocity(), _trainer_config({url: 1.0, "jpeg_compressibility": 0.5}, tmp_path), "cpu")
    assert isinstance(trainer.reward_fn, WeightedSum)
    metrics = trainer.training_step()
    remote, local = metrics[f"reward/{url}"], metrics["reward/jpeg_compressibility"]
    assert remote == local  # the same reward with the same jpeg_quality, here and on the server
    assert metrics["reward"] == pytest.approx(1.5 * local, rel=1e-6)


def test_a_served_term_is_named_after_its_reward(prompt_server, jpeg_server):
    """In a reward dict a served term is logged under the served reward's name, unless another term has it."""
    from orwcfm_fast.rewards import make_reward

    jpeg_url, _ = jpeg_server
    summed = make_reward({prompt_server: 1.0, "jpeg_compressibility": 0.5, jpeg_url: 2.0}, {"jpeg_quality": 50})
    assert summed.names == ["prompt_brightness", "jpeg_compressibility", jpeg_url]


# ----------------------------------------------------------------------------- hostile input


def _address(url):
    """``(host, port)`` of a server URL."""
    parts = urllib.parse.urlsplit(url)
    return parts.hostname, parts.port


def _read_answer(sock, timeout=10.0):
    """Everything the server sends until it closes (b"" if it closed or reset without a word)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(1 << 16):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def _parse(data):
    """``(status, JSON body)`` of a raw HTTP answer, ``(None, None)`` for none."""
    if not data:
        return None, None
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def _raw(url, method, path, headers, body=b"", timeout=10.0):
    """One request written by hand (any ``Host``, or none; any ``Content-Length``): its ``(status, JSON)``."""
    lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection(_address(url), timeout=timeout) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        return _parse(_read_answer(sock, timeout))


def _host(url):
    """The ``Host`` header a client of ``url`` sends (``127.0.0.1:PORT``)."""
    return url.split("//", 1)[1]


def _score_ok(url):
    """The next good request is served correctly (the server is up and not wedged)."""
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(7)) * 2 - 1
    remote = HTTPReward(url, retries=0)
    assert torch.equal(remote(x), JPEGCompressibility(quality=50)(x))


def _peak_rss_mb(pid):
    """The process's peak resident memory (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def _npz(members, method=zipfile.ZIP_STORED):
    """An .npz built by hand: ``{name.npy: npy bytes}``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _npy(array, shape=None):
    """``array`` as .npy bytes, its header declaring ``shape`` if given (a lying header)."""
    buf = io.BytesIO()
    header = np.lib.format.header_data_from_array_1_0(array)
    if shape is not None:
        header["shape"] = shape
    np.lib.format.write_array_header_1_0(buf, header)
    buf.write(array.tobytes())
    return buf.getvalue()


def test_host_header_must_be_loopback(jpeg_server):
    url, _ = jpeg_server
    port = _address(url)[1]
    for host in ("evil.example", f"evil.example:{port}", "192.168.1.10", f"0.0.0.0:{port}", "localhost.evil.example"):
        code, answer = _raw(url, "GET", "/info", {"Host": host})
        assert code == 403 and "DNS rebinding" in answer["error"] and "--allow-remote" in answer["error"], host
    code, answer = _raw(url, "GET", "/info", {})  # no Host at all
    assert code == 403
    evil_post = {"Host": f"evil.example:{port}", **_NPZ, "Content-Length": 9}
    code, answer = _raw(url, "POST", "/score", evil_post, b"not a npz")
    assert code == 403
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "127.0.0.2", f"[::1]:{port}", "LOCALHOST"):
        code, answer = _raw(url, "GET", "/health", {"Host": host})
        assert (code, answer) == (200, _HEALTHY), host
    _score_ok(url)
    assert host_header_is_loopback("[::1]") and host_header_is_loopback("::1")
    assert not host_header_is_loopback("[::1]:x") and not host_header_is_loopback("127.0.0.1:80:80")
    assert not host_header_is_loopback("") and not host_header_is_loopback(None)


def test_allow_remote_accepts_any_host():
    server = make_server(CallableReward(lambda x: x.sum(dim=1), name="coordinate_sum"), allow_remote=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        code, answer = _raw(server.url, "GET", "/health", {"Host": "rebound.example:80"})
        assert (code, answer) == (200, _HEALTHY)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_score_needs_the_npz_content_type(jpeg_server):
    url, _ = jpeg_server
    body = encode_batch(torch.zeros(2, 3, 8, 8))
    code, answer = _post(url + "/score", body, {"Content-Type": "application/x-www-form-urlencoded"})
    assert code == 415 and "application/x-npz" in answer["error"]
    code, answer = _raw(url, "POST", "/score", {"Host": _host(url), "Content-Length": len(body)}, body)
    assert code == 415 and "got 'none'" in answer["error"]
    code, answer = _post(url + "/score", body, {"Content-Type": "Application/X-NPZ; charset=binary"})
    assert code == 200 and len(answer["rewards"]) == 2
    _score_ok(url)


def test_body_over_the_cap_is_413_before_it_is_read(jpeg_server):
    url, _ = jpeg_server
    start = time.monotonic()
    # 2 MiB announced, none sent: the answer cannot wait for the body
    code, answer = _raw(url, "POST", "/score", {"Host": _host(url), **_NPZ, "Content-Length": 2 << 20}, timeout=5)
    assert code == 413 and "--max-body-mb" in answer["error"] and "reward_batch_size" in answer["error"]
    assert time.monotonic() - start < 3
    # a real 16 MiB body, more than the sockets buffer: the server discards it for a moment after its 413,
    # so the client reads the answer instead of a broken pipe
    remote = HTTPReward(url, retries=2)
    with pytest.raises(ValueError, match=r"limit of 1048576 .*lower config reward_batch_size"):
        remote(torch.zeros(1400, 3, 32, 32))
    assert remote.score_requests == 1  # a 4xx is not retried
    _score_ok(url)


def _wait_until_idle(url, timeout=10.0):
    """Returns once the server holds no connection but the asking one (earlier tests' have left)."""
    deadline = time.monotonic() + timeout
    while True:
        code, answer = _raw(url, "GET", "/health", {"Host": _host(url)})
        if code == 200 and answer["connections"] == {"served": 1, "refused": 0}:
            return  # _raw read to the close, and a served slot is free before its close: all slots are free
        assert time.monotonic() < deadline, f"the server still holds connections: {code} {answer}"
        time.sleep(0.05)


def test_excess_connections_get_503_and_the_server_stays_up(jpeg_server):
    """max_connections served, as many more told 503, any beyond closed at once; then it serves again.

    The server takes connections in the order they arrive. The state is set up, not waited for: every
    slot is free at the start (asked), and the 503 probe keeps its socket open, so its slot stays taken
    while the server lingers on it (2 s), far longer than the next connection takes to arrive."""
    url, _ = jpeg_server
    _wait_until_idle(url)
    held = [socket.create_connection(_address(url), timeout=10) for _ in range(_SLOTS)]  # silent: served slots
    held += [socket.create_connection(_address(url), timeout=10) for _ in range(_SLOTS - 1)]  # silent: 503 slots
    try:
        probe = socket.create_connection(_address(url), timeout=5)  # the last 503 slot
        held.append(probe)
        probe.sendall(f"GET /health HTTP/1.1\r\nHost: {_host(url)}\r\n\r\n".encode("latin-1"))
        code, answer = _parse(_read_answer(probe, timeout=5))  # the answer, then the server's half-close
        assert code == 503 and "--max-connections" in answer["error"]
        start = time.monotonic()
        with socket.create_connection(_address(url), timeout=5) as extra:
            assert _read_answer(extra, timeout=5) == b""
        assert time.monotonic() - start < 1, "a connection beyond both limits was not closed at once"
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while _raw(url, "GET", "/health", {"Host": _host(url)})[0] != 200:
        assert time.monotonic() < deadline, "the server did not serve again after the connections closed"
        time.sleep(0.1)
    _score_ok(url)


def test_the_client_sends_stored_members_only():
    body = encode_batch(torch.rand(2, 3, 4, 4), ["a", "b"])
    infos = zipfile.ZipFile(io.BytesIO(body)).infolist()
    assert sorted(i.filename for i in infos) == ["prompts.npy", "samples.npy"]
    assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's peak RSS from /proc")
def test_zip_bomb_is_refused_before_it_inflates(prompt_server):
    """0.2 MB of deflated zeros that would inflate to 210 MB: refused unread; the server's peak memory stays put."""
    pid = _get(prompt_server + "/info")["pid"]
    bomb = _npz({"samples.npy": _npy(np.zeros((1, 52_500_000), np.float32))}, zipfile.ZIP_DEFLATED)
    assert len(bomb) < 300_000
    before = _peak_rss_mb(pid)
    code, answer = _post(prompt_server + "/score", bomb)
    grown = _peak_rss_mb(pid) - before
    assert grown < 32, f"the server's peak RSS grew {grown:.0f} MiB on a 210 MB zip bomb"
    assert code == 400 and "compressed" in answer["error"] and "savez_compressed" in answer["error"]
    images = torch.rand(2, 3, 4, 4)
    assert torch.equal(HTTPReward(prompt_server)(images, ["a", "b"]), PromptBrightness()(images, ["a", "b"]))


def test_arrays_are_checked_before_they_are_read(jpeg_server):
    url, _ = jpeg_server
    small = np.zeros((1, 3, 8, 8), np.float32)
    # a zip header declaring 2 GiB for a stored member: over the 1 MiB cap
    body = bytearray(_npz({"samples.npy": _npy(small)}))
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = body.index(signature) + offset
        body[at:at + 4] = (2 << 30).to_bytes(4, "little")
    code, answer = _post(url + "/score", bytes(body))
    assert code == 413 and "declares 2147483648 bytes" in answer["error"]
    # an .npy header declaring 300 M floats over 768 bytes of data
    code, answer = _post(url + "/score", _npz({"samples.npy": _npy(small, shape=(300_000_000,))}))
    assert code == 400 and "declares shape [300000000]" in answer["error"] and "holds 768 bytes" in answer["error"]
    for array in (np.array([b"ab", b"cd"]), np.array([1.0, "x"], dtype=object),
                  np.zeros(2, dtype=[("a", np.float32)]), np.array(["2024-01-01"], dtype="datetime64[D]")):
        code, answer = _post(url + "/score", _npz({"samples.npy": _npy(array)}))
        assert code == 400 and "only plain numeric arrays" in answer["error"], array.dtype
    code, answer = _post(url + "/score", _npz({"samples.npy": _npy(small), "extra.npy": _npy(small)}))
    assert code == 400 and "unknown arrays ['extra']" in answer["error"]
    _score_ok(url)


def test_limit_flags_are_checked(capsys):
    base = ["reward-server", "--reward", "jpeg_compressibility"]
    assert cli.main(base + ["--max-body-mb", "0"]) == 2
    assert "--max-body-mb" in capsys.readouterr().err
    assert cli.main(base + ["--max-connections", "0"]) == 2
    assert "--max-connections" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_body_mb"):
        make_server(JPEGCompressibility(), max_body_mb=float("nan"))
