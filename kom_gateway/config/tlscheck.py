"""Do the TLS files a configuration names load? Asked by `check` (so a wrong path or a
key that belongs to another certificate is found before a deploy) and wherever the
files are loaded, so every problem names its YAML key and its file."""

from __future__ import annotations

import os
import ssl
import time

from kom_gateway.config.model import Config, ConfigIssue

EXPIRY_WARNING_DAYS = 30


def tls_problems(config: Config, listen: bool = True, upstream: bool = True) -> list[ConfigIssue]:
    """Every problem with the TLS files of `config` (the serving and/or upstream ones)."""
    issues: list[ConfigIssue] = []
    if listen and config.listen_tls is not None:
        t = config.listen_tls
        issues += _pair("listen.tls", t.cert_file, t.key_file, ssl.PROTOCOL_TLS_SERVER)
        if t.client_ca_file:
            issues += _ca("listen.tls.clientCAFile", t.client_ca_file)
    u = config.upstream_tls
    if upstream and u.ca_file:
        issues += _ca("upstream.tls.caFile", u.ca_file)
    if upstream and u.cert_file and u.key_file:
        issues += _pair("upstream.tls", u.cert_file, u.key_file, ssl.PROTOCOL_TLS_CLIENT)
    return issues


MISSING_FILE = "no such file"  # how a missing file's issue ends (`check` adds a hint)


def _unreadable(key: str, path: str) -> ConfigIssue | None:
    if not os.path.exists(path):
        return ConfigIssue(key, 0, f"{path}: {MISSING_FILE}")
    if not os.path.isfile(path):
        return ConfigIssue(key, 0, f"{path}: not a regular file")
    if not os.access(path, os.R_OK):
        return ConfigIssue(key, 0, f"{path}: not readable (check its permissions)")
    return None


def _pair(section: str, cert: str, key: str, protocol: int) -> list[ConfigIssue]:
    missing = [
        issue
        for issue in (
            _unreadable(f"{section}.certFile", cert),
            _unreadable(f"{section}.keyFile", key),
        )
        if issue is not None
    ]
    if missing:
        return missing
    try:
        ssl.SSLContext(protocol).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            message = f"the key {key} does not belong to the certificate {cert}"
        else:
            message = f"{cert} and {key} are not a PEM certificate and key ({exc.reason or exc})"
        return [ConfigIssue(section, 0, message)]
    return []


def _ca(key: str, path: str) -> list[ConfigIssue]:
    missing = _unreadable(key, path)
    if missing is not None:
        return [missing]
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        return [ConfigIssue(key, 0, f"{path}: not a PEM CA certificate ({exc.reason or exc})")]
    return []


def tls_warnings(config: Config, now: float | None = None) -> list[ConfigIssue]:
    """Certificates that expire within EXPIRY_WARNING_DAYS (or have expired)."""
    now = time.time() if now is None else now
    files: list[tuple[str, str | None]] = []
    if config.listen_tls is not None:
        t = config.listen_tls
        files += [
            ("listen.tls.certFile", t.cert_file),
            ("listen.tls.clientCAFile", t.client_ca_file),
        ]
    u = config.upstream_tls
    files += [("upstream.tls.caFile", u.ca_file), ("upstream.tls.certFile", u.cert_file)]
    issues = []
    for key, path in files:
        for not_after in _expiries(path):
            days = (not_after - now) / 86400
            if days < 0:
                issues.append(ConfigIssue(key, 0, f"{path}: a certificate in it has expired"))
            elif days < EXPIRY_WARNING_DAYS:
                issues.append(
                    ConfigIssue(key, 0, f"{path}: a certificate in it expires in {days:.0f} days")
                )
    return issues


def _expiries(path: str | None) -> list[float]:
    """notAfter of the certificates in a PEM file, as Unix time (none if unreadable:
    `tls_problems` reports that). CA certificates come from `ssl`'s own parser; a leaf
    (serving, client) certificate, which that parser keeps to itself, from CPython's
    certificate decoder where it has one."""
    if not path or _unreadable("", path) is not None:
        return []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError:
        return []
    found = [c["notAfter"] for c in context.get_ca_certs() if "notAfter" in c]
    decode = getattr(ssl._ssl, "_test_decode_cert", None)  # type: ignore[attr-defined]
    if not found and decode is not None:
        try:
            found = [decode(path)["notAfter"]]
        except (ssl.SSLError, KeyError, OSError):
            return []
    return [ssl.cert_time_to_seconds(text) for text in found]
