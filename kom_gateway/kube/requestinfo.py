"""Kubernetes request target -> RequestInfo, resolved exactly as kube-apiserver does.

Mirrors `k8s.io/apiserver/pkg/endpoints/request/requestinfo.go` (`NewRequestInfo`) and
the long-running check of `pkg/server/filters` (`BasicLongRunningRequestCheck`), so the
gateway classifies every request the way the apiserver behind it will.

The parser never raises: a target that cannot be decoded (bad percent-escape, invalid
UTF-8) or that kube-apiserver itself refuses to resolve is returned as a non-resource
request with `malformed` saying why. Routing sends those to the default group.

Known, deliberate divergence: kube-apiserver ignores a `fieldSelector=metadata.name=X`
name when *any* list option fails to decode; we check `fieldSelector`, `limit` and
`timeoutSeconds`, not `labelSelector` syntax. Only the reported `name` can differ, never
the verb, resource or route.
"""

from __future__ import annotations

import re
from typing import NamedTuple
from urllib.parse import unquote_to_bytes


class RequestInfo(NamedTuple):
    """What a request is, in kube-apiserver's terms."""

    verb: str
    path: str
    is_resource_request: bool
    api_prefix: str = ""
    api_group: str = ""
    api_version: str = ""
    namespace: str = ""
    resource: str = ""
    subresource: str = ""
    name: str = ""
    is_long_running: bool = False
    malformed: str = ""

    @property
    def bad_target(self) -> bool:
        """The target itself is broken (bad escape, invalid UTF-8, control character):
        what Go's net/http answers with 400 before any handler. Resolver errors
        (`/api/v1/watch`) are not: kube-apiserver answers those itself."""
        return bool(self.malformed) and not self.malformed.startswith(_RESOLVER_ERROR)

    def as_json(self) -> dict[str, object]:
        """camelCase dict, as the CLI and access log print it."""
        return {
            "verb": self.verb,
            "path": self.path,
            "isResourceRequest": self.is_resource_request,
            "apiPrefix": self.api_prefix,
            "apiGroup": self.api_group,
            "apiVersion": self.api_version,
            "namespace": self.namespace,
            "resource": self.resource,
            "subresource": self.subresource,
            "name": self.name,
            "isLongRunning": self.is_long_running,
            "malformed": self.malformed,
        }


_RESOLVER_ERROR = "nothing after"
_new_info = tuple.__new__  # skips NamedTuple's Python-level __new__ on the hot path
_API_PREFIXES = frozenset({"api", "apis"})
_GROUPLESS_PREFIXES = frozenset({"api"})
_SPECIAL_VERBS = frozenset({"proxy", "watch"})
_SPECIAL_VERBS_NO_SUBRESOURCES = frozenset({"proxy"})
_NAMESPACE_SUBRESOURCES = frozenset({"status", "finalize"})
_METHOD_VERBS = {
    "POST": "create",
    "GET": "get",
    "HEAD": "get",
    "PUT": "update",
    "PATCH": "patch",
    "DELETE": "delete",
}
# kube-apiserver's own long-running set (notes §2): no request timeout for these.
LONG_RUNNING_VERBS = frozenset({"watch", "proxy"})
LONG_RUNNING_SUBRESOURCES = frozenset({"attach", "exec", "proxy", "log", "portforward"})

_CONTROL_CHAR = re.compile(r"[\x00-\x1f\x7f]")  # Go's net/url refuses these in a URL
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_INT64_MAX = 2**63 - 1
_INT64_MIN = -(2**63)


