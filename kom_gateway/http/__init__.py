"""HTTP plumbing shared by the gateway and the simulated apiserver: HTTP/2 server and
client connections on two engines (nghttp2, h2), HTTP/1.1 on aiohttp, and a listener that
serves both on one port. These modules only move bytes; they make no routing decisions."""
