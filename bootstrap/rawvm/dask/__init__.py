"""Dask on rawvm machines: ``cluster`` (the SpecCluster), ``procs`` (scheduler and worker processes on the
machines), ``tls`` (the per-cluster CA and certificates)."""
