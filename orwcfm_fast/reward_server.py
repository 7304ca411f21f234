"""``orwcfm-fast reward-server``: any registered reward served over HTTP, for trainers in other processes.

A reward that needs its own process, GPU or dependencies runs as a server::

    orwcfm-fast reward-server --reward clip --port 8765 --set 'text_prompts=["a cat", "a dog"]'

and the trainer uses it with config ``reward: "http://127.0.0.1:8765"``
(:class:`~orwcfm_fast.rewards.http.HTTPReward`; the protocol is described there). The server builds the
reward once and scores one batch at a time (a lock), under ``torch.no_grad``. It listens on loopback
only unless told otherwise: it has no authentication.

Hostile input is refused before it costs memory or the reward's time, and the server stays up:

- a ``Host`` header that is not loopback (``127.0.0.0/8``, ``localhost``, ``[::1]``, with or without a
  port): 403 unless ``--allow-remote``. A web page cannot reach a loopback server through a DNS name
  rebound to 127.0.0.1 (DNS rebinding), since the browser sends that name as the ``Host``;
- ``POST /score`` without ``Content-Type: application/x-npz``: 415;
- a body over ``--max-body-mb`` (default :data:`DEFAULT_MAX_BODY_MB` MiB): 413, from its
  ``Content-Length``, before the body is read;
- an ``.npz`` with a compressed (deflated) member, a member whose declared size exceeds the cap (413),
  a header that does not match its data, or a dtype that is not plain numeric or unicode (objects,
  records, bytes; pickles are never loaded): 400, before the member's data is read
  (:func:`~orwcfm_fast.rewards.http.decode_batch`);
- more than ``--max-connections`` open connections (default :data:`DEFAULT_MAX_CONNECTIONS`): the excess
  get 503 (the client retries with backoff), or are closed at once when as many again are waiting.

Memory for bodies is at most about ``2 * max_body * max_connections`` (each body and its array).

From Python: :func:`serve` (blocks until SIGINT/SIGTERM), or :func:`make_server` for a server object
to run in a thread (``server.serve_forever()`` / ``server.shutdown()``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Optional

from orwcfm_fast.rewards.http import NPZ_CONTENT_TYPE, PROTOCOL, BatchTooLarge, is_loopback

__all__ = ["DEFAULT_MAX_BODY_MB", "DEFAULT_MAX_CONNECTIONS", "RewardServer", "add_parser", "check_host",
           "host_header_is_loopback", "is_loopback", "make_server", "run", "serve"]

#: the largest ``POST /score`` body accepted by default, in MiB (``--max-body-mb``)
DEFAULT_MAX_BODY_MB = 1024.0
#: connections served at once by default (``--max-connections``); as many more get a 503
DEFAULT_MAX_CONNECTIONS = 32
#: seconds a refused connection (413, 503) is given to finish sending and read its answer
_LINGER_S = 2.0
_CHUNK = 1 << 16

#: the one line printed (to stdout, flushed) once the server listens
READY_LINE = "reward-server: serving {name} on {url}"
_PROG = "orwcfm-fast reward-server"


def check_host(host: str, allow_remote: bool = False) -> None:
    """Refuses a non-loopback ``host`` unless ``allow_remote``.

    Raises:
        ValueError: saying why (the server is unauthenticated) and what to do instead.
    """
    if not is_loopback(host) and not allow_remote:
        raise ValueError(
            f"refusing to serve on {host!r}: the reward server is unauthenticated, so anyone who can reach the "
            "port could run the reward (and its GPU). Serve on 127.0.0.1 (reach it from other machines through "
            "an SSH tunnel), or pass --allow-remote / allow_remote=True on a trusted network")


def host_header_is_loopback(value: Optional[str]) -> bool:
    """Whether an HTTP ``Host`` header names a loopback host: ``127.x.y.z``, ``localhost`` or ``[::1]``,
    with an optional ``:port``. A missing or malformed header is not."""
    if not value:
        return False
    value = value.strip()
    if value.startswith("["):  # [v6]:port
        host, _, rest = value[1:].partition("]")
        port_ok = rest == "" or (rest.startswith(":") and rest[1:].isdigit())
        return port_ok and is_loopback(host)
    host, colon, port = value.rpartition(":")
    if not colon or ":" in host:  # no port, or a bare IPv6 address
        return is_loopback(value)
    return port.isdigit() and is_loopback(host)


def _linger(sock: socket.socket, seconds: float = _LINGER_S) -> None:
    """Half-closes ``sock`` after an early answer and discards what the client still sends, for at most
    ``seconds``: a client still uploading its body then reads the answer instead of a connection reset."""
    deadline = time.monotonic() + seconds
    try:
        sock.shutdown(socket.SHUT_WR)
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(_CHUNK):
                return
    except OSError:  # timeout, reset: done either way
        pass


class RewardServer(ThreadingHTTPServer):
    """A threading HTTP server around one reward (see :func:`make_server`).

    Attributes:
        reward: the served :class:`~orwcfm_fast.rewards.base.Reward` (or callable).
        reward_name: its name in ``/info`` and the ready line.
        device: where incoming samples are put.
        url: ``http://HOST:PORT`` with the real port.
        allow_remote: whether any ``Host`` header is accepted (else loopback ones only).
        max_body_bytes: the largest ``POST /score`` body (and declared array) accepted.
        max_connections: connections served at once; as many more get a 503, any beyond are closed.
    """

    daemon_threads = True  # a request still scoring does not hold up the exit
    block_on_close = False

    def __init__(self, address, reward, name: str, device, verbose: bool = False, *, allow_remote: bool = False,
                 max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 2 ** 20),
                 max_connections: int = DEFAULT_MAX_CONNECTIONS):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        from orwcfm_fast.rewards.base import accepts_prompts

        self.reward = reward
        self.reward_name = name
        self.device = device
        self.verbose = verbose
        self.allow_remote = bool(allow_remote)
        self.max_body_bytes = int(max_body_bytes)
        self.max_connections = int(max_connections)
        self._slots = threading.BoundedSemaphore(self.max_connections)  # connections being served
        self._busy_slots = threading.BoundedSemaphore(self.max_connections)  # connections being told 503
        self._open = {"served": 0, "refused": 0}  # connections holding a slot of each kind (GET /health)
        self._open_lock = threading.Lock()
        self.lock = threading.Lock()  # one reward forward at a time
        rng = getattr(reward, "input_range", None)
        self.info = {
            "reward": name,
            "input_range": None if rng is None else [float(rng[0]), float(rng[1])],
            "takes_prompts": bool(accepts_prompts(reward)),
            "pid": os.getpid(),
            "device": str(device),
            "protocol": PROTOCOL,
        }
        host, port = self.server_address[:2]
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    # ------------------------------------------------------------------ connections

    def process_request(self, request, client_address) -> None:
        """Serves the connection in a thread if one of ``max_connections`` slots is free; else answers 503
        in a thread if as many refusals are not already under way; else closes it at once.

        A served connection's slot is free again before its socket is closed, so a client that has read
        its answer to the end can count on that slot; ``GET /health`` reports the slots in use."""
        if self._slots.acquire(blocking=False):
            target, slots, kind = self._serve_connection, self._slots, "served"
        elif self._busy_slots.acquire(blocking=False):
            target, slots, kind = self._refuse_connection, self._busy_slots, "refused"
        else:
            self.shutdown_request(request)
            return
        self._count(kind, +1)
        try:
            threading.Thread(target=target, args=(request, client_address), daemon=True).start()
        except BaseException:  # no thread: nothing will release the slot or close the socket
            self._release(slots, kind)
            self.shutdown_request(request)
            raise

    def open_connections(self) -> dict:
        """``{"served": n, "refused": m}``: connections holding a serving slot (the asking one included) and
        connections being told 503, at this moment."""
        with self._open_lock:
            return dict(self._open)

    def _count(self, kind: str, step: int) -> None:
        with self._open_lock:
            self._open[kind] += step

    def _release(self, slots: threading.BoundedSemaphore, kind: str) -> None:
        self._count(kind, -1)
        slots.release()

    def _serve_connection(self, request, client_address) -> None:
        try:  # ThreadingMixIn.process_request_thread, with the slot freed before the close
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self._release(self._slots, "served")
            self.shutdown_request(request)

    def _refuse_connection(self, request, client_address) -> None:
        """Answers 503 to a connection over ``max_connections``, within about ``2 * _LINGER_S`` seconds."""
        try:
            _read_head(request, time.monotonic() + _LINGER_S)
            body = json.dumps({"error": f"the reward server is busy: {self.max_connections} connections are "
                                        "open (its --max-connections); retry later"}).encode("utf-8")
            request.settimeout(_LINGER_S)
            request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                            b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                            % (len(body), body))
            _linger(request)
        except OSError:
            pass
        finally:
            self._release(self._busy_slots, "refused")
            self.shutdown_request(request)
        if self.verbose:
            print(f"reward-server: refused a connection from {client_address[0]} (503, busy)", file=sys.stderr)

    # ------------------------------------------------------------------ scoring

    def score(self, body: bytes) -> list:
        """Rewards of one ``POST /score`` body.

        Raises:
            _TooLarge: an array declares more than ``max_body_bytes`` (HTTP 413).
            _BadInput: the body or the reward rejected the input (HTTP 400).
            _BadOutput: the reward's output fails ``check_rewards`` (HTTP 500).
            Exception: anything else the reward raised (HTTP 500).
        """
        import torch

        from orwcfm_fast.rewards.base import check_rewards
        from orwcfm_fast.rewards.http import decode_batch

        try:
            array, prompts = decode_batch(body, self.max_body_bytes)
        except BatchTooLarge as err:
            raise _TooLarge(str(err)) from None
        except ValueError as err:
            raise _BadInput(str(err)) from None
        samples = torch.from_numpy(array).to(self.device)
        with self.lock, torch.no_grad():
            try:
                if prompts is not None and self.info["takes_prompts"]:
                    out = self.reward(samples, prompts)
                else:
                    out = self.reward(samples)
            except ValueError as err:  # the reward's own input check (shape, channels, ...)
                raise _BadInput(f"reward {self.reward_name!r} rejected samples {list(samples.shape)}: {err}") from None
            try:
                rewards = check_rewards(out, samples.shape[0])
            except ValueError as err:
                raise _BadOutput(f"reward {self.reward_name!r} returned a bad output: {err}") from None
        return rewards.cpu().tolist()


def _read_head(sock: socket.socket, deadline: float) -> None:
    """Reads (and drops) a request's line and headers, until a blank line, 64 KiB or ``deadline``."""
    seen = b""
    while b"\r\n\r\n" not in seen and len(seen) < _CHUNK and (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        chunk = sock.recv(_CHUNK)
        if not chunk:
            return
        seen += chunk


class _BadInput(Exception):
    """A request the reward cannot score as sent: answered 400, not retried by the client."""


class _TooLarge(Exception):
    """An array declares more bytes than the server accepts: answered 413, not retried."""


class _BadOutput(Exception):
    """The reward's output failed ``check_rewards``: answered 500 (the message is the whole story)."""


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    server_version = "orwcfm-fast-reward-server"
    timeout = 600  # seconds a silent client may hold its connection (socket reads and writes)

    def _send(self, code: int, payload: dict) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its reward_timeout) meanwhile
            print(f"reward-server: a client left before its answer ({self.command} {self.path}, HTTP {code})",
                  file=sys.stderr, flush=True)

    def _refuse(self, code: int, message: str) -> None:
        """Answers an early error (the body, if any, unread) and closes the connection gently."""
        self.close_connection = True
        self._send(code, {"error": message})
        _linger(self.connection)

    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/") or "/"

    def _refused_host(self) -> bool:
        """Answers 403 (and returns True) when the ``Host`` header is not loopback and remote hosts are not
        allowed: the DNS-rebinding defence."""
        host = self.headers.get("Host")
        if self.server.allow_remote or host_header_is_loopback(host):
            return False
        self._refuse(403, f"Host header {host!r} is not a loopback host (127.0.0.1, localhost, [::1]); the "
                          "reward server answers loopback names only unless started with --allow-remote (a "
                          "defence against DNS rebinding)")
        return True

    def _content_type_ok(self) -> bool:
        """Answers 415 (and returns False) unless the body is declared ``application/x-npz``."""
        declared = self.headers.get("Content-Type", "")
        if declared.split(";", 1)[0].strip().lower() == NPZ_CONTENT_TYPE:
            return True
        self._refuse(415, f"POST /score takes Content-Type: {NPZ_CONTENT_TYPE} (a numpy.savez body), got "
                          f"{declared or 'none'!r}")
        return False

    def _content_length(self) -> Optional[int]:
        """The body's length, or None after answering 411 (missing, bad) or 413 (over ``max_body_bytes``;
        the body is not read, only discarded for a moment so the client can read the answer)."""
        try:
            length = int(self.headers.get("Content-Length", ""))
            if length < 0:
                raise ValueError
        except ValueError:
            self._refuse(411, "POST /score needs a Content-Length header")
            return None
        cap = self.server.max_body_bytes
        if length > cap:
            self._refuse(413, f"the body has {length} bytes, more than this server's limit of {cap} "
                              f"({cap / 2 ** 20:g} MiB, its --max-body-mb); lower config reward_batch_size, "
                              "or raise --max-body-mb")
            return None
        return length

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self._refused_host():
            return
        path = self._path()
        if path == "/info":
            self._send(200, self.server.info)
        elif path == "/health":
            self._send(200, {"ok": True, "connections": self.server.open_connections()})
        elif path == "/score":
            self._send(405, {"error": "POST /score with an .npz body (samples float32 [B, ...], optional prompts)"})
        else:
            self._send(404, {"error": f"no {path}; endpoints: GET /info, GET /health, POST /score"})

    def do_POST(self) -> None:  # noqa: N802
        if self._refused_host():
            return
        path = self._path()
        if path != "/score":
            self._refuse(404, f"no POST {path}; endpoints: GET /info, GET /health, POST /score")
            return
        if not self._content_type_ok():
            return
        length = self._content_length()
        if length is None:
            return
        body = self.rfile.read(length)
        if len(body) < length:
            self._send(400, {"error": f"the body ended after {len(body)} of its {length} bytes (Content-Length)"})
            return
        start = time.perf_counter()
        try:
            rewards = self.server.score(body)
        except _TooLarge as err:
            self._send(413, {"error": str(err)})
            return
        except _BadInput as err:
            self._send(400, {"error": str(err)})
            return
        except _BadOutput as err:
            print(f"reward-server: {err}", file=sys.stderr, flush=True)
            self._send(500, {"error": str(err)})
            return
        except Exception as err:
            print(f"reward-server: {self.server.reward_name} failed on a batch:", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            sys.stderr.flush()
            self._send(500, {"error": f"reward {self.server.reward_name!r} raised {type(err).__name__}: {err}"})
            return
        self._send(200, {"rewards": rewards, "seconds": time.perf_counter() - start})

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        if self.server.verbose:
            super().log_message(format, *args)


def _reward_device(reward, device):
    import torch

    if device is not None:
        return torch.device(device)
    if isinstance(reward, torch.nn.Module):
        for tensor in list(reward.parameters()) + list(reward.buffers()):
            return tensor.device
    return torch.device("cpu")


def _check_limits(max_body_mb: float, max_connections: int) -> None:
    """Raises ValueError unless ``max_body_mb > 0`` and ``max_connections >= 1``."""
    if not 0 < float(max_body_mb) < 2 ** 43:  # NaN and inf fail too
        raise ValueError(f"max_body_mb (--max-body-mb) must be a number of MiB > 0, got {max_body_mb!r}")
    if int(max_connections) != max_connections or int(max_connections) < 1:
        raise ValueError(f"max_connections (--max-connections) must be an integer >= 1, got {max_connections!r}")


def make_server(reward, host: str = "127.0.0.1", port: int = 0, *, name: Optional[str] = None, device=None,
                allow_remote: bool = False, verbose: bool = False, max_body_mb: float = DEFAULT_MAX_BODY_MB,
                max_connections: int = DEFAULT_MAX_CONNECTIONS) -> RewardServer:
    """A bound (listening) :class:`RewardServer` for ``reward``; run it with ``serve_forever()``.

    Args:
        reward: a :class:`~orwcfm_fast.rewards.base.Reward` or callable ``samples -> [B]``
            (``(samples, prompts) -> [B]`` for rewards that take prompts).
        host: address to listen on; loopback unless ``allow_remote``.
        port: TCP port; 0 picks a free one (``server.url`` has the real one).
        name: the reward's name in ``/info`` (default: its ``name`` attribute or class name).
        device: where incoming samples go (default: the reward's parameters' device, else the CPU).
        allow_remote: listen on a non-loopback address, and answer requests whose ``Host`` header is not
            loopback (the server is unauthenticated).
        verbose: log every request to stderr.
        max_body_mb: the largest ``POST /score`` body, in MiB (413 above it, before reading it).
        max_connections: connections served at once (503 for the excess).

    Raises:
        ValueError: a non-loopback ``host`` without ``allow_remote``, a port outside 0..65535,
            ``max_body_mb <= 0`` or ``max_connections < 1``.
        OSError: the address is in use or cannot be bound.
    """
    check_host(host, allow_remote)
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"port must be in 0..65535 (0: a free one), got {port}")
    _check_limits(max_body_mb, max_connections)
    name = name or str(getattr(reward, "name", None) or type(reward).__name__)
    return RewardServer((host.strip("[]"), int(port)), reward, name, _reward_device(reward, device), verbose,
                        allow_remote=allow_remote, max_body_bytes=int(float(max_body_mb) * 2 ** 20),
                        max_connections=int(max_connections))