def parse_request(method: str, target: str) -> RequestInfo:
    """Resolve `method` + request target (path with optional `?query`)."""
    raw_path, _, query = target.partition("?")
    if method == "CONNECT":  # a tunnel: no Kubernetes API is reached that way
        return RequestInfo("connect", raw_path, False, malformed="CONNECT is not supported")
    if not raw_path.startswith("/"):
        scheme_sep = raw_path.find("://")
        if scheme_sep > 0:  # absolute-form target (HTTP/1.1 proxy style)
            slash = raw_path.find("/", scheme_sep + 3)
            raw_path = raw_path[slash:] if slash >= 0 else "/"
        else:
            return RequestInfo(
                method.lower(), raw_path, False, malformed="the path does not start with /"
            )
    if not (target.isascii() and target.isprintable()) and _CONTROL_CHAR.search(target):
        return RequestInfo(method.lower(), raw_path, False, malformed="control character in URL")
    path = raw_path
    if "%" in raw_path:
        path, problem = _decode_path(raw_path)
        if problem:
            return RequestInfo(method.lower(), raw_path, False, malformed=problem)

    trimmed = path.strip("/")
    parts = trimmed.split("/") if trimmed else []
    n = len(parts)
    if n < 3 or parts[0] not in _API_PREFIXES:
        return _non_resource(method, path)
    api_prefix = parts[0]
    if api_prefix in _GROUPLESS_PREFIXES:
        api_group = ""
        api_version = parts[1]
        i = 2
    else:
        if n < 4:  # /apis/<group>/<version> is discovery
            return _non_resource(method, path)
        api_group = parts[1]
        api_version = parts[2]
        i = 3

    verb = parts[i]
    if verb in _SPECIAL_VERBS:
        if n - i < 2:
            # kube-apiserver: "unable to determine kind and namespace from url" (500)
            return RequestInfo(method.lower(), path, False, malformed=f"{_RESOLVER_ERROR} {verb!r}")
        i += 1
    else:
        verb = _METHOD_VERBS.get(method, "")

    namespace = ""
    if parts[i] == "namespaces" and n - i > 1:
        namespace = parts[i + 1]
        if n - i > 2 and parts[i + 2] not in _NAMESPACE_SUBRESOURCES:
            i += 2

    resource = parts[i]
    if n - i >= 2:
        name = parts[i + 1]
        # `proxy` is the one special verb whose third part is not a subresource
        subresource = (
            parts[i + 2] if n - i >= 3 and verb not in _SPECIAL_VERBS_NO_SUBRESOURCES else ""
        )
    else:
        name = subresource = ""

    if not name:
        if verb == "get":
            verb, name = _list_verb_and_name(query) if _query_may_matter(query) else ("list", "")
        elif verb == "delete":
            verb = "deletecollection"

    return _new_info(
        RequestInfo,
        (
            verb,
            path,
            True,
            api_prefix,
            api_group,
            api_version,
            namespace,
            resource,
            subresource,
            name,
            verb in LONG_RUNNING_VERBS or subresource in LONG_RUNNING_SUBRESOURCES,
            "",
        ),
    )


def _non_resource(method: str, path: str) -> RequestInfo:
    verb = method.lower()
    long_running = verb in LONG_RUNNING_VERBS or path.startswith("/debug/pprof/")
    return RequestInfo(verb, path, False, is_long_running=long_running)


def _ascii_escapes() -> dict[str, str]:
    table = {}
    for code in range(128):
        h = f"{code:02x}"
        for variant in (h, h.upper(), h[0].upper() + h[1], h[0] + h[1].upper()):
            table[variant] = chr(code)
    return table


_ASCII_ESCAPES = _ascii_escapes()


def _percent_decode(value: str, errors: str) -> str | None:
    """Decode %XX escapes; None for a bad escape (Go's net/url refuses those).

    Fast path for escapes of ASCII bytes; anything else goes through the exact decoder.
    `errors` is the UTF-8 error policy ("strict" raises UnicodeDecodeError).
    """
    if "%3D" in value:  # '=' in field/label selectors: by far the most common escape.
        # Exact: in a well-formed value every '%' starts an escape, so "%3D" is one.
        value = value.replace("%3D", "=")
        if "%" not in value:
            return value
    head, *chunks = value.split("%")
    out = [head]
    for chunk in chunks:
        char = _ASCII_ESCAPES.get(chunk[:2])
        if char is None:  # a bad escape, or a byte >= 0x80 of a UTF-8 sequence
            if _BAD_PERCENT.search(value):
                return None
            return unquote_to_bytes(value).decode("utf-8", errors)
        out.append(char)
        out.append(chunk[2:])
    return "".join(out)


