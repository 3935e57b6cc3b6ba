"""Reading a segment job's output back: `open` (the two Parquet datasets), `sql` (DuckDB SQL, CSV/Parquet output),
`summary` (counts and score distribution), `render` (masks and overlays), `common` (what those three share),
`report` (a static HTML page of a run), `evaluate` (COCO AP against ground truth)."""
