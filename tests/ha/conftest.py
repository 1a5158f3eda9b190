"""High availability: leases, fencing, checkpoints and fair sharing, in-process
(test_ha.py) and with replicas as processes (test_ha_processes.py)."""
