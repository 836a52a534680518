"""Connectors read source records (FHIR, finance formats) into kit's event store."""