def serve(reward, host: str = "127.0.0.1", port: int = 0, *, name: Optional[str] = None, device=None,
          allow_remote: bool = False, verbose: bool = False, max_body_mb: float = DEFAULT_MAX_BODY_MB,
          max_connections: int = DEFAULT_MAX_CONNECTIONS,
          ready: Optional[Callable[[RewardServer], None]] = None) -> None:
    """Serves ``reward`` until SIGINT or SIGTERM (from the main thread) or ``server.shutdown()``.

    Prints ``reward-server: serving NAME on http://HOST:PORT`` (stdout, flushed) once listening; the
    other arguments are :func:`make_server`'s. ``ready(server)``, if given, is called then too.
    """
    server = make_server(reward, host, port, name=name, device=device, allow_remote=allow_remote, verbose=verbose,
                         max_body_mb=max_body_mb, max_connections=max_connections)
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, name="reward-server", daemon=True)
    thread.start()
    try:
        print(READY_LINE.format(name=server.reward_name, url=server.url), flush=True)
        if ready is not None:
            ready(server)
        while thread.is_alive() and not stop.wait(0.5):
            pass
    finally:
        server.shutdown()
        server.server_close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print(f"reward-server: stopped serving {server.reward_name}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- command line


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the ``reward-server`` command to ``orwcfm-fast``'s subparsers."""
    from orwcfm_fast.train_run import parse_assignment

    parser = subparsers.add_parser(
        "reward-server",
        help="serve a registered reward over HTTP (config reward: \"http://127.0.0.1:PORT\")",
        description=(
            "Build a registered reward once and serve it over HTTP, so trainers in other processes (or on a\n"
            "different GPU, or without its dependencies) use it with config reward: \"http://HOST:PORT\".\n"
            "Prints 'reward-server: serving NAME on http://HOST:PORT' once listening; stops on SIGINT/SIGTERM.\n"
            "Endpoints: GET /info, GET /health, POST /score (see orwcfm_fast.rewards.http)."
        ),
        epilog=(
            "examples:\n"
            "  orwcfm-fast reward-server --reward jpeg_compressibility --port 8765\n"
            "  orwcfm-fast reward-server --reward clip --port 8766 --device cuda:1 \\\n"
            "      --set 'text_prompts=[\"a photo of a cat\", \"a photo of a dog\"]'\n"
            "  orwcfm-fast reward-server --import my_rewards --reward my_reward --port 0"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--reward", metavar="NAME", required=True,
                        help="registered reward to serve (see --import for your own)")
    parser.add_argument("--port", type=int, default=0, help="TCP port; 0 (default): a free one, printed")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1); non-loopback needs --allow-remote")
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow a non-loopback --host, and requests whose Host header is not loopback (else "
                             "403, a defence against DNS rebinding): the server has no authentication, use a "
                             "trusted network")
    parser.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB, metavar="MIB",
                        help=f"largest POST /score body in MiB (default {DEFAULT_MAX_BODY_MB:g}); larger ones get "
                             "413 before they are read")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS, metavar="N",
                        help=f"connections served at once (default {DEFAULT_MAX_CONNECTIONS}); the excess get "
                             "503 and clients retry")
    parser.add_argument("--device", default=None, help="torch device of the reward; default: cuda if available, else cpu")
    parser.add_argument("--config", metavar="FILE.json", action="append", default=None,
                        help="JSON object of config keys for the reward (repeatable; later files override earlier)")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", type=parse_assignment, default=None,
                        help="one config key (repeatable, after --config), e.g. jpeg_quality=80 or "
                             "'reward_paths={\"pickscore\": \"/models/pickscore\"}'; VALUE parsed as JSON, else a string")
    parser.add_argument("--import", dest="imports", metavar="MODULE", action="append", default=None,
                        help="import a module (name, or path to a .py file) that registers rewards with "
                             "orwcfm_fast.rewards.register_reward, before --reward is looked up (repeatable)")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    return parser


