"""What a request may do: JWT authentication, the authorization policy, path normalization."""
