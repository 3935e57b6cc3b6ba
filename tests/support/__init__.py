"""What the tests and the benchmarks share, importable from both (`tests.support.<module>`):

- `s3`: moto's S3 server on 127.0.0.1 (in this process, or in a process of its own holding given objects), a free
  loopback port, an s3fs filesystem on an endpoint;
- `s3proxy`: a proxy in front of that server that fails, slows or delays the requests its rules pick;
- `s3inventory`: an S3 Inventory report (manifest and gzipped CSV parts) as S3 delivers one;
- `images`: small encoded images (random-noise JPEG, PNG of a given array).
"""
