"""A reward served by another process: the HTTP client of ``orwcfm-fast reward-server``.

Config ``reward: "http://127.0.0.1:PORT"`` (or a term of a reward dict) builds an :class:`HTTPReward`.
At construction it asks the server which reward it serves (``GET /info``) and takes on that reward's
:attr:`~orwcfm_fast.rewards.base.Reward.input_range` and
:attr:`~orwcfm_fast.rewards.base.Reward.takes_prompts`, so :func:`~orwcfm_fast.rewards.base.score_terms`
converts the images to what the served reward expects; the server never guesses.

Protocol (version :data:`PROTOCOL`, served by :mod:`orwcfm_fast.reward_server`):

- ``GET /info`` -> JSON ``{"reward", "input_range" ([low, high] or null), "takes_prompts", "pid",
  "device", "protocol"}``; ``GET /health`` -> ``{"ok": true}``.
- ``POST /score`` with an ``.npz`` body (``numpy.savez``: uncompressed, read with ``allow_pickle=False``)
  and ``Content-Type: application/x-npz``: ``samples``, float32 ``[B, *sample_shape]``, and optionally
  ``prompts``, a unicode array ``[B]``. :func:`decode_batch` checks every member before reading it
  (stored, not deflated; a plain numeric or unicode ``.npy`` whose header matches its size). Answer 200 with
  JSON ``{"rewards": [B floats]}``; 400 ``{"error": msg}`` when the request or the reward rejects the
  input, and 403 (a ``Host`` header that is not loopback), 413 (a body or array over the server's
  ``--max-body-mb``) or 415 (another ``Content-Type``) likewise (not retried: raised here as
  ``ValueError``); 500 ``{"error": msg}`` when the reward fails and 503 when the server is busy (its
  ``--max-connections``): both retried, like connection errors and timeouts.
"""

from __future__ import annotations

import io
import ipaddress
import json
import math
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Mapping
from typing import Any, Optional, Sequence, Tuple

import numpy as np
import torch

from orwcfm_fast.rewards.base import Reward

__all__ = ["HTTPReward", "RewardServerError", "BatchTooLarge", "PROTOCOL", "NPZ_CONTENT_TYPE", "encode_batch",
           "decode_batch", "is_loopback"]

#: version of the wire protocol; the server reports its own in ``/info``
PROTOCOL = 1

#: seconds before the first retry; doubled for each further one, at most :data:`_MAX_BACKOFF`
_FIRST_BACKOFF = 0.5
_MAX_BACKOFF = 8.0
#: the ``Content-Type`` of a ``POST /score`` body (the server answers 415 to any other)
NPZ_CONTENT_TYPE = "application/x-npz"
_NPZ = NPZ_CONTENT_TYPE
#: the members a ``POST /score`` body may hold
_MEMBERS = ("samples.npy", "prompts.npy")
#: dtype kinds a member may have: bool, integers, floats, complex (samples) and unicode (prompts)
_KINDS = "biufcU"


class RewardServerError(RuntimeError):
    """A reward server cannot be reached, timed out, or failed (HTTP 5xx) on every attempt."""


