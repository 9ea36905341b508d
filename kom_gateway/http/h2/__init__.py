"""The portable HTTP/2 engine, on the pure-Python h2 state machine."""