def _decode_path(raw: str) -> tuple[str, str]:
    """Percent-decode a path as Go's net/url does (which rejects bad escapes)."""
    try:
        decoded = _percent_decode(raw, "strict")
    except UnicodeDecodeError:
        return raw, "path is not valid UTF-8 after percent-decoding"
    if decoded is None:
        return raw, "invalid percent-escape in path"
    return decoded, ""


def _query_unescape(value: str) -> str | None:
    """Go's url.QueryUnescape: '+' is a space; a bad escape invalidates the pair."""
    if "+" in value:
        value = value.replace("+", " ")
    if "%" not in value:
        return value
    return _percent_decode(value, "replace")


_RELEVANT_KEYS = frozenset({"watch", "fieldSelector", "limit", "timeoutSeconds"})


def _query_may_matter(query: str) -> bool:
    """False when no pair can be `watch` or `fieldSelector` (nothing escaped, neither
    name present): then a nameless GET is a plain list, whatever else the query says."""
    return bool(query) and (
        "watch" in query or "fieldSelector" in query or "%" in query or "+" in query
    )


def _relevant_pairs(query: str) -> list[tuple[str, str]]:
    """(key, raw value) of the pairs that can matter, in order, as Go's url.ParseQuery
    keeps them (a plain split loop: measured faster here than any regex scan)."""
    pairs = []
    for pair in query.split("&"):
        if not pair or ";" in pair:  # Go drops pairs holding a semicolon
            continue
        raw_key, _, raw_value = pair.partition("=")
        key = _query_unescape(raw_key) if ("%" in raw_key or "+" in raw_key) else raw_key
        if key in _RELEVANT_KEYS:
            pairs.append((key, raw_value))
    return pairs


def _list_verb_and_name(query: str) -> tuple[str, str]:
    """`get` without a name: list or watch, plus a name from fieldSelector=metadata.name=.

    Only the keys that can change the answer are decoded: `watch`, `fieldSelector`, and
    the integer options whose decode failure makes kube-apiserver drop the name.
    """
    watch: str | None = None
    field_selector: str | None = None
    decodes = True  # does the query decode into metav1.ListOptions?
    seen_ints: list[str] = []
    for key, raw_value in _relevant_pairs(query):
        if key == "watch":
            if watch is None:
                watch = _query_unescape(raw_value)  # None (bad escape): pair dropped
        elif key == "fieldSelector":
            if field_selector is None:
                field_selector = _query_unescape(raw_value)
        elif key not in seen_ints:
            value = _query_unescape(raw_value)
            if value is not None:
                seen_ints.append(key)
                decodes = decodes and _is_int64(value)

    name = ""
    # The selector only matters if it can name an object, or if a non-ASCII watch value
    # would compare differently after a decode failure (EqualFold vs ToLower).
    if (
        field_selector is not None
        and decodes
        and ("metadata.name" in field_selector or (watch is not None and not watch.isascii()))
    ):
        exact = _field_selector_exact_name(field_selector)
        if exact is None:
            decodes = False
        else:
            name = exact
    if watch is None:
        is_watch = False
    elif decodes:  # Convert_Slice_string_To_bool: "0" or EqualFold "false" is false
        is_watch = not (watch == "0" or watch.casefold() == "false")
    else:  # decode failed: apiserver re-reads watch with strings.ToLower
        is_watch = watch.lower() not in ("false", "0")
    return ("watch" if is_watch else "list"), name


