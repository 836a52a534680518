"""`kit ingest finance`: OFX/QFX statements, ISO 20022 camt.052/053/054 and transaction tables into the event store."""
