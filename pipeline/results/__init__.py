"""Reading a segment job's output back: `open` (the two Parquet datasets), `query` (summary, SQL, masks, overlays),
`evaluate` (COCO AP against ground truth)."""
