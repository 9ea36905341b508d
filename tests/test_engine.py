"""Engine selection: `auto` takes nghttp2 when built, else h2 with one warning; an explicit
choice that cannot load is an error; the chosen engine shows in metrics."""

from __future__ import annotations

import logging
import os

import pytest

from kom_gateway import compiled
from kom_gateway.config import ConfigHolder, load_config_text
from kom_gateway.http import engine as engines
from kom_gateway.proxy.gateway import Gateway


def test_auto_without_the_extension_falls_back_to_h2_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(engines, "nghttp2_missing", lambda: "No module named '_nghttp2'")
    monkeypatch.setattr(engines, "_warned", False)
    with caplog.at_level(logging.WARNING):
        assert engines.select("auto").name == "h2"
        assert engines.select("auto").name == "h2"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "No module named '_nghttp2'" in warnings[0]
    with pytest.raises(ValueError, match="not available"):
        engines.select("nghttp2")
    with pytest.raises(ValueError, match="unknown HTTP/2 engine"):
        engines.select("quic")


def test_auto_is_nghttp2_where_it_was_built():
    """On CI and on a fresh machine of this image the README's install builds it."""
    if engines.nghttp2_missing() is not None and not os.environ.get("KOM_REQUIRE_CLIENTS"):
        pytest.skip("the nghttp2 engine is not built here")
    assert engines.select("auto").name == "nghttp2"


async def test_engine_comes_from_the_config_and_shows_in_build_info():
    config = load_config_text(
        'http2: {engine: h2}\ngroups:\n  default: {endpoints: ["http://127.0.0.1:1"]}\n'
    )
    gateway = Gateway(ConfigHolder(config))
    try:
        assert gateway.engine.name == "h2"
        sample = gateway.metrics.registry.get_sample_value(
            "kom_gateway_build_info",
            {
                "version": "0.1.0",
                "engine": "h2",
                "python": gateway.metrics.python_version,
                "core": "compiled" if compiled.is_compiled() else "python",
            },
        )
        assert sample == 1
    finally:
        await gateway.close()


def test_an_unknown_engine_in_the_config_is_an_error_naming_the_key():
    with pytest.raises(Exception, match=r"http2\.engine.*auto, nghttp2, h2"):
        load_config_text('http2: {engine: fast}\ngroups:\n  default: {endpoints: ["http://a:1"]}\n')
