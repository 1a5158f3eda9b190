"""What the tests share (no tests here).

::

    servers.py      real servers on loopback: nats-server, redis-server, moto S3, and their
                    lifecycle (stop, start, pause, restart) for outage tests
    httpserver.py   HTTP servers: HttpTestServer (scriptable), Documents (named documents with
                    ETags, for e2e/HA/chaos), StaticFileServer and nginx (validators not ours)
    events.py       encoded events, schema validation, raw reads of what a sink published
    receiving.py    raw consumers of everything the bridge published (end-to-end checks)
    replicas.py     bridge replicas as processes (HA tests and the failure suite)
    credentials.py  TLS PKI, NATS NKeys/operators for the security tests
    security.py     a bridge running under restricted credentials; log recording
"""
