"""Cohorts: `qmedsam predict --manifest` over many scans, resumable (the ledger), sharded, locally or on Ray."""