class BatchTooLarge(ValueError):
    """A ``POST /score`` body whose ``.npz`` declares an array larger than the server accepts (HTTP 413)."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` is ``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def encode_batch(samples: torch.Tensor, prompts: Optional[Sequence[str]] = None) -> bytes:
    """The ``POST /score`` body: an uncompressed ``.npz`` of ``samples`` (float32) and optionally ``prompts``.

    Uncompressed on purpose: the server refuses deflated members (they could hide a zip bomb).

    Args:
        samples: ``[B, *sample_shape]`` tensor (any device and floating dtype; sent as float32).
        prompts: ``B`` strings, or None.

    Returns:
        the ``.npz`` bytes.
    """
    arrays = {"samples": samples.detach().to("cpu", torch.float32).contiguous().numpy()}
    if prompts is not None:
        arrays["prompts"] = np.array([str(p) for p in prompts], dtype=np.str_).reshape(len(prompts))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _member_header(npz: zipfile.ZipFile, info: zipfile.ZipInfo) -> Tuple[tuple, np.dtype, int]:
    """The ``(shape, dtype, header bytes)`` of one ``.npy`` member, read from its header only.

    Raises:
        ValueError: not a version 1 or 2 ``.npy`` header (the message names the member).
    """
    name = info.filename[:-len(".npy")]
    try:
        with npz.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(member)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(member)
            else:
                raise ValueError(f".npy format version {version} (numpy.savez writes 1.0 or 2.0)")
            return tuple(shape), dtype, member.tell()
    except Exception as err:  # zipfile / numpy header errors of all kinds
        raise ValueError(f"array {name!r} is not a readable .npy member: {err}") from None


def _check_member(npz: zipfile.ZipFile, info: zipfile.ZipInfo, max_bytes: Optional[int]) -> None:
    """Checks one ``.npz`` member before any of its data is read (bounded memory for hostile bodies).

    It must be stored (a deflated member can inflate a small body a thousandfold: a zip bomb), declare at
    most ``max_bytes``, hold a plain numeric or unicode array (no objects, records, bytes or dates), and
    hold exactly the bytes its ``.npy`` header's shape and dtype declare.

    Raises:
        BatchTooLarge: the member declares more than ``max_bytes``.
        ValueError: any other failed check (the message names the member and the check).
    """
    name = info.filename[:-len(".npy")]
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"array {name!r} is compressed in the .npz (zip method {info.compress_type}); send "
                         "numpy.savez output, not savez_compressed: the server reads stored members only")
    if max_bytes is not None and info.file_size > max_bytes:
        raise BatchTooLarge(f"array {name!r} declares {info.file_size} bytes, more than the server's limit of "
                            f"{max_bytes} (its --max-body-mb); lower config reward_batch_size")
    if info.file_size != info.compress_size:
        raise ValueError(f"array {name!r}: a stored .npz member declares {info.file_size} bytes but holds "
                         f"{info.compress_size}")
    shape, dtype, header = _member_header(npz, info)
    if dtype.hasobject or dtype.names is not None or dtype.subdtype is not None or dtype.kind not in _KINDS:
        raise ValueError(f"array {name!r} has dtype {dtype}: only plain numeric arrays (samples) and unicode "
                         "strings (prompts) are accepted, not objects, records, bytes or dates")
    declared = math.prod(shape) * dtype.itemsize
    if declared != info.file_size - header:
        raise ValueError(f"array {name!r} declares shape {list(shape)} of {dtype} ({declared} bytes) but its "
                         f".npz member holds {info.file_size - header} bytes of data")


def _open_npz(body: bytes, max_bytes: Optional[int]) -> zipfile.ZipFile:
    """The body as a zip whose members have all passed :func:`_check_member`.

    Raises:
        BatchTooLarge, ValueError: see :func:`decode_batch`.
    """
    try:
        npz = zipfile.ZipFile(io.BytesIO(body))
        infos = npz.infolist()
    except Exception as err:  # zipfile errors of all kinds
        raise ValueError(f"the body is not an .npz file of arrays (numpy.savez, no pickles): {err}") from None
    names = [info.filename for info in infos]
    unknown = sorted({n[:-len(".npy")] if n.endswith(".npy") else n for n in names if n not in _MEMBERS})
    if unknown:
        raise ValueError(f"unknown arrays {unknown} in the .npz; expected 'samples' and optionally 'prompts'")
    if len(set(names)) != len(names):
        raise ValueError(f"the .npz holds an array twice: {sorted(names)}")
    for info in infos:
        _check_member(npz, info, max_bytes)
    return npz


def decode_batch(body: bytes, max_bytes: Optional[int] = None) -> Tuple[np.ndarray, Optional[list]]:
    """The inverse of :func:`encode_batch` (no pickles), checked before any array is read.

    Args:
        body: the ``.npz`` bytes.
        max_bytes: the most bytes one array may declare (None: no limit beyond the body's own size).

    Returns:
        ``(samples float32 [B, ...], prompts list of B str or None)``.

    Raises:
        BatchTooLarge: an array declares more than ``max_bytes``.
        ValueError: not an ``.npz``, a compressed member, a dtype that is not plain numeric or unicode, a
            header that does not match its data, no ``samples`` array, samples not floating / empty, unknown
            arrays, or ``prompts`` not ``B`` strings (the message says which).
    """
    with _open_npz(body, max_bytes) as npz:
        try:
            arrays = {}
            for info in npz.infolist():
                with npz.open(info) as member:
                    arrays[info.filename[:-len(".npy")]] = np.lib.format.read_array(member, allow_pickle=False)
        except Exception as err:  # zipfile / numpy errors of all kinds
            raise ValueError(f"the body is not an .npz file of arrays (numpy.savez, no pickles): {err}") from None
    if "samples" not in arrays:
        raise ValueError("the .npz has no 'samples' array (float32 [B, *sample_shape])")
    samples = arrays["samples"]
    if not np.issubdtype(samples.dtype, np.floating) or samples.ndim < 1 or samples.shape[0] < 1:
        raise ValueError(f"'samples' must be a floating array [B, *sample_shape] with B >= 1, "
                         f"got dtype {samples.dtype} shape {list(samples.shape)}")
    prompts = None
    if "prompts" in arrays:
        p = arrays["prompts"]
        if p.dtype.kind != "U" or p.shape != (samples.shape[0],):
            raise ValueError(f"'prompts' must be a unicode array of {samples.shape[0]} strings (one per sample), "
                             f"got dtype {p.dtype} shape {list(p.shape)}")
        prompts = [str(s) for s in p.tolist()]
    return samples.astype(np.float32, copy=False), prompts


def _option(config: Any, key: str) -> Any:
    """``config[key]`` (dict or attribute-style; absent / None config: the default), checked like the trainer does."""
    from orwcfm_fast.config import OPTIONS, ConfigError

    if config is None:
        value = OPTIONS[key].default
    elif isinstance(config, Mapping):
        value = config.get(key, OPTIONS[key].default)
    else:
        value = getattr(config, key, OPTIONS[key].default)
    try:
        return OPTIONS[key].check(value)
    except ValueError as err:
        raise ConfigError(f"config key {key!r}: {err}") from None


def _reason(err: BaseException, timeout: float) -> str:
    """A short description of a connection-level failure."""
    if isinstance(err, urllib.error.URLError) and not isinstance(err, urllib.error.HTTPError):
        err = err.reason if isinstance(err.reason, BaseException) else err
    if isinstance(err, (socket.timeout, TimeoutError)):
        return f"no answer within {timeout:g} s (config reward_timeout)"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, socket.gaierror):
        return f"host not found: {err}"
    if isinstance(err, urllib.error.URLError):
        return str(err.reason)
    return f"{type(err).__name__}: {err}"


def _server_message(err: urllib.error.HTTPError) -> str:
    """The ``error`` field of a JSON error answer, else its text."""
    try:
        body = err.read().decode("utf-8", "replace")
    except Exception:
        body = ""
    try:
        return str(json.loads(body)["error"])
    except Exception:
        return body.strip()[:2000] or (err.reason or "")


class HTTPReward(Reward):
    """A reward computed by an ``orwcfm-fast reward-server`` process.

    Args:
        url: the server, ``http://HOST:PORT`` (a path prefix is kept; a trailing ``/`` dropped).
        timeout: seconds one request may wait for the server (config ``reward_timeout``).
        retries: further attempts after a connection error, timeout or HTTP 5xx, with backoff
            0.5 s, 1 s, 2 s, ... (config ``reward_retries``).
        batch_size: samples per ``POST /score`` (config ``reward_batch_size``; None: the whole batch).

    Attributes:
        name: the served reward's name (what ``/info`` reports), for logs.
        input_range, takes_prompts: the served reward's, from ``/info``.
        score_requests: ``POST /score`` attempts made so far (retries included).

    Raises:
        RewardServerError: the server does not answer ``/info`` (after the retries).
        ValueError: a bad URL, or what answers is not an orwcfm-fast reward server.

    Example:
        >>> reward = HTTPReward("http://127.0.0.1:8765")   # orwcfm-fast reward-server --reward clip --port 8765
        >>> reward(images)                                  # [B, 3, H, W] -> [B]
    """

    def __init__(self, url: str, *, timeout: float = 120.0, retries: int = 3, batch_size: Optional[int] = None):
        super().__init__()
        parsed = urllib.parse.urlsplit(str(url).strip())
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"a reward server URL looks like http://127.0.0.1:PORT, got {url!r}")
        self.url = urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, parsed.path.rstrip("/"), "", ""))
        self._port = parsed.port
        # A server on this machine is never reached through the environment's http_proxy (clusters set one).
        handlers = [urllib.request.ProxyHandler({})] if is_loopback(parsed.hostname) else []
        self._opener = urllib.request.build_opener(*handlers)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.batch_size = None if batch_size is None else int(batch_size)
        if not self.timeout > 0 or self.retries < 0 or (self.batch_size is not None and self.batch_size < 1):
            raise ValueError(f"HTTPReward needs timeout > 0, retries >= 0 and batch_size >= 1 or None, got "
                             f"{timeout!r}, {retries!r}, {batch_size!r}")
        self.score_requests = 0
        self.info = self._fetch_info()
        self.name = str(self.info.get("reward") or self.url)
        rng = self.info.get("input_range")
        self.input_range = None if rng is None else (float(rng[0]), float(rng[1]))
        self.takes_prompts = bool(self.info.get("takes_prompts", False))

    @classmethod
    def from_config(cls, url: str, config: Any = None) -> "HTTPReward":
        """The reward behind ``url`` with the config's ``reward_timeout``, ``reward_retries`` and
        ``reward_batch_size`` (dict or attribute-style config; None: the defaults)."""
        return cls(url, timeout=_option(config, "reward_timeout"), retries=_option(config, "reward_retries"),
                   batch_size=_option(config, "reward_batch_size"))

    # ------------------------------------------------------------------ requests

    def _request(self, method: str, path: str, body: Optional[bytes] = None) -> bytes:
        """One request with retries; the answer's body.

        Raises:
            RewardServerError: every attempt failed (connection, timeout, 5xx).
            urllib.error.HTTPError: a 4xx answer (the caller words it; not retried).
        """
        attempts = self.retries + 1
        start = time.monotonic()
        last, kind = "", "failed"
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(_FIRST_BACKOFF * 2 ** (attempt - 1), _MAX_BACKOFF))
            request = urllib.request.Request(self.url + path, data=body, method=method)
            if body is not None:
                request.add_header("Content-Type", _NPZ)
            if path == "/score":
                self.score_requests += 1
            try:
                with self._opener.open(request, timeout=self.timeout) as answer:
                    return answer.read()
            except urllib.error.HTTPError as err:
                if err.code < 500:
                    raise
                last, kind = f"HTTP {err.code}: {_server_message(err)}", "failed"
            except (urllib.error.URLError, OSError) as err:
                cause = err.reason if isinstance(err, urllib.error.URLError) else err
                last = _reason(err, self.timeout)
                kind = ("unreachable" if isinstance(cause, (ConnectionRefusedError, socket.gaierror))
                        else "timeout" if isinstance(cause, (socket.timeout, TimeoutError)) else "failed")
            except Exception as err:  # http.client.HTTPException: a cut or garbled answer
                last, kind = f"{type(err).__name__}: {err}", "failed"
        took = time.monotonic() - start
        tries = f"after {attempts} attempt{'s' if attempts > 1 else ''} over {took:.1f} s"
        if kind == "unreachable":
            port = self._port if self._port is not None else "PORT"
            raise RewardServerError(
                f"reward server {self.url} is not reachable ({last}) {tries}; start it with "
                f"`orwcfm-fast reward-server --reward NAME --port {port}`, or check config `reward`")
        if kind == "timeout":
            raise RewardServerError(
                f"reward server {self.url}: {method} {path} got {last} {tries}; raise config reward_timeout, "
                "or lower reward_batch_size so each request does less")
        raise RewardServerError(
            f"reward server {self.url}: {method} {path} failed ({last}) {tries} (config reward_retries "
            f"{self.retries}); see the server's log")

    def _fetch_info(self) -> dict:
        try:
            raw = self._request("GET", "/info")
        except urllib.error.HTTPError as err:
            raise ValueError(f"{self.url} is not an orwcfm-fast reward server: GET /info answered "
                             f"HTTP {err.code} ({_server_message(err)})") from None
        try:
            info = json.loads(raw.decode("utf-8"))
            if not isinstance(info, dict):
                raise TypeError
        except Exception:
            raise ValueError(f"{self.url} is not an orwcfm-fast reward server: GET /info did not answer a "
                             f"JSON object (got {raw[:80]!r})") from None
        if info.get("protocol", PROTOCOL) != PROTOCOL:
            raise ValueError(f"reward server {self.url} speaks protocol {info.get('protocol')!r}, this client "
                             f"{PROTOCOL}: run the same orwcfm_fast version on both sides")
        return info

    def _score(self, samples: torch.Tensor, prompts: Optional[Sequence[str]]) -> torch.Tensor:
        try:
            raw = self._request("POST", "/score", encode_batch(samples, prompts))
        except urllib.error.HTTPError as err:
            raise ValueError(f"reward server {self.url} ({self.name}) rejected a batch of samples "
                             f"{list(samples.shape)}: {_server_message(err)}") from None
        try:
            rewards = json.loads(raw.decode("utf-8"))["rewards"]
            out = torch.tensor(rewards, dtype=torch.float32)
        except Exception as err:
            raise RewardServerError(f"reward server {self.url} ({self.name}) answered POST /score with no "
                                    f"'rewards' list of floats: {err}") from None
        if out.shape != (samples.shape[0],):
            raise RewardServerError(f"reward server {self.url} ({self.name}) returned {list(out.shape)} rewards "
                                    f"for {samples.shape[0]} samples")
        return out

    # ------------------------------------------------------------------ the reward

    def forward(self, samples: torch.Tensor, prompts: Optional[Sequence[str]] = None) -> torch.Tensor:
        """Scores ``samples`` on the server, ``reward_batch_size`` samples per request.

        Args:
            samples: ``[B, *sample_shape]``, in the served reward's :attr:`input_range`.
            prompts: ``B`` prompts (sent only when the served reward takes them), or None.

        Returns:
            ``[B]`` float32 on ``samples.device``.

        Raises:
            ValueError: the server rejected the input (HTTP 4xx; its message included), or ``prompts``
                is not ``B`` long.
            RewardServerError: the server is unreachable, too slow or failing after the retries.
        """
        n = samples.shape[0]
        if prompts is not None:
            prompts = list(prompts)
            if len(prompts) != n:
                raise ValueError(f"got {len(prompts)} prompts for {n} samples")
            if not self.takes_prompts:
                prompts = None
        if n == 0:
            return torch.zeros(0, dtype=torch.float32, device=samples.device)
        step = self.batch_size or n
        chunks = [self._score(samples[i:i + step], None if prompts is None else prompts[i:i + step])
                  for i in range(0, n, step)]
        return torch.cat(chunks).to(samples.device)

    def extra_repr(self) -> str:
        return f"url={self.url!r}, name={self.name!r}, input_range={self.input_range}, batch_size={self.batch_size}"
