"""Reading a segment job's output back: `open` (the two Parquet datasets), `query` (summary, SQL, masks, overlays),
`report` (a static HTML page of a run), `evaluate` (COCO AP against ground truth)."""
