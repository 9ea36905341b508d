"""Simulated kube-apiserver groups: test equipment for the gateway, its demo and benches.

Several groups share one store and one resourceVersion counter, as apiserver groups share
one etcd. Faithful to kube-apiserver where the gateway can tell the difference (paths,
verbs, watch semantics, discovery, Status errors); deliberately small elsewhere.
"""
