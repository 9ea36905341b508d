"""Where the routing config and the rollout's state live (I/O): a file with a status file
beside it, or a ConfigMap key with the state as an annotation (Kubernetes API, through
the official client: kubeconfig or in-cluster). Writes are compare-and-swap: a config
changed by someone else since it was read is never overwritten."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from typing import IO, Any, Protocol

from kom_gateway.rollout.spec import ConfigMapTarget, FileTarget
from kom_gateway.rollout.state import RolloutState, rollout_key

ANNOTATION_PREFIX = "rollout.kom-gateway.io/"
COMPONENT = "kom-gateway-rollout"


class TargetError(Exception):
    """The target cannot be read or written; nothing was changed."""


class Conflict(TargetError):
    """Someone else changed the target since it was read: read again and retry."""


@dataclass(frozen=True)
class Snapshot:
    text: str
    version: str  # what a compare-and-swap write compares
    state: RolloutState | None


class Target(Protocol):
    def describe(self) -> str: ...

    def read(self) -> Snapshot: ...

    def write(self, snapshot: Snapshot, text: str | None, state: RolloutState) -> Snapshot:
        """Write the state and, if given, the config text; the new snapshot."""
        ...

    def event(self, warning: bool, reason: str, message: str) -> None: ...

    def lock(self, holder: str) -> str | None:
        """Take this process's lock where the target has one (None), or say who holds it."""
        ...


def _atomic_write(path: str, data: str) -> None:
    """Replace `path` in one rename (a reader sees the old or the new file, never half)."""
    directory = os.path.dirname(os.path.abspath(path))
    mode = os.stat(path).st_mode & 0o7777 if os.path.exists(path) else 0o644
    fd, tmp = tempfile.mkstemp(prefix=".kom-rollout-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class FileTargetIO:
    def __init__(self, target: FileTarget, label: str, group: str) -> None:
        self.path = target.path
        self.state_path = f"{target.path}.rollout-{rollout_key(label, group)}.json"
        self._lock_file: IO[str] | None = None

    def describe(self) -> str:
        return f"file {self.path} (state in {self.state_path})"

    def read(self) -> Snapshot:
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise TargetError(f"cannot read {self.path}: {exc}") from None
        state = None
        try:
            with open(self.state_path, encoding="utf-8") as f:
                state = RolloutState.from_json(f.read())
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError) as exc:
            raise TargetError(f"cannot read the rollout state {self.state_path}: {exc}") from None
        return Snapshot(text, text, state)

    def write(self, snapshot: Snapshot, text: str | None, state: RolloutState) -> Snapshot:
        try:
            _atomic_write(self.state_path, state.to_json())
            if text is not None:
                current = self.read().text
                if current != snapshot.text:
                    raise Conflict(f"{self.path} changed since it was read")
                _atomic_write(self.path, text)
        except OSError as exc:
            raise TargetError(f"cannot write {exc.filename or self.path}: {exc.strerror}") from None
        new_text = snapshot.text if text is None else text
        return Snapshot(new_text, new_text, state)

    def event(self, warning: bool, reason: str, message: str) -> None:
        pass  # the log line is the record for a file

    def lock(self, holder: str) -> str | None:
        """An exclusive flock on `<state file>.lock`, held while this process runs."""
        path = self.state_path + ".lock"
        try:
            f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held for the process' life)
        except OSError as exc:
            raise TargetError(f"cannot open the lock file {path}: {exc.strerror}") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            who = f.read().strip() or "another process"
            f.close()
            return who
        f.seek(0)
        f.truncate()
        f.write(holder)
        f.flush()
        self._lock_file = f
        return None


