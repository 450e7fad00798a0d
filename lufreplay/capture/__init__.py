"""Recording: probes, ring-buffer transport, procfs/cgroup plumbing, host capability detection."""
