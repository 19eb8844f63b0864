"""Demo apps that speak plain HTTP on localhost and know nothing about TLS."""