def _now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ConfigMapTargetIO:
    def __init__(self, target: ConfigMapTarget, label: str, group: str) -> None:
        try:
            from kubernetes import client, config  # the official client; optional extra
        except ImportError:
            raise TargetError(
                "a configMap target needs the Kubernetes client: "
                "pip install 'kom-gateway[kubernetes]'"
            ) from None
        self.target = target
        self.annotation = ANNOTATION_PREFIX + rollout_key(label, group)
        try:
            if (
                target.kubeconfig
                or os.environ.get("KUBECONFIG")
                or os.path.exists(os.path.expanduser("~/.kube/config"))
            ):
                api_client = config.new_client_from_config(
                    config_file=target.kubeconfig, context=target.context
                )
            else:
                config.load_incluster_config()
                api_client = client.ApiClient()
        except Exception as exc:  # the client raises several unrelated types here
            raise TargetError(f"no Kubernetes credentials: {exc}") from None
        self.api = client.CoreV1Api(api_client)
        self._exc = client.exceptions.ApiException
        self._uid = ""
        self._read_object: Any = None
        self._host = socket.gethostname()

    def describe(self) -> str:
        return self.target.describe()

    def _api_error(self, exc: Any, doing: str) -> TargetError:
        if exc.status == 409:
            return Conflict(f"{self.describe()} changed since it was read")
        return TargetError(f"cannot {doing} {self.describe()}: {exc.status} {exc.reason}")

    def read(self) -> Snapshot:
        t = self.target
        try:
            cm = self.api.read_namespaced_config_map(t.name, t.namespace)
        except self._exc as exc:
            raise self._api_error(exc, "read") from None
        except OSError as exc:
            raise TargetError(f"cannot read {self.describe()}: {exc}") from None
        data = cm.data or {}
        if t.key not in data:
            raise TargetError(
                f"{self.describe()}: no key {t.key!r} (it has {', '.join(data) or 'none'})"
            )
        self._uid = cm.metadata.uid or ""
        self._read_object = cm
        raw = (cm.metadata.annotations or {}).get(self.annotation)
        try:
            state = RolloutState.from_json(raw) if raw else None
        except (ValueError, TypeError) as exc:
            raise TargetError(
                f"unreadable rollout state in annotation {self.annotation}: {exc}"
            ) from None
        return Snapshot(data[t.key], cm.metadata.resource_version, state)

    def write(self, snapshot: Snapshot, text: str | None, state: RolloutState) -> Snapshot:
        """A replace carrying the resourceVersion read: 409 if anyone wrote since."""
        cm = self._read_object
        if cm is None or cm.metadata.resource_version != snapshot.version:
            raise Conflict(f"{self.describe()} changed since it was read")
        cm.metadata.annotations = {
            **(cm.metadata.annotations or {}),
            self.annotation: state.to_json(),
        }
        if text is not None:
            cm.data = {**(cm.data or {}), self.target.key: text}
        self._read_object = None  # if this write fails, the next one needs a fresh read
        try:
            cm = self.api.replace_namespaced_config_map(self.target.name, self.target.namespace, cm)
        except self._exc as exc:
            raise self._api_error(exc, "write") from None
        except OSError as exc:
            raise TargetError(f"cannot write {self.describe()}: {exc}") from None
        self._read_object = cm
        return Snapshot(
            (cm.data or {}).get(self.target.key, ""), cm.metadata.resource_version, state
        )

    def event(self, warning: bool, reason: str, message: str) -> None:
        """A core/v1 Event on the ConfigMap, as client-go's recorder writes them."""
        t = self.target
        now = _now_rfc3339()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{t.name}.{time.time_ns():x}", "namespace": t.namespace},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "name": t.name,
                "namespace": t.namespace,
                "uid": self._uid,
            },
            "reason": reason,
            "message": message[:1024],
            "type": "Warning" if warning else "Normal",
            "source": {"component": COMPONENT, "host": self._host},
            "reportingComponent": COMPONENT,
            "reportingInstance": self._host,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.api.create_namespaced_event(t.namespace, body)
        except (self._exc, OSError) as exc:  # a courtesy: the runner logs it and goes on
            raise TargetError(f"cannot record an Event on {self.describe()}: {exc}") from None

    def lock(self, holder: str) -> str | None:
        return None  # the lease in the annotation, written compare-and-swap, is the lock


def open_target(target: FileTarget | ConfigMapTarget, label: str, group: str) -> Target:
    if isinstance(target, FileTarget):
        return FileTargetIO(target, label, group)
    return ConfigMapTargetIO(target, label, group)
