"""Data: raw arrays (or image-store views) from a source, label noise, device-resident or host-read batches."""
