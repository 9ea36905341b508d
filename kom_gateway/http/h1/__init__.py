"""HTTP/1.1, on aiohttp's server."""
