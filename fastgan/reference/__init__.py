"""Plain-torch implementations of every fastgan op: the fallback kernels and the test oracles."""
