"""Who this pod is and whom it trusts: the trust bundle, the pod's credentials, their
renewal, and the verified identity of a peer."""
