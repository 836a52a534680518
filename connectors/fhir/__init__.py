"""FHIR R4 connector: Bundles and Bulk Data NDJSON into the event store."""
