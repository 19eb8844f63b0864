"""What the sidecar records about its traffic: the exchange record and the access log."""
