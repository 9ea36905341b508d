"""kom-gateway: route Kubernetes API traffic by resource to groups of kube-apiservers."""

__version__ = "0.1.0"

from kom_gateway import compiled

compiled.core()  # before any of the compiled core loads: a stale build fails here
