"""The data plane: carry each request to the group the router chose, fall back to default
on failure, stream responses with end-to-end flow control, and count everything."""
