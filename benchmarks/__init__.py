"""Side-by-side measurements of the appliance, direct Dovecot, nginx and Dovecot's proxy.

Run `python3 -m benchmarks.run --help`. Everything binds to loopback and runs in
temporary folders that are removed at the end.
"""