def _is_int64(value: str) -> bool:
    """strconv.ParseInt(value, 10, 64) succeeds. Never int() of a client's string as it
    is: past Python's int_max_str_digits that raises, and below it costs quadratic time."""
    if value.isascii() and value.isdigit() and len(value) < 19:
        return True
    sign = value[:1] if value[:1] in ("+", "-") else ""
    digits = value[len(sign) :]
    if not (digits.isascii() and digits.isdigit()):
        return False
    digits = digits.lstrip("0")
    return len(digits) <= 19 and _INT64_MIN <= int(sign + (digits or "0")) <= _INT64_MAX


def parse_field_selector(selector: str) -> list[tuple[str, str, str]] | None:
    """(field, operator, value) terms of a field selector, sorted as apimachinery sorts
    them; None if it does not parse (apimachinery `fields.ParseSelector`)."""
    terms = _split_terms(selector)
    terms.sort()
    out = []
    for term in terms:
        if not term:
            continue
        split = _split_term(term)
        if split is None:
            return None
        field, op, value = split
        unescaped = _unescape_selector_value(value)
        if unescaped is None:
            return None
        out.append((field, op, unescaped))
    return out


def _field_selector_exact_name(selector: str) -> str | None:
    """The exact metadata.name a field selector requires ("" if none); None if unparsable.

    `RequiresExactMatch("metadata.name")` plus the apiserver's `IsValidPathSegmentName`.
    """
    terms = parse_field_selector(selector)
    if terms is None:
        return None
    found = next((v for f, op, v in terms if f == "metadata.name" and op != "!="), None)
    if found is None or found in (".", "..") or "/" in found or "%" in found:
        return ""
    return found


def _split_terms(selector: str) -> list[str]:
    """Split on commas not escaped by a backslash."""
    if "\\" not in selector:
        return selector.split(",") if selector else []
    terms: list[str] = []
    start = 0
    in_slash = False
    for i, c in enumerate(selector):
        if in_slash:
            in_slash = False
        elif c == "\\":
            in_slash = True
        elif c == ",":
            terms.append(selector[start:i])
            start = i + 1
    terms.append(selector[start:])
    return terms


def _split_term(term: str) -> tuple[str, str, str] | None:
    """The first operator wins; at one position `!=` and `==` beat `=` (Go's order)."""
    eq = term.find("=")
    bang = term.find("!=")
    if bang != -1 and (eq == -1 or bang < eq):
        return term[:bang], "!=", term[bang + 2 :]
    if eq == -1:
        return None
    if term.startswith("==", eq):
        return term[:eq], "==", term[eq + 2 :]
    return term[:eq], "=", term[eq + 1 :]


def _unescape_selector_value(value: str) -> str | None:
    if not any(c in value for c in "\\,="):
        return value
    out: list[str] = []
    in_slash = False
    for c in value:
        if in_slash:
            if c not in "\\,=":
                return None
            out.append(c)
            in_slash = False
        elif c == "\\":
            in_slash = True
        elif c in ",=":
            return None
        else:
            out.append(c)
    return None if in_slash else "".join(out)


class ParseCache:
    """`parse_request`, remembered: clients repeat their requests (a kubelet renews its
    lease and reports its node every few seconds, informers re-list the same paths), and
    a RequestInfo is immutable, so each (method, target) is parsed once. Bounded: cleared
    when full; long targets (selectors, continue tokens), which rarely repeat, are not
    kept."""

    def __init__(self, size: int = 16384, longest: int = 512) -> None:
        self.size = size
        self.longest = longest
        self._parsed: dict[tuple[str, str], RequestInfo] = {}

    def parse(self, method: str, target: str) -> RequestInfo:
        key = (method, target)
        info = self._parsed.get(key)
        if info is None:
            info = parse_request(method, target)
            if len(target) <= self.longest:
                if len(self._parsed) >= self.size:
                    self._parsed.clear()
                self._parsed[key] = info
        return info

    def __len__(self) -> int:
        return len(self._parsed)