class _UsageError(Exception):
    pass


def _import(spec: str) -> None:
    if spec.endswith(".py") or os.sep in spec:
        path = Path(spec)
        if not path.is_file():
            raise _UsageError(f"--import {spec!r}: no such file")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[path.stem] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception:
            sys.modules.pop(path.stem, None)
            raise
        return
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # `--import my_rewards` finds ./my_rewards.py, as `python -m` would
    try:
        importlib.import_module(spec)
    except ModuleNotFoundError as err:
        if err.name and spec.startswith(err.name):
            raise _UsageError(f"--import {spec!r}: no module named {err.name!r} (on PYTHONPATH or in the current "
                              "folder); a file path ending in .py works too") from None
        raise


def _config(args: argparse.Namespace) -> dict:
    from orwcfm_fast.config import ConfigError, validate_config
    from orwcfm_fast.train_run import UsageError, read_config_file

    config: dict = {}
    try:
        for path in args.config or ():
            config.update(read_config_file(path))
    except UsageError as err:
        raise _UsageError(str(err)) from None
    for key, value in args.set or ():
        config[key] = value
    try:
        return validate_config(config)
    except ConfigError as err:
        raise _UsageError(str(err)) from None


def _check_name(name: str) -> None:
    from orwcfm_fast.rewards.registry import unknown_reward_hint

    if name.strip().lower().startswith(("http://", "https://")):
        raise _UsageError(f"--reward {name!r}: a reward server serves a registered reward by name, not a URL")
    hint = unknown_reward_hint(name)
    if hint is not None:
        raise _UsageError(f"unknown reward {name!r} (--reward){hint}; --import MODULE registers your own first")


