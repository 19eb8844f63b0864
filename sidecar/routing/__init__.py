"""Where a request goes and how its head looks: the inbound and outbound routers."""
