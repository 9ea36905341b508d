"""Overload protection, pure: who is admitted, what Retry-After says, when to GOAWAY.

Nothing here touches a socket or the event loop; time is passed in. The gateway asks
`Admission` before proxying, and `LoadMeter` + `goaway_chance` how likely an HTTP/2
request is to trigger a graceful GOAWAY.
"""