def run(args: argparse.Namespace) -> int:
    """Runs ``orwcfm-fast reward-server`` with parsed ``args``.

    Returns:
        0 after SIGINT/SIGTERM; 2 for a bad command line or config (the message on stderr).
    """
    try:
        check_host(args.host, args.allow_remote)  # before any reward is built
        if not 0 <= args.port <= 65535:
            raise _UsageError(f"--port must be in 0..65535 (0: a free one), got {args.port}")
        _check_limits(args.max_body_mb, args.max_connections)
        config = _config(args)
        for spec in args.imports or ():
            _import(spec)
        _check_name(args.reward)
    except (_UsageError, ValueError) as err:
        print(f"{_PROG}: error: {err}", file=sys.stderr)
        return 2

    import torch

    from orwcfm_fast.rewards import make_reward

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        print(f"{_PROG}: error: --device {args.device!r}: {err}", file=sys.stderr)
        return 2
    try:
        reward = make_reward(args.reward, config, device)
    except (ValueError, TypeError) as err:
        print(f"{_PROG}: error: cannot build reward {args.reward!r}: {err}", file=sys.stderr)
        return 2
    if isinstance(reward, torch.nn.Module):
        reward.eval()
    name = args.reward.strip().lower().replace("-", "_")
    try:
        serve(reward, args.host, args.port, name=name, device=device, allow_remote=args.allow_remote,
              verbose=args.verbose, max_body_mb=args.max_body_mb, max_connections=args.max_connections)
    except OSError as err:
        print(f"{_PROG}: error: cannot listen on {args.host}:{args.port}: {err.strerror or err}", file=sys.stderr)
        return 2
    return 0
