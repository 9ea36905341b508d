"""Kubernetes primitives: what a request is (kube-apiserver's resolver), who sent it
(verified certificates, front-proxy identity), and Status bodies."""
