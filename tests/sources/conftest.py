"""Sources: the HTTP poller (conditional GETs, auth, redirects, bodies), object-store pollers
(memory, local folders, S3 on moto), the packed listing state and the watch loop."""
