"""kom-gateway: route Kubernetes API traffic by resource to groups of kube-apiservers."""

__version__ = "0.1.0"
