"""Architecture search over a UNet's blocks (SnapFusion's architecture evolution): the quality proxy and the
evolution loop; the latency side is :mod:`pocketdiff.bench.lut`."""
