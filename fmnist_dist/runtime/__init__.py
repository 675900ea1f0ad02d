"""The distributed runtime: devices and threads, errors across processes, stop signals, the launcher's death."""
