"""``orwcfm-fast reward-server``: any registered reward served over HTTP, for trainers in other processes.

A reward that needs its own process, GPU or dependencies runs as a server::

    orwcfm-fast reward-server --reward clip --port 8765 --set 'text_prompts=["a cat", "a dog"]'

and the trainer uses it with config ``reward: "http://127.0.0.1:8765"``
(:class:`~orwcfm_fast.rewards.http.HTTPReward`; the protocol is described there). The server builds the
reward once and scores one batch at a time (a lock), under ``torch.no_grad``. It listens on loopback
only unless told otherwise: it has no authentication.

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

from orwcfm_fast.rewards.http import PROTOCOL, is_loopback

__all__ = ["RewardServer", "add_parser", "check_host", "is_loopback", "make_server", "run", "serve"]

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


class RewardServer(ThreadingHTTPServer):
    """A threading HTTP server around one reward (see :func:`make_server`).

    Attributes:
        reward: the served :class:`~orwcfm_fast.rewards.base.Reward` (or callable).
        reward_name: its name in ``/info`` and the ready line.
        device: where incoming samples are put.
        url: ``http://HOST:PORT`` with the real port.
    """

    daemon_threads = True  # a request still scoring does not hold up the exit
    block_on_close = False

    def __init__(self, address, reward, name: str, device, verbose: bool = False):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        from orwcfm_fast.rewards.base import accepts_prompts

        self.reward = reward
        self.reward_name = name
        self.device = device
        self.verbose = verbose
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

    def score(self, body: bytes) -> list:
        """Rewards of one ``POST /score`` body.

        Raises:
            _BadInput: the body or the reward rejected the input (HTTP 400).
            _BadOutput: the reward's output fails ``check_rewards`` (HTTP 500).
            Exception: anything else the reward raised (HTTP 500).
        """
        import torch

        from orwcfm_fast.rewards.base import check_rewards
        from orwcfm_fast.rewards.http import decode_batch

        try:
            array, prompts = decode_batch(body)
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


class _BadInput(Exception):
    """A request the reward cannot score as sent: answered 400, not retried by the client."""


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

    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/") or "/"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self._path()
        if path == "/info":
            self._send(200, self.server.info)
        elif path == "/health":
            self._send(200, {"ok": True})
        elif path == "/score":
            self._send(405, {"error": "POST /score with an .npz body (samples float32 [B, ...], optional prompts)"})
        else:
            self._send(404, {"error": f"no {path}; endpoints: GET /info, GET /health, POST /score"})

    def do_POST(self) -> None:  # noqa: N802
        path = self._path()
        if path != "/score":
            self._send(404, {"error": f"no POST {path}; endpoints: GET /info, GET /health, POST /score"})
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
            if length < 0:
                raise ValueError
        except ValueError:
            self._send(411, {"error": "POST /score needs a Content-Length header"})
            return
        body = self.rfile.read(length)
        start = time.perf_counter()
        try:
            rewards = self.server.score(body)
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


def make_server(reward, host: str = "127.0.0.1", port: int = 0, *, name: Optional[str] = None, device=None,
                allow_remote: bool = False, verbose: bool = False) -> RewardServer:
    """A bound (listening) :class:`RewardServer` for ``reward``; run it with ``serve_forever()``.

    Args:
        reward: a :class:`~orwcfm_fast.rewards.base.Reward` or callable ``samples -> [B]``
            (``(samples, prompts) -> [B]`` for rewards that take prompts).
        host: address to listen on; loopback unless ``allow_remote``.
        port: TCP port; 0 picks a free one (``server.url`` has the real one).
        name: the reward's name in ``/info`` (default: its ``name`` attribute or class name).
        device: where incoming samples go (default: the reward's parameters' device, else the CPU).
        allow_remote: listen on a non-loopback address (the server is unauthenticated).
        verbose: log every request to stderr.

    Raises:
        ValueError: a non-loopback ``host`` without ``allow_remote``, or a port outside 0..65535.
        OSError: the address is in use or cannot be bound.
    """
    check_host(host, allow_remote)
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"port must be in 0..65535 (0: a free one), got {port}")
    name = name or str(getattr(reward, "name", None) or type(reward).__name__)
    return RewardServer((host.strip("[]"), int(port)), reward, name, _reward_device(reward, device), verbose)


def serve(reward, host: str = "127.0.0.1", port: int = 0, *, name: Optional[str] = None, device=None,
          allow_remote: bool = False, verbose: bool = False,
          ready: Optional[Callable[[RewardServer], None]] = None) -> None:
    """Serves ``reward`` until SIGINT or SIGTERM (from the main thread) or ``server.shutdown()``.

    Prints ``reward-server: serving NAME on http://HOST:PORT`` (stdout, flushed) once listening; the
    other arguments are :func:`make_server`'s. ``ready(server)``, if given, is called then too.
    """
    server = make_server(reward, host, port, name=name, device=device, allow_remote=allow_remote, verbose=verbose)
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
                        help="allow a non-loopback --host: the server has no authentication, use a trusted network")
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
              verbose=args.verbose)
    except OSError as err:
        print(f"{_PROG}: error: cannot listen on {args.host}:{args.port}: {err.strerror or err}", file=sys.stderr)
        return 2
    return 0
