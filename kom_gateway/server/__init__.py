"""The process around the data plane: running it, workers, the admin port, binding,
handing listening sockets to a replacement, TLS files and config files watched for change."""
