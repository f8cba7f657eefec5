"""Data: raw arrays from a source, label noise, device-resident batches."""
