"""Shipped autotune results, one JSON file per device key (filled by the autotuner)."""
