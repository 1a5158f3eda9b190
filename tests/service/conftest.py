"""The service: configuration, reload, the delivery path, end to end through real brokers,
the embedded default, telemetry, the AsyncAPI document and bad input of every kind."""
